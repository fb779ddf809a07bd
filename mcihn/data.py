"""Datasets of precomputed features: the in-memory form every loader returns, and the loaders.

Every format (the shared CMU-MOSI utterance npz, MMSA toolkit pickles, the project's own feature store, MELD
and IEMOCAP transcript CSVs) is turned into a `FeatureSet`: three `FeatureSplit`s (train/valid/test) of
(N, T, D) float32 arrays per modality plus per-sample lengths. A length of 0 means the modality is absent for
that sample.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mcihn.spec import MODALITIES, NOT_EXTRACTED, PRECOMPUTED, FeatureSpec, ModalitySpec

SPLITS: tuple[str, ...] = ("train", "valid", "test")


class DataError(ValueError):
    """A dataset cannot be used as given; the message says what is wrong and how to fix it."""


@dataclass
class FeatureSplit:
    """One split. features[m]: (N, T_m, D_m) float32; lengths[m]: (N,) int64 in [0, T_m];
    labels: (N,) float32 (regression) or int64 class indices (classification)."""

    features: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    labels: np.ndarray
    ids: list[str]
    texts: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def presence(self) -> np.ndarray:
        """(N, 3) bool: which modalities each sample has, in MODALITIES order."""
        return np.stack([self.lengths[m] > 0 for m in MODALITIES], axis=1)


@dataclass
class FeatureSet:
    """A whole dataset: its splits, the spec of its features, and its task."""

    name: str
    splits: dict[str, FeatureSplit]
    spec: FeatureSpec
    task: str = "regression"  # or "classification"
    label_names: list[str] | None = None
    # "mosi" (MOSI/MOSEI metrics on [-3, 3]) or "sims" (CH-SIMS metrics on [-1, 1]);
    # classification ignores it.
    metric_family: str = "mosi"
    extra: dict = field(default_factory=dict)

    def __getitem__(self, split: str) -> FeatureSplit:
        if split not in self.splits:
            raise DataError(
                f"dataset {self.name!r} has no {split!r} split (it has: {', '.join(self.splits)})"
            )
        return self.splits[split]


def spec_from_split(split: FeatureSplit, extractors: dict[str, str] | None = None) -> FeatureSpec:
    """The structural spec (dims, sequence lengths) of a split's arrays."""
    extractors = extractors or {}
    return FeatureSpec(
        **{
            m: ModalitySpec(
                dim=int(split.features[m].shape[2]),
                seq_len=int(split.features[m].shape[1]),
                extractor=extractors.get(m, "unknown"),
            )
            for m in MODALITIES
        }
    )


# ----------------------------------------------------------------------------------------------------
# Validation

TASKS: tuple[str, ...] = ("regression", "classification")
METRIC_FAMILIES: tuple[str, ...] = ("mosi", "sims")


def validate_feature_set(fs: FeatureSet) -> FeatureSet:
    """Check that `fs` is usable for training; raise DataError (one line: what, where, how to fix) if not.

    Checks: task/metric family known; every split present and non-empty; per split the same N across
    features, lengths, labels, ids (and texts); features (N, T, D) float32 with T and D equal across splits
    and to the spec; lengths (N,) integers in [0, T]; features and labels finite; classification labels
    int64 in [0, len(label_names)). Returns `fs` so loaders can `return validate_feature_set(fs)`.
    """
    where = f"dataset {fs.name!r}"
    if fs.task not in TASKS:
        raise DataError(f"{where}: unknown task {fs.task!r}; use one of {', '.join(TASKS)}")
    if fs.metric_family not in METRIC_FAMILIES:
        raise DataError(
            f"{where}: unknown metric_family {fs.metric_family!r}; use one of {', '.join(METRIC_FAMILIES)}"
        )
    if fs.task == "classification" and not fs.label_names:
        raise DataError(f"{where}: a classification dataset needs label_names (one name per class index)")
    for name in SPLITS:
        if name not in fs.splits:
            raise DataError(
                f"{where} has no {name!r} split (it has: {', '.join(fs.splits) or 'none'}); "
                f"provide train, valid and test"
            )
        _validate_split(fs, name, fs.splits[name])
    for key, value in fs.extra.items():
        if isinstance(value, dict) and _is_split_arrays(value):
            for name in SPLITS:
                if len(value[name]) != len(fs.splits[name]):
                    raise DataError(
                        f"{where}: extra[{key!r}] has {len(value[name])} entries for split {name!r}, "
                        f"which has {len(fs.splits[name])} samples; give it one entry per sample"
                    )
    for m in MODALITIES:
        shapes = {name: fs.splits[name].features[m].shape[1:] for name in SPLITS}
        if len(set(shapes.values())) > 1:
            found = ", ".join(f"{name} (T, D)={tuple(s)}" for name, s in shapes.items())
            raise DataError(
                f"{where}: {m} features differ in shape across splits ({found}); "
                f"extract every split with the same extractor and padding length"
            )
        seq_len, dim = shapes["train"]
        if (fs.spec[m].seq_len, fs.spec[m].dim) != (seq_len, dim):
            raise DataError(
                f"{where}: spec says {m} has seq_len={fs.spec[m].seq_len} dim={fs.spec[m].dim} "
                f"but the arrays are (T, D)=({seq_len}, {dim}); rebuild the spec from the data"
            )
    return fs


