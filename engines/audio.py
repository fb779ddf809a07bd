"""Audio features: Wav2Vec2 frames of the last seconds of audio (128 x 512 with wav2vec2-base, about 2.56 s).

Audio is mixed to mono and resampled to 16 kHz (`to_16k_mono`, shared with the live microphone source), the last
window that yields `seq_len` frames is kept, normalised as Wav2Vec2FeatureExtractor does, and run through the
model. The paper's features are the 512-d output of the convolutional feature encoder (layer "conv", the model
output `extract_features`); "hidden" gives the transformer's `last_hidden_state` instead. The convolutional
encoder makes one frame per 320 samples (20 ms) from a 400-sample receptive field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
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
    """Any PCM block, whole (a clip's track) -> (S,) float32 mono at 16 kHz (see to_mono_float32 for formats).

    Resampled by `StreamResampler` run over the block and flushed: scipy's `resample_poly` of the whole block
    (44.1 kHz: up 160, down 441), the very filter the live sources apply block by block, so a clip extracted
    offline and the same clip replayed live hold the same 16 kHz samples.
    """
    rate = int(sample_rate)
    if rate != sample_rate or rate <= 0:
        raise ValueError(f"sample rate must be a positive whole number of Hz, got {sample_rate}")
    x = to_mono_float32(samples)
    resampler = StreamResampler(rate)
    if resampler.passthrough:
        return x
    if len(x) == 0:
        return np.zeros(0, np.float32)
    head, _ = resampler.process(x)
    return np.concatenate([head, resampler.flush()])


class StreamResampler:
    """Resample a block stream from `in_rate` to `out_rate` (16 kHz), carrying the filter state across blocks.

    The same polyphase low-pass FIR as `scipy.signal.resample_poly` (Kaiser window, beta 5, 10 zero crossings per
    side), evaluated only at the output instants, so the concatenated output equals `resample_poly` of the whole
    stream. Output lags the input by half the filter (10 input samples of the slower side, under 1 ms), which
    `process` reflects in the time it returns; `flush` at the end of a stream (a file) emits what the lag held
    back, so the output is then `resample_poly`'s, length included. The one resampler of every path: the live
    sources, the file replay, `mcihn extract` (`to_16k_mono`). Not thread-safe: one resampler per stream.
    """

    _CHUNK = 4096  # outputs per vectorised step: bounds the (outputs x taps) gather for long pushed blocks

    def __init__(self, in_rate: float, out_rate: int = SAMPLE_RATE):
        if not in_rate or in_rate <= 0 or in_rate != int(in_rate):
            raise ValueError(f"the input sample rate must be a positive whole number of Hz, got {in_rate}")
        from scipy.signal import firwin

        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        g = math.gcd(self.in_rate, self.out_rate)
        self.up, self.down = self.out_rate // g, self.in_rate // g
        self._n_in = 0  # input samples consumed
        self._k = 0  # next output sample index
        if self.up == self.down == 1:
            return
        max_rate = max(self.up, self.down)
        self._delay = 10 * max_rate  # half the filter, in upsampled samples
        h = firwin(2 * self._delay + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * self.up
        self._taps = -(-h.shape[0] // self.up)  # input samples under the filter for each output
        h = np.concatenate([h, np.zeros(self._taps * self.up - h.shape[0])])
        self._phases = h.reshape(self._taps, self.up).T.copy()  # [phase, m] = h[phase + m * up]
        self._hist = np.zeros(self._taps - 1)  # the last inputs (zeros before the stream, as resample_poly pads)

    @property
    def passthrough(self) -> bool:
        return self.up == self.down == 1

    def process(self, block: np.ndarray, t_end: float | None = None) -> tuple[np.ndarray, float | None]:
        """Resample one mono block; returns (output samples, monotonic time of the last output sample).

        `t_end` is the time of the block's last input sample; the output's last sample is a little older (the
        filter's lag). Returns None as the time when `t_end` is None or no output is ready yet.
        """
        x = np.asarray(block, dtype=np.float64).reshape(-1)
        if self.passthrough:
            self._n_in += x.shape[0]
            return x.astype(np.float32), t_end
        buf = np.concatenate([self._hist, x])  # buf[0] is input index n_in - (taps - 1)
        n_total = self._n_in + x.shape[0]
        # Output k needs inputs up to floor((k * down + delay) / up); emit every k whose inputs have arrived.
        k_end = max(self._k, (n_total * self.up - self._delay - 1) // self.down + 1)
        out = np.empty(k_end - self._k, np.float32)
        back = np.arange(self._taps)
        for c in range(self._k, k_end, self._CHUNK):
            p = np.arange(c, min(c + self._CHUNK, k_end)) * self.down + self._delay
            newest = p // self.up
            local = (newest - self._n_in + self._taps - 1)[:, None] - back[None, :]
            out[c - self._k:c - self._k + p.shape[0]] = np.einsum(
                "kt,kt->k", self._phases[p - newest * self.up], buf[local])
        self._hist = buf[buf.shape[0] - (self._taps - 1):]
        self._n_in, self._k = n_total, k_end
        if t_end is None or out.shape[0] == 0:
            return out, None
        # The last output sits at input position (k_end - 1) * down / up.
        lag = (n_total - 1 - (k_end - 1) * self.down / self.up) / self.in_rate
        return out, t_end - lag

    def flush(self) -> np.ndarray:
        """The stream has ended: the outputs the filter's lag held back, computed as if zeros followed (as
        `resample_poly` pads), up to `resample_poly`'s length ceil(inputs x up / down). Call once, at the end."""
        if self.passthrough:
            return np.zeros(0, np.float32)
        n_out = -(-self._n_in * self.up // self.down)
        if n_out <= self._k:
            return np.zeros(0, np.float32)
        emitted = self._k
        needed = ((n_out - 1) * self.down + self._delay) // self.up + 1  # inputs the last output reads
        out, _ = self.process(np.zeros(max(0, needed - self._n_in)))
        return out[: n_out - emitted]



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


class StreamingConvFeatures:
    """Wav2Vec2's conv features (`extract_features`) of a sliding window, computing only the frames that are new.

    The conv encoder is local (a frame sees 400 samples) but for one thing: wav2vec2-base's first layer is a
    GroupNorm with one group per channel, which normalises each channel over the whole window (and the input is
    normalised over the window before it). Here the first convolution's raw outputs are cached by absolute sample
    position, the window's statistics are computed exactly on every call (the input normalisation folds into the
    GroupNorm's epsilon: the first convolution has no bias), and only frames not computed before go through the
    rest of the encoder, with the current statistics. A frame computed earlier keeps the statistics of its own
    window: that is the one approximation (docs/live.md, "Incremental audio features": it measures the error).
    With no earlier frames (the first call, or after a pause in the calls) the result is the exact window.

    Frames sit on a grid of `hop` samples from the start of the stream: the window ends at the last whole frame,
    up to hop - 1 samples (20 ms) before the newest sample, and holds as many whole frames as the samples given do
    (up to seq_len: of the tick's 41,040 samples, 128 when they end on the grid, else 127, where `extract`
    always makes 128). Only for GroupNorm encoders without conv bias
    (`supports`); one caller at a time.
    """

    def __init__(self, model: nn.Module, seq_len: int, do_normalize: bool, max_drift: float = 0.2,
                 refresh_frames: int = 16):
        self.max_drift, self.refresh_frames = max_drift, refresh_frames
        first, *rest = model.feature_extractor.conv_layers
        self.seq_len, self.do_normalize = seq_len, do_normalize
        self.k0, self.s0 = int(first.conv.kernel_size[0]), int(first.conv.stride[0])
        self.w0 = first.conv.weight.detach().numpy()[:, 0, :].T.astype(np.float32)  # (k0, C)
        self.norm = first.layer_norm  # GroupNorm: its affine weights and eps
        self.activation = first.activation
        self.rest = nn.Sequential(*rest)
        self.projection_norm = model.feature_projection.layer_norm
        config = model.config
        self.receptive, self.hop = conv_geometry(config.conv_kernel, config.conv_stride)
        rest_receptive, rest_hop = conv_geometry(config.conv_kernel[1:], config.conv_stride[1:])
        self.rest_receptive, self.rest_hop = rest_receptive, rest_hop  # in first-layer frames (79, 64)
        window_z = (self.receptive + (seq_len - 1) * self.hop - self.k0) // self.s0 + 1  # first-layer frames
        channels, dim = self.w0.shape[1], int(config.conv_dim[-1])
        self._z = np.zeros((2 * window_z, channels), np.float32)  # raw first-layer outputs, by index % len
        self._z_hi = 0  # absolute first-layer frames [_z_lo, _z_hi) are held
        self._z_lo = 0
        self._feats = np.zeros((2 * seq_len, dim), np.float32)  # finished frames, by absolute index % len
        self._log_std = np.zeros((2 * seq_len, channels), np.float32)  # the log std each frame was normalised with
        self._f_lo = self._f_hi = 0
        self._s_lo = self._s_hi = 0  # the rows [_s_lo, _s_hi) summed in _sum and _sumsq
        self._s_updates = 1000  # updates since they were last summed whole (1000: sum whole on the next call)
        self._sum, self._sumsq = np.zeros(channels, np.float64), np.zeros(channels, np.float64)
        self.computed = 0  # frames put through the encoder so far (tests, benchmarks)

    @staticmethod
    def supports(model: nn.Module, layer: str) -> bool:
        config = model.config
        return layer == "conv" and config.feat_extract_norm == "group" and not config.conv_bias

    def __call__(self, samples: np.ndarray, end_index: int, out: np.ndarray) -> int | None:
        """Fill `out` (seq_len, dim) with the features of the newest frames of `samples` (16 kHz; the newest
        sample is absolute stream index `end_index` - 1): as many whole grid frames as they hold, up to seq_len,
        zero rows after them, as `extract` packs them. Returns the frames written, or None when `samples` hold
        less than two frames (the caller then runs the exact model)."""
        first_held = end_index - len(samples)
        f_last = (end_index - self.receptive) // self.hop
        f_first = max(f_last - self.seq_len + 1, -(-first_held // self.hop))
        n = f_last - f_first + 1
        if n < 2:
            return None
        start = f_first * self.hop  # absolute index of the window's first sample
        wave = samples[start - first_held: start - first_held + self.receptive + (n - 1) * self.hop]
        g0 = start // self.s0  # the window's first-layer frames: [g0, g0 + n_z)
        n_z = (len(wave) - self.k0) // self.s0 + 1
        self._update_z(wave, g0, n_z)
        mean, var = self._window_stats(g0, g0 + n_z)
        if self.do_normalize:  # x -> (x - m) / sd before the (bias-free) conv: the GroupNorm sees var / sd^2
            sd2 = float(np.var(wave, dtype=np.float64)) + 1e-7
        else:
            sd2 = 1.0
        inv_std = 1.0 / np.sqrt(var + self.norm.eps * sd2)
        log_std = -np.log(inv_std).astype(np.float32)
        if not (self._f_lo <= f_first <= self._f_hi):  # nothing reusable: the whole window, exact
            self._f_lo = self._f_hi = f_first
        new_from = max(self._f_hi, f_first)
        if new_from <= f_last:
            self._put_feats(new_from, self._encode(new_from, f_last + 1, mean, inv_std), log_std)
        # Frames whose statistics have drifted from the window's (speech starting or stopping changes them most)
        # are recomputed, the oldest first, at most `refresh_frames` a call: the cost of a call stays bounded.
        if new_from > f_first and self.refresh_frames:
            idx = np.arange(f_first, new_from) % len(self._feats)
            drift = np.median(np.abs(self._log_std[idx] - log_std), axis=1)
            stale = np.flatnonzero(drift > self.max_drift)
            if stale.size:
                lo = f_first + int(stale[0])
                hi = min(lo + self.refresh_frames, new_from)
                self._put_feats(lo, self._encode(lo, hi, mean, inv_std), log_std)
        self._f_lo = max(self._f_lo, f_last + 1 - len(self._feats))
        np.take(self._feats, np.arange(f_first, f_last + 1) % len(self._feats), axis=0, out=out[:n])
        out[n:] = 0.0
        return n

    def _update_z(self, wave: np.ndarray, g0: int, n_z: int) -> None:
        """Raw first-layer outputs of the window's frames not held yet."""
        g_end = g0 + n_z
        if not (self._z_lo <= g0 <= self._z_hi):
            self._z_lo = self._z_hi = g0
        new_from = max(self._z_hi, g0)
        if new_from < g_end:
            local = (new_from - g0) * self.s0
            frames = np.lib.stride_tricks.sliding_window_view(wave[local:], self.k0)[:: self.s0][: g_end - new_from]
            idx = np.arange(new_from, g_end) % len(self._z)
            self._z[idx] = frames @ self.w0
            self._z_hi = g_end
            self._z_lo = max(self._z_lo, g_end - len(self._z))

    def _window_stats(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance of first-layer frames [lo, hi), from running float64 sums: rows leaving
        the window are subtracted, rows entering it added (recomputed whole now and then, and when the window
        jumps)."""
        if not (self._s_lo <= lo <= self._s_hi <= hi) or self._s_updates >= 1000:
            z = self._z_rows(lo, hi).astype(np.float64)
            self._sum, self._sumsq = z.sum(axis=0), np.einsum("tc,tc->c", z, z)
            self._s_updates = 0
        else:
            if lo > self._s_lo:
                gone = self._z_rows(self._s_lo, lo).astype(np.float64)
                self._sum -= gone.sum(axis=0)
                self._sumsq -= np.einsum("tc,tc->c", gone, gone)
            if hi > self._s_hi:
                new = self._z_rows(self._s_hi, hi).astype(np.float64)
                self._sum += new.sum(axis=0)
                self._sumsq += np.einsum("tc,tc->c", new, new)
            self._s_updates += 1
        self._s_lo, self._s_hi = lo, hi
        n = hi - lo
        mean = self._sum / n
        return mean, np.maximum(self._sumsq / n - mean * mean, 0.0)

    def _z_rows(self, lo: int, hi: int) -> np.ndarray:
        return self._z[np.arange(lo, hi) % len(self._z)]

    @torch.inference_mode()
    def _encode(self, f_from: int, f_to: int, mean: np.ndarray, inv_std: np.ndarray) -> np.ndarray:
        """Frames [f_from, f_to): their first-layer outputs normalised with the given statistics, activated, and
        through the other layers -> (N, dim)."""
        rows = self._z_rows(f_from * self.rest_hop, (f_to - 1) * self.rest_hop + self.rest_receptive)
        scale = (inv_std * self.norm.weight.detach().numpy()).astype(np.float32)
        shift = (self.norm.bias.detach().numpy() - mean * scale).astype(np.float32)
        h = torch.from_numpy(rows * scale + shift).T[None]  # (1, C, L)
        h = self.rest(self.activation(h)).transpose(1, 2)  # (1, N, dim)
        self.computed += h.shape[1]
        return self.projection_norm(h)[0].numpy()

    def _put_feats(self, f_from: int, feats: np.ndarray, log_std: np.ndarray) -> None:
        idx = np.arange(f_from, f_from + len(feats)) % len(self._feats)
        self._feats[idx] = feats
        self._log_std[idx] = log_std
        self._f_hi = max(self._f_hi, f_from + len(feats))


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
        self._streaming: StreamingConvFeatures | None = None

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

    @property
    def can_stream(self) -> bool:
        """Whether `extract_stream` computes only new frames (GroupNorm conv features, CPU)."""
        return StreamingConvFeatures.supports(self.model, self.layer)

    def extract_stream(self, samples: np.ndarray, end_index: int, out: np.ndarray) -> Features:
        """Like `extract` on 16 kHz mono `samples` whose newest sample is absolute stream index `end_index` - 1,
        computing only the frames that are new since the last call (StreamingConvFeatures); the exact model when
        it cannot (too little audio yet, or an encoder it does not support)."""
        if self.can_stream:
            if self._streaming is None:
                self._streaming = StreamingConvFeatures(self.model, self.seq_len, self.do_normalize)
            frames = self._streaming(samples, end_index, out)
            if frames is not None:
                seconds = (self.receptive_field + (frames - 1) * self.hop) / SAMPLE_RATE
                return Features(out, frames, {"seconds": round(seconds, 4), "incremental": True})
        return self.extract(samples, SAMPLE_RATE, out=out)

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
