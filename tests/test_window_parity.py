"""Train/serve parity of the window (issue 14): the features `mcihn extract` stores for a clip equal those the live
pipeline computes when a replay of the same clip ends, per modality.

The clip: a moving face at 10 fps for 3.4 s (longer than the 2.56 s window, so the cut matters) and a 22.05 kHz
voice-like tone (so the resampler matters). Live side: the file source's decoding (realtime/file_source.py
media_items) replayed offline into the AudioRing and the VisionWorker (realtime/replay.py), the window the stack
derives from the store's spec (realtime/stack.py live_window), and the reads the tick makes. Text: the live text
window's encoder given the words the ASR would commit (a random stand-in Whisper commits no real words).
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from engines.media import write_clip
from mcihn.data import load_feature_store
from mcihn.spec import MODALITIES, FeatureSpec, ModalitySpec, WindowSpec
from tools import extract

TEXT = "i really like this movie"
FPS, SECONDS, RATE = 10, 3.4, 22_050


def make_clip(path):
    from skimage import data

    face = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (256, 256))
    frames = [np.roll(face, 3 * i, axis=1) for i in range(int(SECONDS * FPS))]  # frames differ: picks matter
    t = np.arange(int((SECONDS - 0.1) * RATE)) / RATE
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    write_clip(path, frames, FPS, audio=(0.3 * voice / np.abs(voice).max()).astype(np.float32), sample_rate=RATE)
    return path


@pytest.fixture(scope="module")
def extracted(standin_models, tmp_path_factory):
    """(the clip, the store `mcihn extract` wrote for it)."""
    root = tmp_path_factory.mktemp("parity")
    make_clip(root / "clip.mp4")
    rows = [f"{split}_clip,clip.mp4,{TEXT},0.5,{split}" for split in ("train", "valid", "test")]
    (root / "labels.csv").write_text("id,path,text,label,split\n" + "\n".join(rows) + "\n")
    out = root / "store"
    args = ["--layout", "csv", "--root", str(root), "--out", str(out), "--no-progress", "--no-face-crop"]
    args += [x for m in MODALITIES for x in (f"--{m}", str(standin_models[m]))]
    assert extract.run(_parse(args)) == 0
    return root / "clip.mp4", load_feature_store(out)


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="mcihn")
    extract.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["extract", *argv])


def replay_live(clip, spec, hop_s: float = 0.25):
    """The live pipeline at the end of an offline replay of `clip`, for a checkpoint of `spec`: (features per
    modality, the window). The extractors are built from the spec, as realtime/stack.py does."""
    from engines.extractors import ExtractorOptions, build_extractors
    from realtime.buffers import SAMPLE_RATE, AudioRing
    from realtime.clock import MediaClock
    from realtime.config import LiveConfig
    from realtime.faults import Faults
    from realtime.replay import OfflineReplay
    from realtime.stack import live_window
    from realtime.vision_worker import VisionWorker
    from realtime.windows import TextWindow, VisionWindow

    extractors = build_extractors(ExtractorOptions.from_spec(spec))
    window, scope = live_window(spec, LiveConfig(source=str(clip), speed=0), extractors["audio"])
    clock, ring, done = MediaClock(), AudioRing(), threading.Event()
    vision_window = VisionWindow(spec.vision.seq_len, spec.vision.dim, window.vision_span_s)
    vision = VisionWorker(extractors["vision"], vision_window, clock, report=pytest.fail)
    replay = OfflineReplay(str(clip), hop_s, clock, ring, vision, None, lambda t: None, Faults(done),
                           threading.Event(), done)
    replay.start()
    replay.join(60)
    assert done.is_set()
    now = clock.now()
    # The reads the tick makes (realtime/tick.py).
    samples, _, _ = ring.read_last_indexed(window.audio_samples / SAMPLE_RATE, now=now, grace_s=hop_s)
    text_window = TextWindow(extractors["text"])
    assert scope == "utterance"
    text_window.update(TEXT)  # what AsrWorker.last_utterance() gives once the sentence is committed
    feats = {"vision": vision_window.snapshot(now)[0], "text": text_window.latest()[1],
             "audio": extractors["audio"].extract(samples, SAMPLE_RATE)}
    return feats, window


def test_extracted_features_equal_the_live_window_at_the_clips_end(extracted):
    clip, store = extracted
    assert store.spec.window == WindowSpec()  # recorded: 10 frames over 2.56 s, 41,040 samples, the utterance
    live, window = replay_live(clip, store.spec)
    assert window == store.spec.window
    stored = store["train"]
    for m in MODALITIES:
        length = int(stored.lengths[m][0])
        assert live[m].length == length, f"{m}: live {live[m].length} steps, stored {length}"
        np.testing.assert_allclose(live[m].values, stored.features[m][0], atol=1e-4, err_msg=m)
    assert stored.lengths["audio"][0] == 128  # whole Wav2Vec2 frames: 41,040 samples
    assert stored.lengths["vision"][0] == 10


def test_an_old_spec_without_a_window_loads_and_gets_the_window_it_had(extracted):
    """A spec written before windows were recorded reads back without one, and live gets the former window
    (with the audio rounded up to whole frames: the 128 that extraction always cut)."""
    from realtime.config import ConfigError, LiveConfig
    from realtime.stack import live_window

    _, store = extracted
    old = {m: {k: v for k, v in d.items()} for m, d in store.spec.to_dict().items() if m != "window"}
    spec = FeatureSpec.from_dict(old)
    assert spec.window is None and spec.to_dict() == old

    class Audio:  # wav2vec2-base's geometry
        receptive_field, hop, window_samples = 400, 320, 41_040

    window, scope = live_window(spec, LiveConfig(), Audio())
    assert (window.vision_span_s, window.audio_samples, scope) == (2.56, 41_040, "window")
    # A recorded window is what live cuts: another --window is refused in one line naming the field.
    with pytest.raises(ConfigError, match="vision_span_s") as err:
        live_window(store.spec, LiveConfig(window_s=3.0), Audio())
    assert "\n" not in str(err.value)


def test_a_store_cut_with_another_window_is_refused_naming_the_field():
    from mcihn.spec import SpecMismatchError

    part = ModalitySpec(dim=4, seq_len=10)
    trained = FeatureSpec(part, part, part, window=WindowSpec())
    with pytest.raises(SpecMismatchError, match="window audio_samples is 40960"):
        trained.check_matches(FeatureSpec(part, part, part, window=WindowSpec(audio_samples=40_960)))
    trained.check_matches(FeatureSpec(part, part, part))  # no window recorded: not compared