def _validate_split(fs: FeatureSet, name: str, split: FeatureSplit) -> None:
    where = f"dataset {fs.name!r} split {name!r}"
    labels = split.labels
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D (N,), got shape {labels.shape}; flatten them")
    if len(labels) == 0 and len(split.ids) == 0:
        raise DataError(
            f"split {name!r} is empty: {where} has no samples; give every split at least one sample"
        )
    n = len(split.ids)
    counts = {"ids": n, "labels": len(labels)}
    if split.texts is not None:
        counts["texts"] = len(split.texts)
    for m in MODALITIES:
        if m not in split.features or m not in split.lengths:
            raise DataError(
                f"{where} has no {m} features or lengths; every split needs all of "
                f"{', '.join(MODALITIES)} (use length 0 for absent samples)"
            )
        feats, lengths = split.features[m], split.lengths[m]
        if feats.ndim != 3 or feats.dtype != np.float32:
            raise DataError(
                f"{where}: {m} features must be a 3-D float32 array (N, T, D), got "
                f"{feats.ndim}-D {feats.dtype}; reshape/convert with .astype(np.float32)"
            )
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise DataError(
                f"{where}: {m} lengths must be a 1-D integer array (N,), got {lengths.ndim}-D {lengths.dtype}"
            )
        counts[f"{m} features"], counts[f"{m} lengths"] = feats.shape[0], lengths.shape[0]
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise DataError(f"{where}: sample counts differ ({found}); every array needs one entry per sample")
    for m in MODALITIES:
        feats, lengths = split.features[m], split.lengths[m]
        bad = (lengths < 0) | (lengths > feats.shape[1])
        if bad.any():
            raise DataError(
                f"{where}: {int(bad.sum())} {m} lengths lie outside [0, {feats.shape[1]}] "
                f"(first id {split.ids[int(np.argmax(bad))]!r}); clip them to the padded length"
            )
        _check_finite(feats.reshape(n, -1), f"{where}: {m} features", split.ids)
    if fs.task == "regression":
        if not np.issubdtype(labels.dtype, np.floating):
            raise DataError(
                f"{where}: regression labels must be float32, got {labels.dtype}; "
                f"or set task='classification' with label_names"
            )
        _check_finite(labels.reshape(n, 1), f"{where}: labels", split.ids)
    else:
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{where}: classification labels must be int64 class indices, got {labels.dtype}")
        n_classes = len(fs.label_names or [])
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            raise DataError(
                f"{where}: {int(bad.sum())} labels lie outside [0, {n_classes}) for label_names "
                f"{fs.label_names}; fix the labels or add the missing class names"
            )


# ----------------------------------------------------------------------------------------------------
# Sentiment as classes

# MOSI-family sentiment ([-3, 3]) binned into classes, as MMSA's Acc-2 and Acc-7 bin it (mcihn/metrics.py), so a
# classifier (MCN-CL) can train on it and its accuracy is those metrics. target -> class names.
SENTIMENT_TARGETS: dict[str, list[str]] = {
    "acc2-non0": ["negative", "positive"],  # y < 0 vs y > 0; samples labelled exactly 0 are dropped
    "acc2-has0": ["negative", "non-negative"],  # y < 0 vs y >= 0; every sample kept
    "acc7": ["-3", "-2", "-1", "0", "1", "2", "3"],  # round(clip(y, -3, 3)), half to even as Acc-7
}


def _sentiment_class(labels: np.ndarray, target: str) -> np.ndarray:
    """(N,) int64 class indices of (N,) sentiment values for `target` (acc2-non0 maps 0 to 1; callers drop it)."""
    if target == "acc7":
        # The same expression as metrics' Acc-7 on the same dtype, so class and metric agree on every tie.
        return (np.round(np.clip(labels, -3.0, 3.0)) + 3).astype(np.int64)
    return (labels >= 0).astype(np.int64)


def _subset(split: FeatureSplit, keep: np.ndarray) -> FeatureSplit:
    texts = None if split.texts is None else [t for t, k in zip(split.texts, keep, strict=True) if k]
    return FeatureSplit({m: f[keep] for m, f in split.features.items()},
                        {m: n[keep] for m, n in split.lengths.items()}, split.labels[keep],
                        [i for i, k in zip(split.ids, keep, strict=True) if k], texts)


