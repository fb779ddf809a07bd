"""`mcihn extract`: a folder of raw clips plus a label file -> the project's feature store, with the live extractors.

Each clip is decoded once (engines/media.py) and cut as the live pipeline cuts its window at the clip's end, with
the same code (engines/window.py): the frames the live vision worker would have analysed in the last --window
seconds, the last 41,040 audio samples (128 Wav2Vec2 frames) resampled to 16 kHz by the live sources' resampler,
and the transcript (the whole utterance, or --text-horizon seconds of its words). The window is recorded in the
store's feature spec, and from there in checkpoints, whose live pipeline cuts it again. The cuts go through the
same vision, text and audio extractors the live app builds (engines/extractors.py), so a model trained on the
store sees the features it will see live. Each clip's result is written to STORE/.work/items/ as soon as it
is made (atomically): a rerun skips finished clips, and `--shard i/n` processes (or machines sharing the folder)
split the set. The run that finds every clip finished assembles the store with mcihn.data.save_feature_store.
A clip that cannot be decoded is skipped, a clip without an audio track keeps audio length 0; both are listed in
STORE/report.jsonl and neither stops the run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mcihn.spec import MODALITIES

LAYOUTS = ("sims", "mosi", "csv")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
SPLIT_NAMES = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "dev": "valid", "test": "test"}
# CH-SIMS unimodal labels, under the names the MMSA pickle loader gives them (mcihn.data.load_mmsa_pickle).
SIMS_UNIMODAL = {"label_T": "regression_labels_T", "label_A": "regression_labels_A", "label_V": "regression_labels_V"}

LAYOUT_HELP = """layouts (--labels defaults to the file named here, under --root):
  sims  CH-SIMS (v1 or v2): ROOT/label.csv with columns video_id, clip_id, text, label (in [-1, 1]), label_T,
        label_A, label_V, annotation, mode (train/valid/test); clips at ROOT/Raw/<video_id>/<clip_id>.mp4.
        Ids are <video_id>$_$<clip_id> as in MMSA; label_T/A/V are kept as the store's regression_labels_T/A/V
        and the CH-SIMS metrics are used.
  mosi  CMU-MOSI / CMU-MOSEI as the CMU-MultimodalSDK raw download: segment clips <video>_<segment>.mp4 anywhere
        under ROOT (e.g. Raw/Video/Segmented/; folders named Segmented win over others), transcripts under a
        Transcript*/ folder: MOSI's Segmented/<video>.annotprocessed ("<segment>_DELIM_<text>" lines) or MOSEI's
        Segmented/Combined/<video>.txt ("<video>___<segment>___<start>___<end>___<text>" lines).
        Labels: ROOT/labels.csv with columns id (<video>_<segment>), label (sentiment in [-3, 3]) and optionally
        split; without a split column, --folds names a JSON {"train": [video ids], "valid": [...], "test": [...]}
        (default ROOT/standard_folds.json), e.g. the CMU-MOSI standard folds.
  csv   any clips: ROOT/labels.csv with columns path (relative to the CSV's folder), text, label, split, and
        optionally id (default: the path without its suffix). Numeric labels -> regression; any other label
        -> classification over the sorted label names.
"""

EXAMPLES = """examples:
  mcihn extract --layout sims --root data/CH-SIMS --out stores/sims
  mcihn extract --layout mosi --root data/CMU-MOSI --labels ../shared/data/cmu-mosi/mosi_labels.csv --out stores/mosi
  mcihn extract --layout csv --root my_clips --out stores/mine --shard 2/4     # the 2nd of 4 processes
  mcihn extract --layout sims --root data/CH-SIMS --out stores/sims-try --limit 20   # 20 clips per split
  mcihn train --data stores/sims --out runs/sims

A rerun of the same command resumes. Results per clip: STORE/.work (delete it to start over); problems per clip:
STORE/report.jsonl. Shards may run on several machines when STORE is a shared folder (or the .work/items folders
are copied together); any run that finds every clip done writes the store.
"""


class ExtractError(ValueError):
    """Bad input to `mcihn extract` (missing folder or label file, bad --shard, ...): one line, exit 2."""


@dataclass
class Item:
    """One clip to extract. `label` is a float (regression) or a class name; `extra` holds per-sample extras of
    the store (CH-SIMS unimodal labels)."""

    id: str
    video: Path
    text: str
    label: float | str
    split: str
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class ClipSet:
    """What a layout reader finds: the clips and how the store describes them."""

    name: str
    items: list[Item]
    metric_family: str = "mosi"
    task: str = "regression"
    label_names: list[str] | None = None


@dataclass
class ExtractConfig:
    layout: str
    root: Path
    out: Path
    labels: Path | None = None
    folds: Path | None = None
    name: str | None = None
    options: object = None  # engines.extractors.ExtractorOptions; None -> its defaults (imported lazily)
    metric_family: str = "auto"
    window_s: float = 2.56  # the vision window's span (mcihn.spec.WindowSpec.vision_span_s)
    text_horizon_s: float | None = None  # seconds of words before the last one; None: the whole utterance
    shard: tuple[int, int] = (1, 1)  # 1-based index, count
    limit: int | None = None  # first N clips of each split
    retry_skipped: bool = False
    progress: bool = True


@dataclass
class ExtractResult:
    total: int  # clips in the set (after --limit)
    done: int  # clips with a result (extracted or skipped), over all shards
    processed: int  # clips this run worked on
    skipped: int  # over all shards
    warned: int  # clips with a warning (no audio track, ...), over all shards
    complete: bool
    store: Path | None  # the feature store, once complete
    report: Path
    counts: dict[str, int] = field(default_factory=dict)  # per split in the store; absent modalities


# ----------------------------------------------------------------------------------------------------
# Layout readers


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ExtractError(f"label file not found: {path}; pass --labels or put it there")
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel-written CSVs start with a BOM
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise ExtractError(f"{path} lacks column(s) {', '.join(missing)} (it has: {', '.join(header) or 'none'})")
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _split(value: str, where: str) -> str:
    split = SPLIT_NAMES.get(value.strip().lower())
    if split is None:
        raise ExtractError(f"{where}: unknown split {value!r}; use train, valid (or val/dev) or test")
    return split


def _float(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ExtractError(f"{where}: label {value!r} is not a number") from None


def read_sims(root: Path, labels: Path | None = None) -> ClipSet:
    """CH-SIMS: label.csv + Raw/<video_id>/<clip_id>.mp4 (see LAYOUT_HELP)."""
    path = labels or root / "label.csv"
    rows = _read_csv(path, ("video_id", "clip_id", "text", "label", "mode"))
    unimodal = [c for c in SIMS_UNIMODAL if rows and c in rows[0]]
    items = []
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path} line {n}"
        vid, clip = row["video_id"], row["clip_id"]
        video = root / "Raw" / vid / f"{clip}.mp4"
        if not video.exists() and clip.isdigit():  # a spreadsheet may have turned 0001 into 1
            video = root / "Raw" / vid / f"{int(clip):04d}.mp4"
        extra = {SIMS_UNIMODAL[c]: _float(row[c], where) for c in unimodal}
        items.append(Item(f"{vid}$_${clip}", video, row["text"], _float(row["label"], where),
                          _split(row["mode"], where), extra))
    return ClipSet("ch-sims", items, metric_family="sims")


def _video_index(root: Path) -> dict[str, Path]:
    """Clip stem -> file under root; a file in a folder named Segmented wins over one elsewhere (Full videos)."""
    index: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
            if p.stem not in index or ("Segmented" in p.parts and "Segmented" not in index[p.stem].parts):
                index[p.stem] = p
    return index


def _mosi_transcripts(root: Path) -> dict[str, str]:
    """<video>_<segment> -> text from the SDK's segmented transcripts (MOSI .annotprocessed, MOSEI .txt)."""
    texts: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        parts = [q.lower() for q in p.relative_to(root).parts[:-1]]
        if p.suffix not in (".annotprocessed", ".txt") or not any(q.startswith("transcript") for q in parts):
            continue
        if "segmented" not in parts or not p.is_file():
            continue
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            if "_DELIM_" in line:  # MOSI: "<segment>_DELIM_<text>", the video is the file name
                seg, text = line.split("_DELIM_", 1)
                texts[f"{p.stem}_{seg.strip()}"] = text.strip()
            elif line.count("___") >= 4:  # MOSEI: "<video>___<segment>___<start>___<end>___<text>"
                video, seg, _, _, text = line.split("___", 4)
                texts[f"{video.strip()}_{seg.strip()}"] = text.strip()
    return texts


def read_mosi(root: Path, labels: Path | None = None, folds: Path | None = None) -> ClipSet:
    """CMU-MOSI / MOSEI raw layout (see LAYOUT_HELP)."""
    path = labels or root / "labels.csv"
    rows = _read_csv(path, ("id", "label"))
    video_split: dict[str, str] = {}
    if rows and "split" not in rows[0]:
        folds = folds or root / "standard_folds.json"
        if not folds.is_file():
            raise ExtractError(f"{path} has no split column and the folds file {folds} does not exist; pass "
                               f"--folds FILE (JSON {{\"train\": [video ids], \"valid\": [...], \"test\": [...]}})")
        try:
            data = json.loads(folds.read_text())
            video_split = {str(v): _split(s, str(folds)) for s, videos in data.items() for v in videos}
        except (ValueError, AttributeError, TypeError) as err:
            raise ExtractError(f"{folds} is not a folds JSON {{split: [video ids]}}: {err}") from None
    videos, texts = _video_index(root), _mosi_transcripts(root)
    items = []
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        clip_id = row["id"]
        if "split" in row:
            split = _split(row["split"], where)
        else:
            video_id = clip_id.rsplit("_", 1)[0]  # video ids may contain "_" themselves; segments never do
            if video_id not in video_split:
                raise ExtractError(f"{where}: video {video_id!r} of clip {clip_id!r} is in no fold of {folds}")
            split = video_split[video_id]
        # A clip missing on disk keeps a path that says where it was looked for; extraction reports it.
        video = videos.get(clip_id, root / "Raw" / "Video" / "Segmented" / f"{clip_id}.mp4")
        items.append(Item(clip_id, video, texts.get(clip_id, ""), _float(row["label"], where), split))
    name = "cmu-mosei" if "mosei" in str(root).lower() else "cmu-mosi"
    return ClipSet(name, items, metric_family="mosi")


def read_generic_csv(root: Path, labels: Path | None = None) -> ClipSet:
    """path, text, label, split [, id]; paths relative to the CSV's folder (see LAYOUT_HELP)."""
    path = labels or root / "labels.csv"
    rows = _read_csv(path, ("path", "text", "label", "split"))
    numeric = all(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", r["label"]) for r in rows)
    items = []
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        video = path.parent / row["path"]
        clip_id = row.get("id") or str(Path(row["path"]).with_suffix(""))
        label = float(row["label"]) if numeric else row["label"]
        items.append(Item(clip_id, video, row["text"], label, _split(row["split"], where)))
    names = None if numeric else sorted({str(it.label) for it in items})
    return ClipSet(path.parent.resolve().name or "clips", items, task="regression" if numeric else "classification",
                   label_names=names)


def read_layout(cfg: ExtractConfig) -> ClipSet:
    if not cfg.root.is_dir():
        raise ExtractError(f"--root {cfg.root} is not a folder; point it at the dataset's folder")
    if cfg.labels is not None and not cfg.labels.is_file():
        raise ExtractError(f"--labels {cfg.labels} does not exist")
    if cfg.layout == "sims":
        clips = read_sims(cfg.root, cfg.labels)
    elif cfg.layout == "mosi":
        clips = read_mosi(cfg.root, cfg.labels, cfg.folds)
    elif cfg.layout == "csv":
        clips = read_generic_csv(cfg.root, cfg.labels)
    else:
        raise ExtractError(f"unknown --layout {cfg.layout!r}; use one of {', '.join(LAYOUTS)}")
    if not clips.items:
        raise ExtractError(f"the {cfg.layout} label file lists no clips")
    seen: set[str] = set()
    for it in clips.items:
        if it.id in seen:
            raise ExtractError(f"clip id {it.id!r} appears twice in the label file; ids must be unique")
        seen.add(it.id)
    if cfg.name:
        clips.name = cfg.name
    if cfg.metric_family != "auto":
        clips.metric_family = cfg.metric_family
    return clips


def limit_per_split(items: list[Item], limit: int | None) -> list[Item]:
    """The first `limit` items of each split, in label-file order."""
    if limit is None:
        return items
    taken: dict[str, int] = {}
    kept = []
    for it in items:
        if taken.get(it.split, 0) < limit:
            taken[it.split] = taken.get(it.split, 0) + 1
            kept.append(it)
    return kept


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" (1 <= i <= n) -> (i, n)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ExtractError(f"--shard must be i/n with 1 <= i <= n (e.g. 1/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------------------------------
# Per-clip results in the work folder


def item_file(items_dir: Path, item_id: str) -> Path:
    """A file name safe on any file system (ids hold '$', '/', ...), unique through a hash of the id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)[:80]
    return items_dir / f"{safe}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}.npz"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # The temp name ends in .npz (np.savez would append it otherwise) and holds the pid (concurrent shards).
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_record(path: Path, item: Item, status: str, reason: str = "", warnings: list[str] | None = None,
                features: dict | None = None) -> None:
    """status "ok" (with features: modality -> engines.extractor.Features) or "skipped" (with a reason)."""
    arrays = {"id": np.array(item.id), "status": np.array(status), "reason": np.array(reason),
              "warnings": np.array(json.dumps(warnings or []))}
    for m, f in (features or {}).items():
        arrays[m], arrays[f"{m}_length"] = f.values.astype(np.float32), np.array(f.length, dtype=np.int64)
        arrays[f"{m}_info"] = np.array(json.dumps(f.info, default=str))
    _atomic_savez(path, arrays)


def load_record(path: Path, features: bool = False) -> dict:
    """id, status, reason, warnings, lengths (modality -> int, for "ok") and, with features=True, features
    (modality -> (values, length)). Only the members asked for are read from the npz."""
    with np.load(path, allow_pickle=False) as z:
        rec = {"id": str(z["id"]), "status": str(z["status"]), "reason": str(z["reason"]),
               "warnings": json.loads(str(z["warnings"]))}
        if rec["status"] == "ok":
            rec["lengths"] = {m: int(z[f"{m}_length"]) for m in MODALITIES}
            if features:
                rec["features"] = {m: (z[m], rec["lengths"][m]) for m in MODALITIES}
    return rec


def _absent(spec):
    from engines.extractor import Features

    return Features(np.zeros((spec.seq_len, spec.dim), np.float32), 0, {})


def clip_window(clip, transcript: str, window) -> tuple[list[np.ndarray], np.ndarray | None, str]:
    """(frames, 16 kHz audio, text) of the window at the end of a decoded clip: what the live pipeline holds when a
    replay of the clip ends (engines/window.py; decode_clip picked the frames). The audio is the whole track
    resampled by the live sources' StreamResampler (to_16k_mono), then its last `audio_samples`."""
    from engines.audio import to_16k_mono
    from engines.window import audio_in_window, transcript_in_window

    audio = audio_in_window(to_16k_mono(clip.audio, clip.sample_rate), window) if clip.has_audio else None
    return clip.frames, audio, transcript_in_window(transcript, window, clip.audio_start, clip.end)


def extract_item(item: Item, extractors: dict, window) -> tuple[str, str, list[str], dict | None]:
    """(status, reason, warnings, features) for one clip, cut by `window` (mcihn.spec.WindowSpec) at its end.
    Never raises for a bad clip: it is "skipped"."""
    from engines.audio import SAMPLE_RATE
    from engines.media import MediaError, decode_clip

    try:
        clip = decode_clip(item.video, window)
        frames, audio, text = clip_window(clip, item.text, window)
    except MediaError as err:
        return "skipped", str(err), [], None
    warnings = []
    if not clip.has_video:
        warnings.append("no video stream")
    elif not clip.frames:
        warnings.append("no decodable video frame")
    if not clip.has_audio:
        warnings.append("no audio track")
    try:
        feats = {
            "vision": extractors["vision"].extract(frames) if frames else _absent(extractors["vision"].spec),
            "text": extractors["text"].extract(text),
            "audio": (extractors["audio"].extract(audio, SAMPLE_RATE) if audio is not None
                      else _absent(extractors["audio"].spec)),
        }
    except Exception as err:  # noqa: BLE001 - one odd clip must not end a day-long run; --retry-skipped redoes it
        return "skipped", f"{item.video}: extraction failed ({type(err).__name__}: {err})", [], None
    if clip.has_audio and feats["audio"].length == 0:
        warnings.append(f"audio too short ({len(clip.audio) / clip.sample_rate:.3f} s)")
    return "ok", "", warnings, feats


# ----------------------------------------------------------------------------------------------------
# The run


def _settings(spec) -> dict:
    """What decides the features (the extractors and the window): a work folder holds results for one only."""
    return {"spec": spec.to_dict()}


def _check_settings(work: Path, settings: dict) -> None:
    path = work / "settings.json"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".settings.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, path)
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise ExtractError(f"{path} is unreadable; delete {work} to start over") from None
    if old == settings:
        return
    diff = "the extractors"
    for m in (*MODALITIES, "window"):  # older work folders: no window (frames spread over the clip)
        for key, value in settings["spec"].get(m, {}).items():
            was = (old.get("spec", {}).get(m) or {}).get(key)
            if was != value:
                diff = f"{m} {key} is {value!r} now but {was!r} there"
                break
        else:
            continue
        break
    raise ExtractError(f"{work} holds features made with other settings ({diff}); use another --out, or delete "
                       f"{work} to start over")


def _assembly_key(clips: ClipSet, items: list[Item], records: dict[str, dict], settings: dict) -> str:
    """A hash of everything the store is made from except the feature files themselves."""
    content = [clips.name, clips.metric_family, clips.task, clips.label_names, settings,
               [(it.id, it.split, it.label, it.text, it.extra, records[it.id]["status"]) for it in items]]
    return hashlib.sha1(json.dumps(content, default=str).encode()).hexdigest()


def assemble(clips: ClipSet, items: list[Item], item_paths: dict[str, Path], records: dict[str, dict], spec,
             out: Path, source: str) -> dict[str, int]:
    """Write the feature store from the finished records; returns the clip count per split."""
    from mcihn.data import SPLITS, FeatureSet, FeatureSplit, save_feature_store

    splits, extra, counts = {}, {}, {}
    extra_keys = sorted({k for it in items for k in it.extra})
    for name in SPLITS:
        chosen = [it for it in items if it.split == name and records[it.id]["status"] == "ok"]
        n = counts[name] = len(chosen)
        # Preallocated rather than stacked: a large set must fit in memory once, not twice.
        feats = {m: np.zeros((n, spec[m].seq_len, spec[m].dim), np.float32) for m in MODALITIES}
        lengths = {m: np.zeros(n, np.int64) for m in MODALITIES}
        for i, it in enumerate(chosen):
            rec = load_record(item_paths[it.id], features=True)
            for m in MODALITIES:
                feats[m][i], lengths[m][i] = rec["features"][m]
        if clips.task == "classification":
            labels = np.array([clips.label_names.index(str(it.label)) for it in chosen], dtype=np.int64)
        else:
            labels = np.array([float(it.label) for it in chosen], dtype=np.float32)
        splits[name] = FeatureSplit(feats, lengths, labels, [it.id for it in chosen], [it.text for it in chosen])
        for key in extra_keys:
            extra.setdefault(key, {})[name] = np.array([it.extra.get(key, np.nan) for it in chosen], np.float32)
    extra["source"] = source
    fs = FeatureSet(clips.name, splits, spec, task=clips.task, label_names=clips.label_names,
                    metric_family=clips.metric_family, extra=extra)
    save_feature_store(fs, out)
    return counts


def _write_report(path: Path, items: list[Item], records: dict[str, dict]) -> None:
    lines = []
    for it in items:
        rec = records.get(it.id)
        if rec is None:
            continue
        if rec["status"] == "skipped":
            lines.append({"id": it.id, "path": str(it.video), "split": it.split, "status": "skipped",
                          "reason": rec["reason"]})
        lines.extend({"id": it.id, "path": str(it.video), "split": it.split, "status": "warning", "reason": w}
                     for w in rec["warnings"])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def extract_dataset(cfg: ExtractConfig) -> ExtractResult:
    """Extract this shard's unfinished clips; write the report; assemble the store once every clip is done."""
    from tqdm.auto import tqdm

    from engines.extractors import ExtractorOptions, build_extractors, extractors_spec
    from engines.window import window_for

    clips = read_layout(cfg)
    items = limit_per_split(clips.items, cfg.limit)
    index, count = cfg.shard
    options = cfg.options or ExtractorOptions()
    extractors = build_extractors(options)
    window = window_for(options.vision_frames, extractors["audio"], cfg.window_s, cfg.text_horizon_s)
    spec = replace(extractors_spec(extractors), window=window)
    work = cfg.out / ".work"
    settings = _settings(spec)
    _check_settings(work, settings)
    items_dir = work / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    paths = {it.id: item_file(items_dir, it.id) for it in items}

    def finished(it: Item) -> bool:
        if not paths[it.id].is_file():
            return False
        return not (cfg.retry_skipped and load_record(paths[it.id])["status"] == "skipped")

    todo = [it for it in items[index - 1::count] if not finished(it)]
    start = time.perf_counter()
    skipped_now = 0
    with tqdm(todo, desc=f"extract {index}/{count}" if count > 1 else "extract", unit="clip",
              disable=not cfg.progress, file=sys.stderr) as bar:
        for it in bar:
            status, reason, warnings, feats = extract_item(it, extractors, window)
            save_record(paths[it.id], it, status, reason, warnings, feats)
            skipped_now += status == "skipped"
            bar.set_postfix(skipped=skipped_now, refresh=False)

    records = {it.id: load_record(paths[it.id]) for it in items if paths[it.id].is_file()}
    report = cfg.out / "report.jsonl"
    _write_report(report, items, records)
    result = ExtractResult(
        total=len(items), done=len(records), processed=len(todo),
        skipped=sum(r["status"] == "skipped" for r in records.values()),
        warned=sum(bool(r["warnings"]) for r in records.values()),
        complete=len(records) == len(items), store=None, report=report)
    elapsed = time.perf_counter() - start
    shard = f"shard {index}/{count}: " if count > 1 else ""
    if not result.complete:
        print(f"{shard}extracted {result.processed} clips ({skipped_now} skipped) in {elapsed:.0f} s; "
              f"{result.done} of {result.total} clips done over all shards; the store is written by the run "
              f"that finds them all done (run the other shards)", file=sys.stderr)
        return result
    key = _assembly_key(clips, items, records, settings)
    key_file = work / "assembled.json"
    up_to_date = (cfg.out / "meta.json").is_file() and key_file.is_file() and key_file.read_text() == key
    if up_to_date:
        counts = json.loads((work / "counts.json").read_text()) if (work / "counts.json").is_file() else {}
    else:
        counts = assemble(clips, items, paths, records, spec, cfg.out, f"{cfg.layout}:{cfg.root}")
        (work / "counts.json").write_text(json.dumps(counts))
        key_file.write_text(key)
    absent = {m: sum(r["status"] == "ok" and r["lengths"][m] == 0 for r in records.values()) for m in MODALITIES}
    result.store, result.counts = cfg.out, counts | {f"no {m}": n for m, n in absent.items()}
    no_audio_track = sum("no audio track" in r["warnings"] for r in records.values())
    per_split = ", ".join(f"{s} {counts.get(s, 0)}" for s in ("train", "valid", "test"))
    print(f"{'store up to date' if up_to_date else 'wrote'} {cfg.out}: {per_split} clips; {result.skipped} skipped, "
          f"{no_audio_track} without an audio track; absent: vision {absent['vision']}, text {absent['text']}, "
          f"audio {absent['audio']} (details: {report})", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="raw clips + labels -> a feature store, with the live extractors",
        description=__doc__ + "\n" + LAYOUT_HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="how the dataset folder is organised (below)")
    p.add_argument("--root", required=True, type=Path, help="the dataset folder")
    p.add_argument("--labels", type=Path, help="label file (default: by layout, under --root)")
    p.add_argument("--folds", type=Path, help="mosi layout without a split column: JSON {split: [video ids]}")
    p.add_argument("--out", required=True, type=Path, help="feature store folder to write (resumed if it exists)")
    p.add_argument("--name", help="dataset name recorded in the store (default: by layout)")
    p.add_argument("--vision", default="openai/clip-vit-base-patch32", help="CLIP vision model id or folder")
    p.add_argument("--text", help="BERT model id or folder (default: by --language)")
    p.add_argument("--language", choices=("en", "zh"),
                   help="picks the default text model: en bert-base-uncased, zh bert-base-chinese (default: zh for "
                        "sims, en otherwise)")
    p.add_argument("--audio", default="facebook/wav2vec2-base", help="Wav2Vec2 model id or folder")
    p.add_argument("--no-face-crop", action="store_true", help="embed whole frames instead of the detected face")
    p.add_argument("--audio-layer", choices=("conv", "hidden"), default="conv",
                   help="conv: the feature encoder's output (paper); hidden: the transformer's last states")
    p.add_argument("--window", type=float, default=2.56,
                   help="seconds the window's frames span, as live (default 2.56: 10 frames, one per 0.256 s); "
                        "recorded in the store and its checkpoints, whose live pipeline cuts the same window")
    p.add_argument("--text-horizon", default="utterance",
                   help="the text of the window: 'utterance' (default: the clip's whole transcript; live, the "
                        "sentence being spoken) or SECONDS of words before the last one (word times spread over "
                        "the clip: transcripts carry none)")
    p.add_argument("--metric-family", choices=("auto", "mosi", "sims"), default="auto",
                   help="regression metrics of the store (auto: sims for the sims layout, mosi otherwise)")
    p.add_argument("--shard", default="1/1", help="i/n: process every n-th clip starting at the i-th (1-based)")
    p.add_argument("--limit", type=int, help="only the first N clips of each split (a quick trial store)")
    p.add_argument("--retry-skipped", action="store_true", help="retry clips an earlier run skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_text_horizon(value: str) -> float | None:
    """--text-horizon: "utterance" -> None, else positive seconds."""
    if value.strip().lower() == "utterance":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ExtractError(f"--text-horizon must be 'utterance' or positive seconds, got {value!r}")
    return seconds


def config_from_args(args) -> ExtractConfig:
    from engines.extractors import ExtractorOptions

    if args.limit is not None and args.limit < 1:
        raise ExtractError(f"--limit must be at least 1, got {args.limit}")
    if args.window <= 0:
        raise ExtractError(f"--window must be positive seconds, got {args.window}")
    language = args.language or ("zh" if args.layout == "sims" else "en")
    options = ExtractorOptions(vision=args.vision, text=args.text, audio=args.audio, language=language,
                               face_crop=not args.no_face_crop, audio_layer=args.audio_layer)
    return ExtractConfig(layout=args.layout, root=args.root, out=args.out, labels=args.labels, folds=args.folds,
                         name=args.name, options=options, metric_family=args.metric_family,
                         window_s=args.window, text_horizon_s=parse_text_horizon(args.text_horizon),
                         shard=parse_shard(args.shard), limit=args.limit, retry_skipped=args.retry_skipped,
                         progress=not args.no_progress)


def run(args) -> int:
    """`mcihn extract`: 0 when this shard's work is done (the store too once every shard is), 2 on bad input."""
    from engines.hub import ModelNotAvailableError
    from mcihn.data import DataError

    try:
        cfg = config_from_args(args)
        extract_dataset(cfg)
    except (ExtractError, DataError, ModelNotAvailableError, ValueError, OSError) as err:
        print(f"mcihn extract: error: {err}", file=sys.stderr)
        return 2
    return 0
