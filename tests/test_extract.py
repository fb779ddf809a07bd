"""`mcihn extract` and engines/media.py on a small CH-SIMS-layout folder built at test time.

Clips: the astronaut photo (a real face) or blank frames, with espeak-ng speech (a synthetic voice-like tone
where espeak-ng is missing) muxed in by write_clip; plus a corrupt .mp4 and a clip without an audio track.
Extractors: the tiny stand-in models (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import wave
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.media import MediaError, decode_clip, write_clip
from mcihn.data import load_feature_store
from mcihn.spec import MODALITIES, WindowSpec
from tools import extract

FPS = 8
HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (Debian: apt install espeak-ng)")

# (video_id, clip_id, text, label, mode, kind); kind: face | blank (no face) | noaudio | corrupt
CLIPS = [
    ("video_0001", "0001", "i really like this movie", 0.8, "train", "face"),
    ("video_0001", "0002", "this is very bad", -0.6, "train", "face"),
    ("video_0002", "0001", "okay i think", 0.0, "train", "blank"),
    ("video_0002", "0002", "so happy", 1.0, "valid", "face"),
    ("video_0003", "0001", "i hate it", -1.0, "valid", "noaudio"),
    ("video_0003", "0002", "good story", 0.4, "test", "face"),
    ("video_0004", "0001", "sad people", -0.4, "test", "blank"),
    ("video_0004", "0002", "corrupt", 0.2, "test", "corrupt"),
]
SKIPPED_ID = "video_0004$_$0002"
NO_AUDIO_ID = "video_0003$_$0001"


def speech(text: str, folder: Path) -> tuple[np.ndarray, int]:
    """int16 mono speech from espeak-ng (22050 Hz), or a 1.5 s voice-like tone without it."""
    if HAS_ESPEAK:
        wav = folder / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        with wave.open(str(wav), "rb") as w:
            return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).copy(), w.getframerate()
    rate = 16000
    t = np.arange(int(1.5 * rate)) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (voice / np.abs(voice).max() * 12000).astype(np.int16), rate


def face_frames(n: int) -> list[np.ndarray]:
    from skimage import data

    face = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (256, 256))
    return [np.roll(face, 2 * i, axis=1) for i in range(n)]  # a little motion, the face stays in view


def build_sims(root: Path) -> Path:
    rows = ["video_id,clip_id,text,label,label_T,label_A,label_V,annotation,mode"]
    for vid, clip, text, label, mode, kind in CLIPS:
        path = root / "Raw" / vid / f"{clip}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.append(f"{vid},{clip},{text},{label},{label},{-label},{label / 2},"
                    f"{'Positive' if label > 0 else 'Negative'},{mode}")
        if kind == "corrupt":
            path.write_bytes(np.random.default_rng(0).bytes(4096))
            continue
        audio, rate = speech(text, root)
        n = max(4, int(len(audio) / rate * FPS))
        frames = face_frames(n) if kind != "blank" else [np.full((256, 256, 3), 128, np.uint8)] * n
        write_clip(path, frames, FPS, audio=None if kind == "noaudio" else audio, sample_rate=rate)
    (root / "label.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def sims_root(tmp_path_factory) -> Path:
    return build_sims(tmp_path_factory.mktemp("ch-sims"))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mcihn")
    extract.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["extract", *argv])


def sims_args(root: Path, out: Path, models: dict[str, Path], *extra: str) -> argparse.Namespace:
    return parse("--layout", "sims", "--root", str(root), "--out", str(out), "--vision", str(models["vision"]),
                 "--text", str(models["text"]), "--audio", str(models["audio"]), "--no-progress", *extra)


@pytest.fixture(scope="module")
def full_store(sims_root, standin_models, tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("stores") / "sims"
    return out, extract.run(sims_args(sims_root, out, standin_models))


def report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = load_feature_store(a), load_feature_store(b)
    assert fa.spec == fb.spec
    for split in ("train", "valid", "test"):
        sa, sb = fa[split], fb[split]
        assert sa.ids == sb.ids and sa.texts == sb.texts
        np.testing.assert_array_equal(sa.labels, sb.labels)
        for m in MODALITIES:
            np.testing.assert_array_equal(sa.lengths[m], sb.lengths[m])
            np.testing.assert_allclose(sa.features[m], sb.features[m], atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# engines/media.py


def test_decode_clip_picks_the_live_windows_frames_and_keeps_audio(tmp_path):
    audio = (np.sin(2 * np.pi * 220 * np.arange(24000) / 16000) * 0.5).astype(np.float32)  # 1.5 s
    frames = [np.full((64, 96, 3), 10 * i, np.uint8) for i in range(20)]  # frame i (t = i / 10) has grey 10 i
    write_clip(tmp_path / "a.mp4", frames, 10, audio=audio, sample_rate=16000)
    clip = decode_clip(tmp_path / "a.mp4")
    assert clip.has_video and clip.has_audio and clip.sample_rate == 16000
    assert clip.end == pytest.approx(1.9)  # the newest frame (the audio ends before it)
    # The default window: one frame per 0.256 s on a grid from 0 (the first frame at or after each grid time),
    # as the live vision worker analyses them; all eight lie within 2.56 s of the end.
    expected = [0.0, 0.3, 0.6, 0.8, 1.1, 1.3, 1.6, 1.8]
    assert [f.shape for f in clip.frames] == [(64, 96, 3)] * 8 and clip.frames[0].dtype == np.uint8
    np.testing.assert_allclose(clip.times, expected, atol=1e-6)
    np.testing.assert_allclose([f.mean() for f in clip.frames], [100 * t for t in expected], atol=6)
    assert abs(len(clip.audio) - len(audio)) < 2048  # AAC adds priming/padding samples
    assert np.abs(clip.audio).max() == pytest.approx(0.5, abs=0.05)
    # A window of 4 frames over 1 s: one per 0.25 s, the newest four.
    short = decode_clip(tmp_path / "a.mp4", WindowSpec(vision_span_s=1.0, vision_frames=4))
    np.testing.assert_allclose(short.times, [1.0, 1.3, 1.5, 1.8], atol=1e-6)


def test_decode_clip_reports_missing_streams_and_rejects_bad_files(tmp_path):
    write_clip(tmp_path / "silent.mp4", [np.zeros((32, 32, 3), np.uint8)] * 4, 8)
    silent = decode_clip(tmp_path / "silent.mp4")
    # 8 fps for 0.5 s: the frames at 0 and 0.375 s are the first at or after the grid times 0 and 0.256 s.
    assert silent.audio is None and silent.sample_rate == 0 and silent.times == [0.0, 0.375]
    write_clip(tmp_path / "voice.m4a", [], 8, audio=np.zeros(8000, np.float32), sample_rate=16000)
    voice = decode_clip(tmp_path / "voice.m4a")
    assert not voice.has_video and voice.frames == [] and voice.has_audio
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    for name in ("bad.mp4", "missing.mp4"):
        with pytest.raises(MediaError) as err:
            decode_clip(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


@needs_espeak
def test_espeak_speech_survives_the_mp4_round_trip(tmp_path):
    samples, rate = speech("hello there", tmp_path)
    write_clip(tmp_path / "s.mp4", face_frames(8), FPS, audio=samples, sample_rate=rate)
    clip = decode_clip(tmp_path / "s.mp4")
    assert clip.sample_rate == rate == 22050
    ref = samples.astype(np.float32) / 32768
    # Sample-aligned (PyAV drops AAC's priming samples) and close to the original despite the lossy codec.
    n = min(len(ref), len(clip.audio))
    assert len(clip.audio) - len(ref) < 1024
    assert np.corrcoef(ref[:n], clip.audio[:n])[0, 1] > 0.95


# ----------------------------------------------------------------------------------------------------
# mcihn extract


def test_extract_sims_writes_a_store_and_reports_problem_clips(full_store, standin_models):
    out, code = full_store
    assert code == 0
    fs = load_feature_store(out)
    assert fs.metric_family == "sims" and fs.task == "regression"
    assert {s: len(fs[s]) for s in ("train", "valid", "test")} == {"train": 3, "valid": 2, "test": 2}
    from engines.extractors import ExtractorOptions, build_extractors, extractors_spec

    options = ExtractorOptions(vision=str(standin_models["vision"]), text=str(standin_models["text"]),
                               audio=str(standin_models["audio"]))
    assert fs.spec == replace(extractors_spec(build_extractors(options)), window=WindowSpec())
    assert fs.spec.window == WindowSpec(vision_span_s=2.56, vision_frames=10, audio_samples=41_040)  # recorded
    for split in fs.splits.values():
        for m in MODALITIES:
            assert split.features[m].shape == (len(split), fs.spec[m].seq_len, fs.spec[m].dim)
    lengths = {i: {m: int(s.lengths[m][k]) for m in MODALITIES} for s in fs.splits.values() for k, i in
               enumerate(s.ids)}
    assert SKIPPED_ID not in lengths
    kinds = {f"{v}$_${c}": kind for v, c, _, _, _, kind in CLIPS}
    for clip_id, got in lengths.items():
        assert got["text"] > 0
        assert (got["vision"] > 0) == (kinds[clip_id] != "blank"), clip_id
        assert (got["audio"] > 0) == (kinds[clip_id] != "noaudio"), clip_id
    assert lengths[NO_AUDIO_ID]["audio"] == 0
    # Texts, labels and CH-SIMS unimodal labels come from label.csv.
    train = fs["train"]
    assert train.texts[0] == "i really like this movie" and train.labels[0] == pytest.approx(0.8)
    np.testing.assert_allclose(fs.extra["regression_labels_A"]["train"], -train.labels)
    lines = {(r["id"], r["status"]): r for r in report(out)}
    assert "cannot open" in lines[(SKIPPED_ID, "skipped")]["reason"]
    assert lines[(SKIPPED_ID, "skipped")]["path"].endswith("video_0004/0002.mp4")
    assert lines[(NO_AUDIO_ID, "warning")]["reason"] == "no audio track"
    assert len(lines) == 2


def test_train_runs_on_the_extracted_store(full_store, tmp_path):
    from tools.cli import main

    out, _ = full_store
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), "--epochs", "2"]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()


def test_two_shards_make_the_same_store_as_one_run(full_store, sims_root, standin_models, tmp_path):
    out = tmp_path / "sharded"
    first = extract.extract_dataset(extract.config_from_args(sims_args(sims_root, out, standin_models,
                                                                       "--shard", "1/2")))
    assert not first.complete and first.processed == 4 and not (out / "meta.json").exists()
    second = extract.extract_dataset(extract.config_from_args(sims_args(sims_root, out, standin_models,
                                                                        "--shard", "2/2")))
    assert second.complete and second.processed == 4 and second.skipped == 1
    assert_same_store(full_store[0], out)
    assert sorted(map(json.dumps, report(out))) == sorted(map(json.dumps, report(full_store[0])))


def test_a_rerun_resumes_where_an_interrupted_run_stopped(full_store, sims_root, standin_models, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "resumed"
    limited = extract.extract_dataset(extract.config_from_args(sims_args(sims_root, out, standin_models,
                                                                         "--limit", "1")))
    assert limited.complete and limited.processed == 3 and limited.counts["train"] == 1  # a 1-per-split store
    calls = []
    real = extract.extract_item

    def interrupted(item, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(item.id)
        return real(item, *args)

    monkeypatch.setattr(extract, "extract_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract.extract_dataset(extract.config_from_args(sims_args(sims_root, out, standin_models)))
    monkeypatch.setattr(extract, "extract_item", real)
    done_before = 3 + len(calls)
    resumed = extract.extract_dataset(extract.config_from_args(sims_args(sims_root, out, standin_models)))
    assert resumed.processed == len(CLIPS) - done_before and resumed.complete
    assert_same_store(full_store[0], out)
    again = extract.extract_dataset(extract.config_from_args(sims_args(sims_root, out, standin_models)))
    assert again.processed == 0 and again.complete


def test_other_extractor_settings_are_refused_for_an_existing_work_folder(full_store, sims_root, standin_models,
                                                                         capsys):
    out, _ = full_store
    assert extract.run(sims_args(sims_root, out, standin_models, "--no-face-crop")) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "vision preprocessing" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    ({"--root": "missing"}, "is not a folder"),
    ({"--labels": "nowhere.csv"}, "does not exist"),
    ({"--shard": "3/2"}, "--shard must be i/n"),
    ({"--shard": "0/2"}, "--shard must be i/n"),
    ({"--limit": "0"}, "--limit must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(change, message, sims_root, tmp_path, capsys):
    argv = {"--layout": "sims", "--root": str(sims_root), "--out": str(tmp_path / "o"), "--text": "unused"}
    argv |= {k: str(tmp_path / v) if k in ("--root", "--labels") else v for k, v in change.items()}
    assert extract.run(parse(*[x for kv in argv.items() for x in kv])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------
# The other layouts' readers


def test_mosi_raw_layout_reads_sdk_transcripts_and_standard_folds(tmp_path):
    seg = tmp_path / "Raw" / "Video" / "Segmented"
    seg.mkdir(parents=True)
    for clip in ("I5y0__X72p0_1", "I5y0__X72p0_2", "03bSnISJMiM_1"):
        (seg / f"{clip}.mp4").write_bytes(b"")
    (tmp_path / "Raw" / "Video" / "Full").mkdir()
    (tmp_path / "Raw" / "Video" / "Full" / "I5y0__X72p0_1.mp4").write_bytes(b"")  # Segmented wins
    transcripts = tmp_path / "Raw" / "Transcript" / "Segmented"
    transcripts.mkdir(parents=True)
    (transcripts / "I5y0__X72p0.annotprocessed").write_text("1_DELIM_i liked it\n2_DELIM_not at all\n")
    mosei = tmp_path / "Transcript" / "Segmented" / "Combined"
    mosei.mkdir(parents=True)
    (mosei / "03bSnISJMiM.txt").write_text("03bSnISJMiM___1___0.5___3.2___a mosei line\n")
    (tmp_path / "labels.csv").write_text("id,label\nI5y0__X72p0_1,2.4\nI5y0__X72p0_2,-1.2\n03bSnISJMiM_1,0.5\n")
    folds = tmp_path / "folds.json"
    folds.write_text(json.dumps({"train": ["I5y0__X72p0"], "valid": [], "test": ["03bSnISJMiM"]}))
    clips = extract.read_mosi(tmp_path, folds=folds)
    assert clips.metric_family == "mosi"
    got = {it.id: (it.text, it.label, it.split, it.video.relative_to(tmp_path).as_posix()) for it in clips.items}
    assert got == {
        "I5y0__X72p0_1": ("i liked it", 2.4, "train", "Raw/Video/Segmented/I5y0__X72p0_1.mp4"),
        "I5y0__X72p0_2": ("not at all", -1.2, "train", "Raw/Video/Segmented/I5y0__X72p0_2.mp4"),
        "03bSnISJMiM_1": ("a mosei line", 0.5, "test", "Raw/Video/Segmented/03bSnISJMiM_1.mp4"),
    }
    with pytest.raises(extract.ExtractError, match="--folds"):
        extract.read_mosi(tmp_path)  # no split column and no standard_folds.json under the root


def test_mosi_labels_with_a_split_column_like_the_shared_mosi_labels(tmp_path):
    (tmp_path / "labels.csv").write_text("id,split,label\nabc_1,train,1.0\nabc_2,val,0.0\nabc_3,test,-2\n")
    clips = extract.read_mosi(tmp_path)
    assert [(it.split, it.text) for it in clips.items] == [("train", ""), ("valid", ""), ("test", "")]


def test_generic_csv_layout_paths_relative_to_the_csv_and_class_labels(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "clips.csv").write_text(
        "path,text,label,split\nclips/a.mp4,hi,joy,train\nclips/b.mp4,,anger,valid\nclips/c.mp4,yo,joy,test\n")
    clips = extract.read_generic_csv(tmp_path, tmp_path / "meta" / "clips.csv")
    assert clips.task == "classification" and clips.label_names == ["anger", "joy"]
    assert clips.items[0].video == tmp_path / "meta" / "clips" / "a.mp4" and clips.items[0].id == "clips/a"
    (tmp_path / "labels.csv").write_text("path,text,label,split\na.mp4,x,0.5,train\n")
    assert extract.read_generic_csv(tmp_path).task == "regression"
    (tmp_path / "labels.csv").write_text("path,text,label,split\na.mp4,x,0.5,holdout\n")
    with pytest.raises(extract.ExtractError, match="unknown split 'holdout'"):
        extract.read_generic_csv(tmp_path)