def sentiment_classes(fs: FeatureSet, target: str) -> FeatureSet:
    """`fs` (MOSI-family regression: CMU-MOSI, MOSEI) with its sentiment binned into the classes of `target`
    (SENTIMENT_TARGETS), so classifiers train on it; `extra["target"]` records the target. DataError for other
    data (classification sets already have classes; CH-SIMS's [-1, 1] scale has other bins)."""
    if target not in SENTIMENT_TARGETS:
        raise DataError(f"unknown --target {target!r}; use one of {', '.join(SENTIMENT_TARGETS)}")
    if fs.task != "regression" or fs.metric_family != "mosi":
        kind = fs.task if fs.task != "regression" else f"{fs.metric_family} regression"
        raise DataError(f"--target {target} bins MOSI-family sentiment in [-3, 3]; dataset {fs.name!r} is {kind} "
                        f"data: drop --target")
    splits, extra = {}, {k: v for k, v in fs.extra.items() if not (isinstance(v, dict) and _is_split_arrays(v))}
    for name, split in fs.splits.items():
        keep = split.labels != 0 if target == "acc2-non0" else np.ones(len(split), dtype=bool)
        sub = _subset(split, keep)
        sub.labels = _sentiment_class(sub.labels, target)
        splits[name] = sub
        for key, value in fs.extra.items():  # per-sample extras follow their samples
            if isinstance(value, dict) and _is_split_arrays(value):
                extra.setdefault(key, {})[name] = np.asarray(value[name])[keep]
    binned = FeatureSet(f"{fs.name}-{target}", splits, fs.spec, "classification", list(SENTIMENT_TARGETS[target]),
                        fs.metric_family, extra | {"target": target})
    return validate_feature_set(binned)


def _check_finite(values: np.ndarray, what: str, ids: list[str]) -> None:
    """values: (N, K). Raise DataError counting the NaN/inf values and the samples holding them."""
    finite = np.isfinite(values)
    if finite.all():
        return
    bad_rows = ~finite.all(axis=1)
    raise DataError(
        f"{what} have {int((~finite).sum())} NaN/inf values in {int(bad_rows.sum())} samples "
        f"(first id {ids[int(np.argmax(bad_rows))]!r}); fix the extractor output or drop those "
        f"samples"
    )


# ----------------------------------------------------------------------------------------------------
# The shared CMU-MOSI utterance npz

MOSI_NPZ_KEYS: tuple[str, ...] = ("ids", "split", "text_raw", "text", "audio", "video", "label")
# Which npz key holds each modality, and what produced it (see the data folder's README).
_MOSI_NPZ_SOURCES: dict[str, tuple[str, str]] = {
    "vision": ("video", PRECOMPUTED + "declare-lab/3d-cnn"),
    "text": ("text", PRECOMPUTED + "declare-lab/text-cnn"),
    "audio": ("audio", PRECOMPUTED + "declare-lab/opensmile"),
}


