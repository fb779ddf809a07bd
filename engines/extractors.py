"""Building the three extractors from options or from a checkpoint's feature spec, and checking them against it.

The paper's setup (section 4.3) is the default: CLIP ViT-B/32 image embeddings (10 x 512), BERT token features
(36 x 768), Wav2Vec2 convolutional features (128 x 512). Every model id may also be a local folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.extractor import Extractor
from mcihn.spec import MODALITIES, FeatureSpec

TEXT_MODEL_BY_LANGUAGE = {"en": "bert-base-uncased", "zh": "bert-base-chinese"}


@dataclass
class ExtractorOptions:
    """Which models to use and how. `text=None` picks BERT by `language` (en: bert-base-uncased, zh:
    bert-base-chinese)."""

    vision: str = "openai/clip-vit-base-patch32"
    text: str | None = None
    audio: str = "facebook/wav2vec2-base"
    language: str = "en"
    face_crop: bool = True
    face_detector: str = "blazeface"  # or "haar" (engines.vision.face_detector_named)
    audio_layer: str = "conv"  # "conv": the paper's 512-d feature-encoder output; "hidden": transformer states
    vision_frames: int = 10
    text_tokens: int = 36
    audio_frames: int = 128

    def __post_init__(self) -> None:
        if self.text is None:
            if self.language not in TEXT_MODEL_BY_LANGUAGE:
                raise ValueError(f"no default text model for language {self.language!r}; pass a text model id "
                                 f"or one of {', '.join(TEXT_MODEL_BY_LANGUAGE)}")
            self.text = TEXT_MODEL_BY_LANGUAGE[self.language]
        if self.audio_layer not in ("conv", "hidden"):
            raise ValueError(f"audio layer must be 'conv' or 'hidden', got {self.audio_layer!r}")

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> ExtractorOptions:
        """The options that reproduce a checkpoint's features (its spec records model ids, layers, lengths)."""
        return cls(
            vision=spec.vision.extractor,
            text=spec.text.extractor,
            audio=spec.audio.extractor,
            face_crop="face" in spec.vision.preprocessing,
            face_detector=_face_detector(spec.vision.preprocessing),
            audio_layer="hidden" if spec.audio.layer == "last_hidden_state" else "conv",
            vision_frames=spec.vision.seq_len,
            text_tokens=spec.text.seq_len,
            audio_frames=spec.audio.seq_len,
        )


def _face_detector(preprocessing: str) -> str:
    """The detector a spec's vision preprocessing names ("blazeface-face-crop(...)+..."; older specs: haar)."""
    return preprocessing.split("-face-crop")[0] if "-face-crop" in preprocessing else "blazeface"


def build_extractor(modality: str, options: ExtractorOptions) -> Extractor:
    """One extractor (loads its model: raises engines.hub.ModelNotAvailableError when it cannot)."""
    if modality == "vision":
        from engines.vision import VisionExtractor

        return VisionExtractor(options.vision, face_crop=options.face_crop, seq_len=options.vision_frames,
                               face_detector=options.face_detector)
    if modality == "text":
        from engines.text import TextExtractor

        return TextExtractor(options.text, seq_len=options.text_tokens)
    if modality == "audio":
        from engines.audio import AudioExtractor

        return AudioExtractor(options.audio, layer=options.audio_layer, seq_len=options.audio_frames)
    raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")


def build_extractors(options: ExtractorOptions | None = None) -> dict[str, Extractor]:
    """modality -> extractor, in MODALITIES order."""
    options = options or ExtractorOptions()
    return {m: build_extractor(m, options) for m in MODALITIES}


def extractors_spec(extractors: dict[str, Extractor]) -> FeatureSpec:
    """The feature spec the extractors produce (what `mcihn extract` writes and checkpoints record)."""
    return FeatureSpec(**{m: extractors[m].spec for m in MODALITIES})


def check_extractors(checkpoint_spec: FeatureSpec, extractors: dict[str, Extractor]) -> None:
    """Refuse extractors that do not produce the checkpoint's features: SpecMismatchError naming the modality
    and the field (model id, revision, layer, dims, sequence length, preprocessing, sample rate)."""
    checkpoint_spec.check_matches(extractors_spec(extractors), what="the extractors given")
