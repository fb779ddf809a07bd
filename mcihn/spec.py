"""Feature specs: what each modality's features are, so checkpoints and data can be matched.

A checkpoint records the spec of the features it was trained on; loading it against data or extractors
with a different spec is refused with a message that names the modality and the field that differ.
"""

from __future__ import annotations

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


# Fields compared when matching features against a checkpoint. Dims and lengths are structural (the model
# cannot run otherwise); the extractor identity decides whether the features mean the same thing.
STRUCTURAL_FIELDS = ("dim", "seq_len")
IDENTITY_FIELDS = ("extractor", "revision", "layer", "preprocessing", "sample_rate")


@dataclass(frozen=True)
class FeatureSpec:
    """The three modalities' specs, in the fixed order vision, text, audio."""

    vision: ModalitySpec
    text: ModalitySpec
    audio: ModalitySpec
    extra: dict = field(default_factory=dict, compare=False)

    def __getitem__(self, modality: str) -> ModalitySpec:
        if modality not in MODALITIES:
            raise KeyError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
        return getattr(self, modality)

    def to_dict(self) -> dict:
        return {m: asdict(self[m]) for m in MODALITIES}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        known = {f.name for f in fields(ModalitySpec)}
        try:
            return cls(**{m: ModalitySpec(**{k: v for k, v in data[m].items() if k in known}) for m in MODALITIES})
        except KeyError as missing:
            raise SpecMismatchError(f"feature spec has no entry for modality {missing}") from None

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