def load_mosi_npz(path: str | os.PathLike) -> FeatureSet:
    """The shared CMU-MOSI utterance-level npz: one vector per utterance, so T = 1 for every modality.

    Returns vision (N, 1, 100) from "video", text (N, 1, 100), audio (N, 1, 73), all lengths 1, float32
    sentiment labels in [-3, 3]; splits from the file's "split" column (1284 / 229 / 686).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MOSI npz not found: {path}; check the path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in MOSI_NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path} is not a MOSI utterance npz: missing keys {', '.join(missing)} "
                    f"(expected {', '.join(MOSI_NPZ_KEYS)})"
                )
            arrays = {k: npz[k] for k in MOSI_NPZ_KEYS}
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"cannot read {path} as an npz without pickle: {err}") from None
    n = arrays["ids"].shape[0]
    for key in ("text", "audio", "video"):
        if arrays[key].ndim != 2 or arrays[key].shape[0] != n:
            raise DataError(
                f"{path}: {key!r} must be (N={n}, D) with one vector per utterance, "
                f"got shape {arrays[key].shape}"
            )
    split_col = arrays["split"].astype(str)
    unknown = sorted(set(split_col) - set(SPLITS))
    if unknown:
        raise DataError(
            f"{path}: unknown split names {unknown}; the 'split' column may hold only {', '.join(SPLITS)}"
        )
    splits = {}
    for name in SPLITS:
        rows = np.flatnonzero(split_col == name)
        splits[name] = FeatureSplit(
            # (N, D) -> (N, 1, D): a sequence of one step.
            features={
                m: arrays[key][rows, None, :].astype(np.float32) for m, (key, _) in _MOSI_NPZ_SOURCES.items()
            },
            lengths={m: np.ones(len(rows), dtype=np.int64) for m in MODALITIES},
            labels=arrays["label"][rows].astype(np.float32),
            ids=[str(i) for i in arrays["ids"][rows]],
            texts=[str(t) for t in arrays["text_raw"][rows]],
        )
    spec = spec_from_split(splits["train"], {m: src for m, (_, src) in _MOSI_NPZ_SOURCES.items()})
    fs = FeatureSet(
        name="cmu-mosi-utterance", splits=splits, spec=spec, task="regression", metric_family="mosi"
    )
    return validate_feature_set(fs)


# ----------------------------------------------------------------------------------------------------
# MMSA toolkit pickles (MOSI / MOSEI / CH-SIMS)

# MMSA names the per-sample length arrays after the modality; vision is "vision" there too.
_MMSA_UNIMODAL_LABELS: tuple[str, ...] = ("regression_labels_T", "regression_labels_A", "regression_labels_V")


def load_mmsa_pickle(
    path: str | os.PathLike, *, allow_pickle: bool = False, name: str | None = None
) -> FeatureSet:
    """An MMSA toolkit feature pickle: {split: {text, audio, vision, *_lengths, regression_labels, id, ...}}.

    text (N, Tt, Dt), audio (N, Ta, Da), vision (N, Tv, Dv) become float32 features. Lengths come from
    `<modality>_lengths` (clipped to T; 0 = absent) or, where absent (text always in MMSA), from the last
    row that is not all zero (MMSA pads with zeros). Unpickling runs arbitrary code from the file, so it is
    refused unless `allow_pickle=True`. CH-SIMS unimodal labels go to `extra["regression_labels_T"]` etc.
    as {split: (N,) float32}.
    """
    path = Path(path)
    if not allow_pickle:
        raise DataError(
            f"refusing to unpickle {path}: loading a pickle can run arbitrary code; if you trust "
            f"the file, pass allow_pickle=True (CLI: --allow-pickle) or convert it once to a "
            f"feature store with save_feature_store"
        )
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f)
    except FileNotFoundError:
        raise DataError(f"MMSA pickle not found: {path}; check the path") from None
    except Exception as err:  # a corrupt or foreign pickle can raise nearly anything
        raise DataError(f"cannot unpickle {path}: {type(err).__name__}: {err}") from None
    if not isinstance(raw, dict) or any(s not in raw for s in SPLITS):
        found = ", ".join(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(
            f"{path} is not an MMSA feature pickle: expected a dict with keys train, valid, test, "
            f"found {found}"
        )
    name = name or _mmsa_default_name(path)
    extra: dict = {"source": str(path)}
    splits = {s: _mmsa_split(raw[s], f"{path} split {s!r}", extra, s) for s in SPLITS}
    for key in _MMSA_UNIMODAL_LABELS:
        if all(key in raw[s] for s in SPLITS):
            extra[key] = {s: np.asarray(raw[s][key], dtype=np.float32).reshape(-1) for s in SPLITS}
    labels = np.concatenate([splits[s].labels for s in SPLITS])
    # Only the file name and its two parent folders (MMSA's SIMS/Processed/x.pkl), not the whole path.
    looks_sims = "sims" in "/".join(path.resolve().parts[-3:]).lower() or "regression_labels_T" in extra
    in_unit_range = labels.size > 0 and float(np.nanmin(labels)) >= -1 and float(np.nanmax(labels)) <= 1
    spec = spec_from_split(splits["train"], {m: f"{PRECOMPUTED}mmsa/{name}" for m in MODALITIES})
    fs = FeatureSet(
        name=name,
        splits=splits,
        spec=spec,
        task="regression",
        metric_family="sims" if looks_sims and in_unit_range else "mosi",
        extra=extra,
    )
    return validate_feature_set(fs)


def _mmsa_default_name(path: Path) -> str:
    """The default name: "mmsa-<stem>", with the dataset folder added when the file name alone does not
    say which dataset it is (MMSA's MOSI/Processed/unaligned_50.pkl layout)."""
    stem = path.stem.lower()
    datasets = ("mosi", "mosei", "sims")
    if not any(d in stem for d in datasets):
        for part in reversed(path.resolve().parts[-3:-1]):
            if any(d in part.lower() for d in datasets):
                return f"mmsa-{part.lower()}-{stem}"
    return f"mmsa-{stem}"


def _mmsa_split(raw: dict, where: str, extra: dict, split_name: str) -> FeatureSplit:
    if "text" not in raw and "text_bert" in raw:
        raise DataError(
            f"{where} has only 'text_bert', which holds BERT token ids, not features; use an MMSA "
            f"pickle with precomputed text features"
        )
    missing = [k for k in ("text", "audio", "vision", "regression_labels", "id") if k not in raw]
    if missing:
        raise DataError(
            f"{where} lacks {', '.join(missing)}; an MMSA feature pickle needs text, audio, vision, "
            f"regression_labels and id"
        )
    features, lengths = {}, {}
    for m in MODALITIES:
        arr = np.asarray(raw[m])
        if arr.ndim != 3:
            raise DataError(f"{where}: {m} must be (N, T, D), got shape {arr.shape}")
        if m == "text" and _looks_like_token_ids(arr):
            raise DataError(
                f"{where}: 'text' is (N, 3, L) integer data, i.e. BERT token ids/masks (MMSA's "
                f"text_bert), not features; extract text features first or use a feature pickle"
            )
        try:
            arr = arr.astype(np.float32)
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}: {m} is not numeric ({arr.dtype}): {err}") from None
        if m == "audio":
            # MMSA's own loader zeroes -inf audio values (COVAREP log-energies of silence); do the same.
            neg_inf = np.isneginf(arr)
            if neg_inf.any():
                arr[neg_inf] = 0.0
                extra.setdefault("audio_neg_inf_zeroed", {})[split_name] = int(neg_inf.sum())
        features[m] = arr
        key = f"{m}_lengths"
        if key in raw:
            lens = np.asarray(raw[key], dtype=np.int64).reshape(-1)
            lengths[m] = np.minimum(lens, arr.shape[1])  # MMSA lengths can exceed the padded T
        else:
            lengths[m] = _padded_lengths(arr)
    labels = np.asarray(raw["regression_labels"], dtype=np.float32).reshape(-1)
    texts = [str(t) for t in raw["raw_text"]] if "raw_text" in raw else None
    return FeatureSplit(
        features=features, lengths=lengths, labels=labels, ids=[str(i) for i in raw["id"]], texts=texts
    )


