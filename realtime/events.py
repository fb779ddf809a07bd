"""EmotionEvent: what the recognizer emits every tick, and its versioned JSON schema (docs/events.md).

Every sink (overlay, JSONL, WebSocket, OSC, LSL, callbacks) receives the same EmotionEvent; JSON sinks send
`event.to_json()`, one object per event, validated by `EVENT_SCHEMA` in the tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SCHEMA_NAME = "mcihn-live/event"
SCHEMA_VERSION = 2  # 2: per-modality scores and the models behind them (`modalities`, `fusion`)


@dataclass
class VisionPresence:
    present: bool = False
    face: list[int] | None = None  # newest face box [x, y, w, h] in frame pixels, None without a face
    frames: int = 0  # frames with a face in the window (the valid vision steps)


@dataclass
class AudioPresence:
    present: bool = False
    voiced: bool = False  # speech detected in the window (VAD), not just sound
    seconds: float = 0.0  # audio in the window


@dataclass
class TextPresence:
    present: bool = False
    text: str = ""  # committed words fused this tick
    tokens: int = 0
    tail: str = ""  # uncommitted ASR hypothesis: shown, never fused


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
    `scores` were made from them ("late fusion: ..." for the starter's experts, "mcihn: CHECKPOINT" for MCIHN).
    `scores` is empty when no modality gave a score (late fusion with no face and no words): nothing is invented.
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
            "vision": _object({"present": {"type": "boolean"}, "face": _BOX,
                               "frames": {"type": "integer", "minimum": 0}}),
            "audio": _object({"present": {"type": "boolean"}, "voiced": {"type": "boolean"},
                              "seconds": {"type": "number", "minimum": 0}}),
            "text": _object({"present": {"type": "boolean"}, "text": {"type": "string"},
                             "tokens": {"type": "integer", "minimum": 0}, "tail": {"type": "string"}}),
        }),
        "latency_ms": {"type": "object", "required": ["capture_to_emit"],
                       "additionalProperties": {"type": "number", "minimum": 0}},
        "untrained": {"type": "boolean"},
        "skipped_ticks": {"type": "integer", "minimum": 0},
        "dropped_frames": {"type": "integer", "minimum": 0},
        "modalities": _object({m: _MODALITY_SCORES for m in ("vision", "text", "audio")}),
        "fusion": {"type": "string"},
    }),
}
