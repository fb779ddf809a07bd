"""EmotionEvent: what the recognizer emits every tick, and its versioned JSON schema (docs/events.md).

Every sink (overlay, JSONL, WebSocket, OSC, LSL, callbacks) receives the same EmotionEvent; JSON sinks send
`event.to_json()`, one object per event, validated by `EVENT_SCHEMA` in the tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SCHEMA_NAME = "mcihn-live/event"
SCHEMA_VERSION = 3  # 2: each modality's own scores and models; 3: freshness (fresh/now/fused/age_s) and faults


# Per modality: `fresh` (its input is arriving: frames, samples or words newer than its freshness limit),
# `present` (what the window holds: faces, audio, words; stale input is absent), `fused` (it went into the scores
# this tick), `age_s` (seconds since its newest input was captured; None before any), and for vision and audio
# `now` (a face in the newest frame; voice in the last hop), which is what a live display should show.


@dataclass
class VisionPresence:
    present: bool = False  # a face in the window's frames (all newer than the window)
    face: list[int] | None = None  # the face box [x, y, w, h] in the newest frame, None when it has no face
    frames: int = 0  # frames with a face in the window (the valid vision steps)
    now: bool = False  # a face in the newest frame, analysed within the last two frame intervals
    fresh: bool = False
    fused: bool = False
    age_s: float | None = None


@dataclass
class AudioPresence:
    present: bool = False  # audio in the window (only samples newer than the window count)
    voiced: bool = False  # speech detected in the window (VAD), not just sound
    seconds: float = 0.0  # audio in the window
    now: bool = False  # speech in the last hop
    fresh: bool = False
    fused: bool = False
    age_s: float | None = None


@dataclass
class TextPresence:
    present: bool = False  # committed words within the text horizon
    text: str = ""  # committed words fused this tick
    tokens: int = 0
    tail: str = ""  # uncommitted ASR hypothesis: shown, never fused
    fresh: bool = False
    fused: bool = False
    age_s: float | None = None  # since the end of the newest committed word


@dataclass
class Presence:
    vision: VisionPresence = field(default_factory=VisionPresence)
    audio: AudioPresence = field(default_factory=AudioPresence)
    text: TextPresence = field(default_factory=TextPresence)


@dataclass
class ModalityScores:
    """One modality's own emotion scores this tick and the model that gave them.

    scores: {label: probability} from this modality alone, or None when it gave none this tick (absent, or no
    model scores it on its own: voice in the starter; every modality under MCIHN's joint fusion, whose extractors
    only make features). model: the model that scored it (or, under MCIHN, the extractor of its features);
    None when nothing runs on it."""

    scores: dict[str, float] | None = None
    model: str | None = None


def _no_modalities() -> dict[str, ModalityScores]:
    return {m: ModalityScores() for m in ("vision", "text", "audio")}


@dataclass
class EmotionEvent:
    """One tick's result.

    seq: 0, 1, 2, ... per session (gaps never: skipped ticks emit nothing and are counted in `skipped_ticks`).
    t_media: media time in seconds of the newest input fused (device clock mapped to the session start, or the
    file's own time). t_wall: Unix time at emit. t_mono: time.monotonic() at emit (the clock every item is
    stamped with). scores: regression -> {"valence": v}; classification -> {label: probability}. untrained:
    True when the models are random stand-ins (the demo): the scores mean nothing. latency_ms: per stage,
    "capture_to_emit" from the capture of the newest input used to the emit, plus "vision", "audio", "text",
    "fusion" (this tick's work) and "asr" (the last ASR pass), each in milliseconds. skipped_ticks, dropped_frames:
    totals since the session start (not per event); a consumer that wants a rate takes differences.
    modalities: vision/text/audio -> ModalityScores (each modality's own scores, and its model). fusion: how
    `scores` were made from them ("late fusion: ..." for the starter's experts, "mcihn: CHECKPOINT" for MCIHN,
    "mcn-cl: CHECKPOINT" for MCN-CL).
    `scores` is empty when no modality gave a score (late fusion with no face and no words): nothing is invented.
    faults: what failed since the previous event (a camera unplugged, speech recognition stopped, ...), each once.
    """

    seq: int
    t_media: float
    t_wall: float
    t_mono: float
    head: str
    scores: dict[str, float]
    presence: Presence
    latency_ms: dict[str, float]
    untrained: bool = False
    skipped_ticks: int = 0
    dropped_frames: int = 0
    modalities: dict[str, ModalityScores] = field(default_factory=_no_modalities)
    fusion: str = ""
    faults: list[str] = field(default_factory=list)  # faults met since the previous event, one line each
    schema: str = SCHEMA_NAME
    version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_FRESHNESS = {"fresh": _BOOL, "fused": _BOOL, "age_s": {"type": ["number", "null"], "minimum": 0}}
_MODALITY_SCORES = _object({
    "scores": {"oneOf": [{"type": "null"}, {"type": "object", "additionalProperties": _NUMBER, "minProperties": 1}]},
    "model": {"type": ["string", "null"]},
})
_BOX = {"oneOf": [{"type": "null"}, {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4}]}

EVENT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": f"mcihn-live EmotionEvent, version {SCHEMA_VERSION}",
    **_object({
        "schema": {"const": SCHEMA_NAME},
        "version": {"const": SCHEMA_VERSION},
        "seq": {"type": "integer", "minimum": 0},
        "t_media": _NUMBER,
        "t_wall": _NUMBER,
        "t_mono": _NUMBER,
        "head": {"enum": ["regression", "classification"]},
        "scores": {"type": "object", "additionalProperties": _NUMBER},
        "presence": _object({
            "vision": _object({"present": _BOOL, "face": _BOX, "frames": {"type": "integer", "minimum": 0},
                               "now": _BOOL, **_FRESHNESS}),
            "audio": _object({"present": _BOOL, "voiced": _BOOL, "seconds": {"type": "number", "minimum": 0},
                              "now": _BOOL, **_FRESHNESS}),
            "text": _object({"present": _BOOL, "text": {"type": "string"},
                             "tokens": {"type": "integer", "minimum": 0}, "tail": {"type": "string"},
                             **_FRESHNESS}),
        }),
        "latency_ms": {"type": "object", "required": ["capture_to_emit"],
                       "additionalProperties": {"type": "number", "minimum": 0}},
        "untrained": {"type": "boolean"},
        "skipped_ticks": {"type": "integer", "minimum": 0},
        "dropped_frames": {"type": "integer", "minimum": 0},
        "modalities": _object({m: _MODALITY_SCORES for m in ("vision", "text", "audio")}),
        "fusion": {"type": "string"},
        "faults": {"type": "array", "items": {"type": "string"}},
    }),
}


SCHEMA_FILE = "event.schema.json"  # EVENT_SCHEMA as a file, shipped in the package for consumers in any language

if __name__ == "__main__":  # python -m realtime.events > realtime/event.schema.json
    print(json.dumps(EVENT_SCHEMA, indent=2))