def _looks_like_token_ids(arr: np.ndarray) -> bool:
    """MMSA's text_bert is (N, 3, L): token ids, attention mask, segment ids, all non-negative integers."""
    return arr.shape[1] == 3 and arr.size > 0 and bool(np.all(arr >= 0) and np.all(np.mod(arr, 1) == 0))


def _padded_lengths(arr: np.ndarray) -> np.ndarray:
    """(N, T, D) zero-padded at the end -> (N,) int64: 1 + index of the last row that is not all zero,
    0 when every row is zero. Counting to the last non-zero row keeps a stray zero row mid-sequence."""
    nonzero = np.any(arr != 0, axis=2)  # (N, T)
    last = arr.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Transcript CSVs with emotion labels (MELD, IEMOCAP): texts, labels and dialogue order, no feature arrays.
# Every modality is stored absent (length 0, extractor "absent"); `mcihn extract-text` encodes the texts.

MELD_FILES: dict[str, str] = {"train": "train_sent_emo.csv", "valid": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
MELD_COLUMNS: tuple[str, ...] = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
IEMOCAP_FILE = "iemocap_text.csv"
IEMOCAP_COLUMNS: tuple[str, ...] = ("dialogue_id", "utterance_index", "speaker", "text", "label", "split")
# IEMOCAP's 6 classes in the order of the `label` column (0-5), as COSMIC/DialogueRNN number them.
IEMOCAP_LABELS: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "excited", "frustrated")
_SPLIT_ALIASES: dict[str, str] = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid",
                                  "dev": "valid", "test": "test"}
# Typographic punctuation -> ASCII, so dataset transcripts tokenise like live ASR text (which writes "'").
_TYPOGRAPHIC = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
    "\u2026": "...", "\u00a0": " ", "\u200b": "", "\ufeff": "",
})
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]{2,}")


def _cp1252_bytes(run: str) -> bytes | None:
    """The bytes a run of characters came from when UTF-8 was read as cp1252 (latin-1 for the 5 bytes cp1252
    leaves undefined), or None when some character cannot have come from a single byte."""
    out = bytearray()
    for ch in run:
        try:
            out += ch.encode("cp1252")
        except UnicodeEncodeError:
            if ord(ch) > 0xFF:
                return None
            out.append(ord(ch))
    return bytes(out)


def _undo_mojibake(match: re.Match) -> str:
    run = match.group(0)
    for _ in range(2):  # twice-garbled text ("Ã¢â‚¬â„¢") takes two rounds
        raw = _cp1252_bytes(run)
        if raw is None:
            break
        try:
            fixed = raw.decode("utf-8")
        except UnicodeDecodeError:
            break
        if fixed == run:
            break
        run = fixed
    return run


def clean_transcript(text: str) -> str:
    """A transcript as the text extractor should see it; never raises.

    Bytes that were not UTF-8 (read with surrogateescape) become their cp1252 character; UTF-8 that was read as
    cp1252/latin-1 ("â€™", "â\\x80\\x99") is decoded back; stray C1 control characters are read as cp1252;
    typographic quotes, dashes and ellipses become ASCII (what ASR output uses); whitespace is collapsed.
    """
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = "".join(bytes([ord(ch) - 0xDC00]).decode("cp1252", errors="replace") if "\udc80" <= ch <= "\udcff"
                       else ch for ch in text)
    text = _NON_ASCII_RUN.sub(_undo_mojibake, text)
    text = "".join(bytes([ord(ch)]).decode("cp1252", errors="ignore") if "\x80" <= ch <= "\x9f" else ch
                   for ch in text)
    return " ".join(text.translate(_TYPOGRAPHIC).split())


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts; undecodable bytes are kept (surrogateescape) for clean_transcript."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as err:
        raise DataError(f"{path} is not a readable CSV file: {err}") from None
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(header) or 'none'})")
    rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in rows]
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return rows


def _row_int(row: dict[str, str], column: str, where: str) -> int:
    try:
        return int(float(row[column].strip()))
    except ValueError:
        raise DataError(f"{where}: {column} is {row[column]!r}, not an integer") from None


def _text_only_split(labels: list[int], ids: list[str], texts: list[str]) -> FeatureSplit:
    """A split with texts and labels and every modality absent (a (N, 1, 1) zero array, length 0)."""
    n = len(labels)
    return FeatureSplit(
        features={m: np.zeros((n, 1, 1), dtype=np.float32) for m in MODALITIES},
        lengths={m: np.zeros(n, dtype=np.int64) for m in MODALITIES},
        labels=np.asarray(labels, dtype=np.int64), ids=ids, texts=texts,
    )


