"""Feature specs: what each modality's features are, so checkpoints and data can be matched.

A checkpoint records the spec of the features it was trained on; loading it against data or extractors
with a different spec is refused with a message that names the modality and the field that differ. The spec also
records the window the features were cut from (`WindowSpec`), so the live pipeline cuts the same one.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

MODALITIES: tuple[str, ...] = ("vision", "text", "audio")
# The extractor name of a modality that was never extracted (e.g. text-only features): always absent.
NOT_EXTRACTED = "absent"
# Prefix of the extractor name of features computed elsewhere by extractors that are not loadable models (the
# shared CMU-MOSI set's text CNN, openSMILE and 3D-CNN; MMSA pickles): a checkpoint on them cannot run live.
PRECOMPUTED = "precomputed:"
# Such names as checkpoints written before the prefix existed recorded them.
_LEGACY_PRECOMPUTED = ("declare-lab/3d-cnn", "declare-lab/text-cnn", "declare-lab/opensmile", "mmsa/", "unknown")


def is_precomputed(extractor: str) -> bool:
    """True when features named `extractor` came from outside the project, with no model that could make them live."""
    return extractor.startswith(PRECOMPUTED) or extractor.startswith(_LEGACY_PRECOMPUTED)


class SpecMismatchError(ValueError):
    """Features (or extractors) do not match what a checkpoint was trained on."""


@dataclass(frozen=True)
class ModalitySpec:
    """One modality's features: a (seq_len, dim) float32 sequence per sample.

    `extractor` is the model id (or a free-form name for precomputed features), `layer` which of its
    outputs is used, `preprocessing` a short description of what happens before it (face crop, resampling,
    tokenizer), `sample_rate` the input rate for audio (0 when not applicable).
    """

    dim: int
    seq_len: int
    extractor: str = "unknown"
    revision: str = ""
    layer: str = ""
    preprocessing: str = ""
    sample_rate: int = 0

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.seq_len <= 0:
            raise ValueError(f"feature dim and seq_len must be positive, got dim={self.dim} seq_len={self.seq_len}")


def context_turns(spec: ModalitySpec) -> int:
    """How many preceding utterances of the dialogue the text features were conditioned on (`mcihn extract-text
    --context K` records "+context(turns=K,...)" in the text preprocessing; engines/text.py); 0 without context."""
    match = re.search(r"\+context\(turns=(\d+)", spec.preprocessing)
    return int(match[1]) if match else 0


# Fields compared when matching features against a checkpoint. Dims and lengths are structural (the model
# cannot run otherwise); the extractor identity decides whether the features mean the same thing.
STRUCTURAL_FIELDS = ("dim", "seq_len")
IDENTITY_FIELDS = ("extractor", "revision", "layer", "preprocessing", "sample_rate")


@dataclass(frozen=True)
class WindowSpec:
    """The window features are cut from, the same in `mcihn extract` (at a clip's end) and live (at every tick).

    vision: the newest `vision_frames` frames analysed on a grid of `vision_span_s / vision_frames` seconds
    (engines/window.py `FrameGrid`) within `vision_span_s` of the window's end. audio: the newest `audio_samples`
    16 kHz samples, a whole number of Wav2Vec2 frames (41,040 = 400 + 127 x 320: 128 frames). text: the committed
    words that ended within `text_horizon_s` of the newest one, or with None the whole utterance (a dataset
    clip's transcript; live, the sentence being spoken).
    """

    vision_span_s: float = 2.56
    vision_frames: int = 10
    audio_samples: int = 41_040
    text_horizon_s: float | None = None

    def __post_init__(self) -> None:
        if self.vision_span_s <= 0 or self.vision_frames <= 0 or self.audio_samples <= 0:
            raise ValueError(f"window fields must be positive, got {self}")
        if self.text_horizon_s is not None and self.text_horizon_s <= 0:
            raise ValueError(f"the window's text horizon must be positive seconds or None, got {self.text_horizon_s}")

    @property
    def frame_interval_s(self) -> float:
        """One frame enters the window every this many seconds."""
        return self.vision_span_s / self.vision_frames

    def describe_text(self) -> str:
        return "the whole utterance" if self.text_horizon_s is None else f"{self.text_horizon_s:g} s of words"


# Fields of a WindowSpec, in the order mismatches are reported.
WINDOW_FIELDS = ("vision_span_s", "vision_frames", "audio_samples", "text_horizon_s")


@dataclass(frozen=True)
class FeatureSpec:
    """The three modalities' specs, in the fixed order vision, text, audio, and the window they were cut from.

    `window` None: features from before windows were recorded (or precomputed elsewhere). `mcihn extract` then
    spread frames over the whole clip, kept the clip's last 41,040 audio samples (the extractor's full window)
    and its whole transcript; live such a checkpoint gets `LiveConfig.window_s` of frames, the same full audio
    window and the last committed words, as before (realtime/stack.py `live_window`).
    """

    vision: ModalitySpec
    text: ModalitySpec
    audio: ModalitySpec
    extra: dict = field(default_factory=dict, compare=False)
    window: WindowSpec | None = None

    def __getitem__(self, modality: str) -> ModalitySpec:
        if modality not in MODALITIES:
            raise KeyError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
        return getattr(self, modality)

    def to_dict(self) -> dict:
        data = {m: asdict(self[m]) for m in MODALITIES}
        if self.window is not None:  # absent, not null, for older specs: they read back byte for byte
            data["window"] = asdict(self.window)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        known = {f.name for f in fields(ModalitySpec)}
        try:
            parts = {m: ModalitySpec(**{k: v for k, v in data[m].items() if k in known}) for m in MODALITIES}
        except KeyError as missing:
            raise SpecMismatchError(f"feature spec has no entry for modality {missing}") from None
        window = data.get("window")
        if window is not None:
            window = WindowSpec(**{k: v for k, v in window.items() if k in WINDOW_FIELDS})
        return cls(**parts, window=window)

    def check_matches(self, other: FeatureSpec, *, what: str = "data", structural_only: bool = False) -> None:
        """Raise SpecMismatchError naming the first modality/field where `other` differs from self.

        `self` is the reference (the checkpoint's spec); `other` is what is being offered (`what`).
        """
        names = STRUCTURAL_FIELDS if structural_only else STRUCTURAL_FIELDS + IDENTITY_FIELDS
        for modality in MODALITIES:
            mine, theirs = self[modality], other[modality]
            for name in names:
                a, b = getattr(mine, name), getattr(theirs, name)
                if a != b:
                    raise SpecMismatchError(
                        f"{what} does not match the checkpoint: {modality} {name} is {b!r} but the checkpoint "
                        f"was trained with {a!r}; use features made with the checkpoint's extractors or "
                        f"retrain on these features"
                    )
        if not structural_only:  # the window decides what the features mean, as the extractor identity does
            self.check_window(other.window, what=what)

    def check_window(self, window: WindowSpec | None, *, what: str = "data") -> None:
        """Raise SpecMismatchError naming the first window field that differs; a side without a recorded window
        (older features, or extractors, which cut no window) is not compared."""
        if self.window is None or window is None:
            return
        for name in WINDOW_FIELDS:
            a, b = getattr(self.window, name), getattr(window, name)
            if a != b:
                raise SpecMismatchError(
                    f"{what} does not match the checkpoint: window {name} is {b!r} but the checkpoint was trained "
                    f"with {a!r}; extract the features again with the checkpoint's window (mcihn extract) or "
                    f"retrain on these features"
                )
