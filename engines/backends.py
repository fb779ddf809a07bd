"""Runtime backends: run an EngineModel's core on named numpy inputs, return named numpy outputs.

One small interface, several implementations (torch here; onnxruntime and TensorRT join it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from engines.extractor import EngineModel


class Backend(ABC):
    """run({input name: array}) -> {output name: array}."""

    name: str

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchBackend(Backend):
    """Eager PyTorch on the CPU (fp32)."""

    name = "torch"

    def __init__(self, model: EngineModel, device: str = "cpu"):
        self.model = model
        self.device = torch.device(device)
        self.module = model.module.to(self.device).eval()

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in self.model.input_names]
        out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.model.output_names, out, strict=True)}