def _text_only_set(name: str, splits: dict[str, FeatureSplit], label_names: tuple[str, ...],
                   speakers: dict[str, list[str]], source: Path) -> FeatureSet:
    absent = ModalitySpec(dim=1, seq_len=1, extractor=NOT_EXTRACTED, preprocessing="not extracted (transcripts only)")
    fs = FeatureSet(
        name=name, splits=splits, spec=FeatureSpec(vision=absent, text=absent, audio=absent),
        task="classification", label_names=list(label_names),
        extra={"source": str(source), "speaker": {s: np.asarray(v, dtype=str) for s, v in speakers.items()}},
    )
    return validate_feature_set(fs)


def load_meld_csv(path: str | os.PathLike, name: str = "meld") -> FeatureSet:
    """MELD's train/dev/test_sent_emo.csv (a folder holding them, or any one of them): dev is the valid split.

    Labels are indices into mcihn.emotions.EMOTIONS; ids are "d<Dialogue_ID>_u<Utterance_ID>" in file order, so
    a context model can rebuild the dialogues; texts go through clean_transcript; speakers go to
    extra["speaker"]. Every modality is absent: run `mcihn extract-text` for features.
    """
    from mcihn.emotions import EMOTIONS

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    missing = [str(folder / f) for f in MELD_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DataError(f"MELD file missing: {', '.join(missing)}; a MELD folder holds "
                        f"{', '.join(MELD_FILES.values())}")
    splits, speakers = {}, {}
    for split, file_name in MELD_FILES.items():
        file = folder / file_name
        labels, ids, texts, who = [], [], [], []
        for i, row in enumerate(_read_csv(file, MELD_COLUMNS), 1):
            where = f"{file} row {i}"
            emotion = row["Emotion"].strip().lower()
            if emotion not in EMOTIONS:
                raise DataError(f"{where}: unknown emotion {row['Emotion']!r}; MELD's are {', '.join(EMOTIONS)}")
            labels.append(EMOTIONS.index(emotion))
            ids.append(f"d{_row_int(row, 'Dialogue_ID', where)}_u{_row_int(row, 'Utterance_ID', where)}")
            texts.append(clean_transcript(row["Utterance"]))
            who.append(clean_transcript(row["Speaker"]))
        splits[split], speakers[split] = _text_only_split(labels, ids, texts), who
    return _text_only_set(name, splits, EMOTIONS, speakers, folder)


def load_iemocap_csv(path: str | os.PathLike, name: str = "iemocap") -> FeatureSet:
    """iemocap_text.csv (or the folder holding it): its `split` column gives train/valid/test (test = session 5),
    `label` the class index into IEMOCAP_LABELS (checked against the `emotion` column when there is one).

    ids are "<dialogue_id>_u<utterance_index>" in file order; texts go through clean_transcript.
    """
    path = Path(path)
    file = path / IEMOCAP_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"IEMOCAP file missing: {file}")
    rows: dict[str, tuple[list, list, list, list]] = {s: ([], [], [], []) for s in SPLITS}
    for i, row in enumerate(_read_csv(file, IEMOCAP_COLUMNS), 1):
        where = f"{file} row {i}"
        split = _SPLIT_ALIASES.get(row["split"].strip().lower())
        if split is None:
            raise DataError(f"{where}: unknown split {row['split']!r}; use train, valid (or dev) or test")
        label = _row_int(row, "label", where)
        if not 0 <= label < len(IEMOCAP_LABELS):
            raise DataError(f"{where}: label {label} is outside 0-{len(IEMOCAP_LABELS) - 1} "
                            f"({', '.join(IEMOCAP_LABELS)})")
        emotion = row.get("emotion", "").strip().lower()
        if emotion and emotion != IEMOCAP_LABELS[label]:
            raise DataError(f"{where}: label {label} is {IEMOCAP_LABELS[label]!r} but the emotion column says "
                            f"{row['emotion']!r}")
        labels, ids, texts, who = rows[split]
        labels.append(label)
        ids.append(f"{row['dialogue_id'].strip()}_u{_row_int(row, 'utterance_index', where)}")
        texts.append(clean_transcript(row["text"]))
        who.append(clean_transcript(row["speaker"]))
    empty = [s for s, r in rows.items() if not r[0]]
    if empty:
        raise DataError(f"{file} has no rows for split(s) {', '.join(empty)}; its split column needs train, "
                        f"valid and test")
    splits = {s: _text_only_split(*r[:3]) for s, r in rows.items()}
    return _text_only_set(name, splits, IEMOCAP_LABELS, {s: r[3] for s, r in rows.items()}, file)


_UTTERANCE_ID = re.compile(r"^(?P<dialogue>.+)_u(?P<index>\d+)$")


