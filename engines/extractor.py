"""What every extractor shares: the window of features it yields, and its neural core as an engine model.

An extractor = preprocessing (numpy/OpenCV, on the calling thread) + a neural core run by a backend (torch,
onnxruntime or TensorRT: engines/runtime.py, engines/tensorrt.py, chosen by engines/backends.py). The core is
described once as an `EngineModel` (engines/runtime.py: a torch module with named inputs and outputs); the same
description is run by torch, exported to ONNX and compiled to TensorRT, which is what keeps the backends
interchangeable and the ONNX parity checks meaningful.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from engines.runtime import Backend, EngineModel, TorchBackend
from mcihn.spec import ModalitySpec

__all__ = ["EngineModel", "Extractor", "Features", "pack_window"]  # EngineModel: re-exported from engines.runtime


@dataclass
class Features:
    """One window of one modality, as MCIHN takes it.

    values: (seq_len, dim) float32; the first `length` steps are valid, the rest zeros; length 0 means the
    modality is absent (no face, no speech, no words). info: what a researcher needs to trust it (face boxes,
    the text used, number of tokens, ...), JSON-serialisable.
    """

    values: np.ndarray
    length: int
    info: dict = field(default_factory=dict)

    @property
    def present(self) -> bool:
        return self.length > 0


def pack_window(steps: np.ndarray, seq_len: int, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(n, D) valid steps -> ((seq_len, D) zero-padded float32, length). The last `seq_len` steps are kept
    when there are more (the newest, for a live window). `out`: a (seq_len, D) float32 array to fill instead
    of a new one (the live tick reuses its buffers)."""
    steps = np.asarray(steps, dtype=np.float32)
    kept = steps[-seq_len:] if len(steps) > seq_len else steps
    if out is None:
        out = np.zeros((seq_len, steps.shape[-1]), dtype=np.float32)
    else:
        out[len(kept):] = 0.0
    out[: len(kept)] = kept
    return out, len(kept)


class Extractor(ABC):
    """Base of the vision, text and audio extractors.

    Subclasses set `modality` and build `spec` (what checkpoints record) and `engine_model()` (their core);
    they run the core through `self.backend`, a torch backend until `use_backend` swaps in another.
    """

    modality: str
    spec: ModalitySpec

    def __init__(self) -> None:
        self._backend: Backend | None = None

    @abstractmethod
    def engine_model(self) -> EngineModel:
        """The neural core, for backends and ONNX export."""

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = TorchBackend(self.engine_model())
        return self._backend

    def use_backend(self, backend: Backend) -> None:
        self._backend = backend
