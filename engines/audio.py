"""Audio features: Wav2Vec2 frames of the last seconds of audio (128 x 512 with wav2vec2-base, about 2.56 s).

Audio is mixed to mono and resampled to 16 kHz (`to_16k_mono`, shared with the live microphone source), the last
window that yields `seq_len` frames is kept, normalised as Wav2Vec2FeatureExtractor does, and run through the
model. The paper's features are the 512-d output of the convolutional feature encoder (layer "conv", the model
output `extract_features`); "hidden" gives the transformer's `last_hidden_state` instead. The convolutional
encoder makes one frame per 320 samples (20 ms) from a 400-sample receptive field.
"""

from __future__ import annotations

import json
from math import gcd
from pathlib import Path

import numpy as np
import torch
from scipy.signal import resample_poly
from torch import nn

from engines.extractor import EngineModel, Extractor, Features, pack_window
from engines.hub import ModelNotAvailableError, ModelSource, load_pretrained, resolve_model
from mcihn.spec import ModalitySpec

SAMPLE_RATE = 16_000
LAYERS = {"conv": "extract_features", "hidden": "last_hidden_state"}


def to_mono_float32(samples: np.ndarray) -> np.ndarray:
    """(N,) or (N, channels) PCM -> (N,) float32 mono in -1..1: signed integers scaled by their full scale (int16
    by 1/32768), unsigned 8-bit centred on 128, floats as they are; channels averaged. The live sources use it
    on every block (realtime/buffers.py), datasets on whole clips."""
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be (samples,) or (samples, channels), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    elif np.issubdtype(x.dtype, np.unsignedinteger):  # 8-bit WAV: unsigned, centred on 128
        half = float(2 ** (8 * x.dtype.itemsize - 1))
        x = (x.astype(np.float32) - half) / half
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    else:
        raise ValueError(f"audio samples must be integers or floats, got dtype {x.dtype}")
    return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def to_16k_mono(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Any PCM block -> (S,) float32 mono at 16 kHz (see to_mono_float32 for formats).

    Resampling is scipy's polyphase filter with the reduced up/down ratio (44.1 kHz: 160/441), the filter the
    streaming resampler of the live sources reproduces block by block (realtime/buffers.py).
    """
    rate = int(sample_rate)
    if rate != sample_rate or rate <= 0:
        raise ValueError(f"sample rate must be a positive whole number of Hz, got {sample_rate}")
    x = to_mono_float32(samples)
    g = gcd(SAMPLE_RATE, rate)
    up, down = SAMPLE_RATE // g, rate // g
    if up == down:
        return x
    if len(x) == 0:
        return np.zeros(0, np.float32)
    return resample_poly(x, up, down).astype(np.float32, copy=False)


def conv_geometry(kernels: list[int] | tuple[int, ...], strides: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(receptive field, hop) in samples of a stack of 1-D convolutions without padding (wav2vec2-base: 400, 320)."""
    receptive, hop = 1, 1
    for k, s in zip(kernels, strides, strict=True):
        receptive += (k - 1) * hop
        hop *= s
    return receptive, hop


class _AudioFeatures(nn.Module):
    """input_values (B, S) float32 -> features (B, T, D): the conv encoder's output or the transformer's states.

    For "conv" only the feature encoder and its layer norm run (exactly the model's `extract_features`), which
    skips the transformer: most of Wav2Vec2's cost.
    """

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        if self.layer == "conv":
            conv = self.model.feature_extractor(input_values).transpose(1, 2)  # (B, C, T) -> (B, T, C)
            return self.model.feature_projection.layer_norm(conv)
        return self.model(input_values=input_values).last_hidden_state


class AudioExtractor(Extractor):
    """Resampling + Wav2Vec2. `extract(samples, sample_rate)` -> Features (seq_len, dim) of the newest audio, with
    length = frames computed from real samples (0 for empty or too short audio: audio absent)."""

    modality = "audio"

    def __init__(self, model_id: str = "facebook/wav2vec2-base", layer: str = "conv", seq_len: int = 128,
                 revision: str | None = None):
        super().__init__()
        from transformers import Wav2Vec2Model

        if layer not in LAYERS:
            raise ValueError(f"audio layer must be one of {', '.join(LAYERS)}, got {layer!r}")
        self.source: ModelSource = resolve_model(model_id, revision)
        self.layer = layer
        self.seq_len = seq_len
        self.model = load_pretrained(Wav2Vec2Model, self.source).eval()
        config = self.model.config
        self.receptive_field, self.hop = conv_geometry(config.conv_kernel, config.conv_stride)
        # The shortest audio that yields seq_len frames: the newest this-many samples are used.
        self.window_samples = self.receptive_field + (seq_len - 1) * self.hop
        self.do_normalize = self._read_do_normalize(Path(self.source.path))
        self.dim = int(config.conv_dim[-1] if layer == "conv" else config.hidden_size)
        self.spec = ModalitySpec(dim=self.dim, seq_len=seq_len, extractor=self.source.model_id,
                                 revision=self.source.revision, layer=LAYERS[layer],
                                 preprocessing="resample-16k+normalise" if self.do_normalize else "resample-16k",
                                 sample_rate=SAMPLE_RATE)
        self._core = _AudioFeatures(self.model, layer)
        self._scratch = np.empty(0, np.float32)

    @staticmethod
    def _read_do_normalize(folder: Path) -> bool:
        """Wav2Vec2FeatureExtractor's do_normalize (true for wav2vec2-base; false for some fine-tuned models)."""
        path = folder / "preprocessor_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        rate = cfg.get("sampling_rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            raise ModelNotAvailableError(f"{path} expects {rate} Hz audio; only {SAMPLE_RATE} Hz Wav2Vec2 models "
                                         f"are supported")
        return bool(cfg.get("do_normalize", True))

    def frames_for(self, n_samples: int) -> int:
        """Frames the conv encoder makes from n samples: floor((n - receptive) / hop) + 1, 0 below one field."""
        return 0 if n_samples < self.receptive_field else (n_samples - self.receptive_field) // self.hop + 1

    def engine_model(self) -> EngineModel:
        # The live window may hold less than a second at the start of a session: any clip of at least one
        # receptive field must run, so the profile's minimum is that rather than a full second.
        lo = self.receptive_field
        return EngineModel(
            name=f"wav2vec2-{self.layer}",
            module=self._core,
            example_inputs={"input_values": np.zeros((1, self.window_samples), dtype=np.float32)},
            output_names=("features",),
            dynamic_axes={"input_values": {0: "batch", 1: "samples"}, "features": {0: "batch", 1: "frames"}},
            shape_profile={"input_values": ((1, lo), (1, self.window_samples), (1, self.window_samples))},
        )

    def extract(self, samples: np.ndarray, sample_rate: int, out: np.ndarray | None = None) -> Features:
        """Features of the newest window of `samples`. `out`: a (seq_len, dim) float32 array to fill instead of
        a new one (the live tick reuses its buffers; one caller at a time: normalisation reuses a scratch)."""
        wave = to_16k_mono(samples, sample_rate)[-self.window_samples:]
        info = {"seconds": round(len(wave) / SAMPLE_RATE, 4)}
        frames = self.frames_for(len(wave))
        if frames == 0:
            values, _ = pack_window(np.zeros((0, self.dim), np.float32), self.seq_len, out)
            return Features(values, 0, info)
        if self.do_normalize:  # as Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, into a reused scratch
            if self._scratch.shape[0] < len(wave):
                self._scratch = np.empty(self.window_samples, np.float32)
            normalised = self._scratch[:len(wave)]
            np.subtract(wave, wave.mean(), out=normalised)
            normalised /= np.sqrt(np.dot(normalised, normalised) / len(wave) + 1e-7)  # the variance, no temporary
            wave = normalised
        features = self.backend.run({"input_values": wave[None].astype(np.float32, copy=False)})["features"][0]
        values, length = pack_window(features, self.seq_len, out)
        return Features(values, length, info)