def dialogue_context(ids: list[str], texts: list[str], turns: int) -> list[list[str]]:
    """For each utterance, the texts of at most `turns` utterances before it in the same dialogue, the newest
    first: the dialogue context of `mcihn extract-text --context` (docs/mcn_cl.md, "Dialogue context").

    ids are "<dialogue>_u<index>" (load_meld_csv, load_iemocap_csv), within one split (MELD numbers its dialogues
    per split); an utterance's context is the utterances of its dialogue with a smaller index, whatever the order
    of `ids`: never a later utterance, never another dialogue's. Utterances without words are skipped.
    """
    if len(ids) != len(texts):
        raise DataError(f"{len(ids)} ids but {len(texts)} texts")
    dialogues: dict[str, list[tuple[int, str]]] = {}
    keys = []
    for uid, text in zip(ids, texts, strict=True):
        match = _UTTERANCE_ID.match(str(uid))
        if match is None:
            raise DataError(f"utterance id {uid!r} does not name its dialogue and turn (<dialogue>_u<index>), so "
                            f"dialogue context cannot be rebuilt; --context needs MELD or IEMOCAP transcripts")
        key = (match["dialogue"], int(match["index"]))
        keys.append(key)
        dialogues.setdefault(key[0], []).append((key[1], text))
    for turns_of in dialogues.values():
        turns_of.sort(key=lambda t: t[0])
        indices = [i for i, _ in turns_of]
        if len(set(indices)) < len(indices):
            raise DataError(f"two utterances share an id in one dialogue ({indices}); ids must be unique")
    contexts = []
    for dialogue, index in keys:
        before = [text for i, text in dialogues[dialogue] if i < index and text.strip()]
        contexts.append(before[::-1][:turns] if turns > 0 else [])
    return contexts


def _csv_format(path: Path) -> str | None:
    """"meld-csv" or "iemocap-csv" from a CSV file's header, None when it is neither."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            header = {c.strip() for c in next(csv.reader(f), [])}
    except (OSError, csv.Error):
        return None
    if set(MELD_COLUMNS) <= header:
        return "meld-csv"
    if set(IEMOCAP_COLUMNS) <= header:
        return "iemocap-csv"
    return None


# ----------------------------------------------------------------------------------------------------
# The project's feature store: a directory of .npy/.json files, no pickle anywhere.

STORE_FORMAT = "mcihn-feature-store"
STORE_VERSION = 1


def save_feature_store(fs: FeatureSet, directory: str | os.PathLike) -> Path:
    """Write `fs` (validated first) as a feature store; returns the directory.

    Layout: meta.json plus one folder per split with <modality>.npy (N, T, D) float32,
    <modality>_lengths.npy (N,) int64, labels.npy, ids.json, texts.json (if any) and extra.<key>.npy for
    per-split extras (e.g. CH-SIMS unimodal labels). Every file goes to a temp name and is renamed into
    place, and meta.json is written last, so an interrupted write never looks like a complete store.
    """
    validate_feature_set(fs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    split_extra = {k: v for k, v in fs.extra.items() if isinstance(v, dict) and _is_split_arrays(v)}
    for name in SPLITS:
        save_split(fs.splits[name], directory / name, {k: v[name] for k, v in split_extra.items()})
    other_extra = {k: v for k, v in fs.extra.items() if k not in split_extra}
    meta = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "name": fs.name,
        "task": fs.task,
        "metric_family": fs.metric_family,
        "label_names": fs.label_names,
        "spec": fs.spec.to_dict(),
        "split_extra": sorted(split_extra),
        "extra": other_extra,
    }
    try:
        text = json.dumps(meta, indent=2)
    except TypeError as err:
        raise DataError(
            f"cannot save dataset {fs.name!r}: extra holds values JSON cannot store ({err}); keep "
            f"extra to JSON values or {{split: array}} dicts"
        ) from None
    _atomic_write(directory / "meta.json", lambda f: f.write(text.encode()))
    return directory


def save_split(
    split: FeatureSplit, directory: str | os.PathLike, extra: dict[str, np.ndarray] | None = None
) -> None:
    """Write one split's files into `directory` (created if needed); see save_feature_store for the layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"{m}.npy": split.features[m] for m in MODALITIES}
    arrays |= {f"{m}_lengths.npy": split.lengths[m].astype(np.int64) for m in MODALITIES}
    arrays["labels.npy"] = split.labels
    arrays |= {f"extra.{k}.npy": v for k, v in (extra or {}).items()}
    for fname, arr in arrays.items():
        _atomic_write(
            directory / fname, lambda f, a=arr: np.save(f, np.ascontiguousarray(a), allow_pickle=False)
        )
    _atomic_write(directory / "ids.json", lambda f: f.write(json.dumps(list(split.ids)).encode()))
    if split.texts is not None:
        _atomic_write(directory / "texts.json", lambda f: f.write(json.dumps(list(split.texts)).encode()))


def load_feature_store(directory: str | os.PathLike, mmap: bool = False) -> FeatureSet:
    """Read a feature store written by save_feature_store; strict about format, dtypes and completeness.

    With mmap=True the feature arrays are memory-mapped read-only instead of read into memory.
    """
    directory = Path(directory)
    meta = _read_json(directory / "meta.json", directory, dict)
    if meta.get("format") != STORE_FORMAT:
        raise DataError(
            f"{directory}/meta.json has format {meta.get('format')!r}, not {STORE_FORMAT!r}; "
            f"this is not an mcihn feature store"
        )
    if meta.get("version") != STORE_VERSION:
        raise DataError(
            f"{directory}: feature store version {meta.get('version')!r} is not supported (this "
            f"mcihn reads version {STORE_VERSION}); upgrade mcihn or re-extract the features"
        )
    missing = [k for k in ("name", "task", "metric_family", "label_names", "spec") if k not in meta]
    if missing:
        raise DataError(
            f"{directory}/meta.json lacks {', '.join(missing)}; re-write it with save_feature_store"
        )
    try:
        spec = FeatureSpec.from_dict(meta["spec"])
    except (TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{directory}/meta.json has an invalid spec: {err}") from None
    splits, extra = {}, dict(meta.get("extra") or {})
    split_extra = meta.get("split_extra") or []
    for name in SPLITS:
        split_dir = directory / name
        if not split_dir.is_dir():
            raise DataError(
                f"feature store {directory} has no {name!r} split folder; write all of "
                f"{', '.join(SPLITS)} before meta.json"
            )
        splits[name] = _load_split(split_dir, mmap)
        for key in split_extra:
            extra.setdefault(key, {})[name] = _load_npy(split_dir / f"extra.{key}.npy", mmap)
    fs = FeatureSet(
        name=meta["name"],
        splits=splits,
        spec=spec,
        task=meta["task"],
        label_names=meta["label_names"],
        metric_family=meta["metric_family"],
        extra=extra,
    )
    return validate_feature_set(fs)


def _load_split(split_dir: Path, mmap: bool) -> FeatureSplit:
    features = {m: _load_npy(split_dir / f"{m}.npy", mmap) for m in MODALITIES}
    lengths = {m: _load_npy(split_dir / f"{m}_lengths.npy", mmap) for m in MODALITIES}
    for m in MODALITIES:
        if lengths[m].dtype != np.int64:
            raise DataError(
                f"{split_dir / f'{m}_lengths.npy'} holds {lengths[m].dtype}, not int64; "
                f"re-write the store with save_feature_store"
            )
    texts_path = split_dir / "texts.json"
    return FeatureSplit(
        features=features,
        lengths=lengths,
        labels=_load_npy(split_dir / "labels.npy", mmap),
        ids=_read_json(split_dir / "ids.json", split_dir, list),
        texts=_read_json(texts_path, split_dir, list) if texts_path.exists() else None,
    )


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"feature store file missing: {path}; re-run the extraction or save_feature_store")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read {path} (corrupt, or an object array that needs pickle): {err}"
        ) from None


def _read_json(path: Path, where: Path, kind: type) -> object:
    if not path.is_file():
        raise DataError(f"feature store file missing: {path}; {where} is not a complete feature store")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot parse {path}: {err}") from None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        expected = "a list of strings" if kind is list else "a JSON object"
        raise DataError(f"{path} must hold {expected}")
    return value


def _is_split_arrays(value: dict) -> bool:
    return set(value) == set(SPLITS) and all(isinstance(v, np.ndarray) for v in value.values())


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via a temp file in the same folder and os.replace, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Format detection and the single entry point

FORMATS: tuple[str, ...] = ("mosi-npz", "mmsa-pickle", "store", "meld-csv", "iemocap-csv")


def detect_format(path: str | os.PathLike) -> str:
    """ "store" for a directory with meta.json, "mosi-npz" for .npz, "mmsa-pickle" for .pkl/.pickle, "meld-csv"
    for a folder with MELD's CSVs or one of them, "iemocap-csv" for iemocap_text.csv or its folder (CSV files
    are told apart by their header)."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return "store"
        if (path / MELD_FILES["train"]).is_file():
            return "meld-csv"
        if (path / IEMOCAP_FILE).is_file():
            return "iemocap-csv"
        raise DataError(
            f"{path} is a directory without meta.json, so not a feature store; point at a store, "
            f"an .npz or a .pkl file (or a folder of MELD/IEMOCAP transcript CSVs)"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "mosi-npz"
    if suffix in (".pkl", ".pickle"):
        return "mmsa-pickle"
    if suffix == ".csv" and (fmt := _csv_format(path)):
        return fmt
    raise DataError(
        f"cannot tell the format of {path} from its name; pass one of {', '.join(FORMATS)} "
        f"(.npz -> mosi-npz, .pkl/.pickle -> mmsa-pickle, folder with meta.json -> store, MELD/IEMOCAP "
        f"transcript .csv -> meld-csv/iemocap-csv by their columns)"
    )


def load_dataset(path: str | os.PathLike, fmt: str = "auto", *, allow_pickle: bool = False) -> FeatureSet:
    """Load any supported dataset; fmt is "auto" or one of FORMATS. Returns a validated FeatureSet."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}; check the path (formats: {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "mosi-npz":
        return load_mosi_npz(path)
    if fmt == "mmsa-pickle":
        return load_mmsa_pickle(path, allow_pickle=allow_pickle)
    if fmt == "store":
        return load_feature_store(path)
    if fmt == "meld-csv":
        return load_meld_csv(path)
    if fmt == "iemocap-csv":
        return load_iemocap_csv(path)
    raise DataError(f"unknown dataset format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
