"""Checkpoints: `model.safetensors` (weights) + `config.json` (model config, head and labels, feature spec).

`config.json`'s "model_type" names the fusion model ("mcihn", the default when absent, or "mcn-cl").

A checkpoint is a folder. Loading it against data or extractors checks the feature spec first and names
the modality and field that differ.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mcihn.config import MCIHNConfig
from mcihn.mcn_cl import MCNCL, MCNCLConfig
from mcihn.model import MCIHN
from mcihn.spec import FeatureSpec, SpecMismatchError

FORMAT = "mcihn-checkpoint"
VERSION = 2  # 2 added "model_type"; MCIHN checkpoints are still written as version 1, which every reader loads
MCIHN_VERSION = 1
# model_type -> (model class, config class). A checkpoint without "model_type" is an MCIHN one.
MODEL_TYPES: dict[str, tuple[type, type]] = {"mcihn": (MCIHN, MCIHNConfig), "mcn-cl": (MCNCL, MCNCLConfig)}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or unreadable."""


_RETRAIN = "retrain it (`mcihn train`) or copy the folder again"
_FIX = f"the checkpoint is damaged: {_RETRAIN}"


def _reason(err: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    lines = str(err).strip().splitlines()
    if isinstance(err, KeyError):
        return f"missing {lines[0]}" if lines else "a missing field"
    return lines[0] if lines else type(err).__name__


def _size_mismatch(err: RuntimeError) -> str:
    """torch's load_state_dict error (a line per tensor) as "TENSOR is [8, 32] in the weights, [8, 64] in the
    config (and N more)"."""
    found = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", str(err))
    if not found:
        return _reason(err)
    name, stored, expected = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{name} is {stored} in the weights, {expected} in the config{more}"


@dataclass
class Checkpoint:
    model: MCIHN | MCNCL
    spec: FeatureSpec
    metadata: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> MCIHNConfig | MCNCLConfig:
        return self.model.config

    def check_features(self, spec: FeatureSpec, what: str = "data", structural_only: bool = False) -> None:
        """Refuse features whose spec differs (SpecMismatchError names modality and field)."""
        self.spec.check_matches(spec, what=what, structural_only=structural_only)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_type_of(model: MCIHN | MCNCL) -> str:
    """The "model_type" a checkpoint of `model` records."""
    for name, (model_class, _) in MODEL_TYPES.items():
        if type(model) is model_class:
            return name
    raise TypeError(f"cannot checkpoint a {type(model).__name__}; known models: {', '.join(MODEL_TYPES)}")


def save_checkpoint(directory: str | Path, model: MCIHN | MCNCL, spec: FeatureSpec,
                    metadata: dict | None = None) -> Path:
    """Write weights and config into `directory` (created). Returns the folder."""
    model_type = model_type_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(weights, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, directory / WEIGHTS_FILE)
    config = {
        "format": FORMAT,
        # MCIHN checkpoints keep version 1 so older readers still load them; older readers refuse other models
        # with "written by a newer mcihn" instead of misreading them as MCIHN.
        "version": MCIHN_VERSION if model_type == "mcihn" else VERSION,
        "model_type": model_type,
        "model": model.config.to_dict(),
        "head": {"type": model.config.head, "labels": list(model.config.labels)},
        "feature_spec": spec.to_dict(),
        "metadata": metadata or {},
    }
    _atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


def load_checkpoint(directory: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Rebuild the model from `config.json` and load `model.safetensors` strictly.

    A damaged checkpoint (truncated or unreadable weights, a config.json without a usable model config, weights
    that belong to another config) raises CheckpointError with one line: what is wrong, in which file, and how
    to fix it (retrain, or copy the folder again)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory} (train one with `mcihn train`)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}; it is incomplete, retrain or re-copy it")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path} cannot be read ({_reason(err)}); {_FIX}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not an MCIHN checkpoint config (a JSON {type(config).__name__}); "
                              f"{_FIX}")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not an MCIHN checkpoint (format={config.get('format')!r})")
    version = config.get("version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{config_path} has an invalid version {version!r}; {_FIX}")
    if version > VERSION:
        raise CheckpointError(f"{directory} was written by a newer mcihn (version {version}); upgrade")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{config_path} has no model config (\"model\"); {_FIX}")
    model_type = config.get("model_type", "mcihn")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise CheckpointError(f"{config_path} has an unknown model_type {model_type!r} (known: "
                              f"{', '.join(MODEL_TYPES)}); it was written by another version of mcihn")
    model_class, config_class = MODEL_TYPES[model_type]
    try:
        model = model_class(config_class.from_dict(config["model"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path} has an unusable model config ({_reason(err)}); {_FIX}") from None
    try:
        state = load_file(str(weights_path), device=map_location)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path} is damaged or truncated ({_reason(err)}); {_FIX}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor sizes differ from the config's (torch says so in one line per tensor)
        raise CheckpointError(f"{weights_path} does not fit its {CONFIG_FILE} ({_size_mismatch(err)}); the two come "
                              f"from different models: {_RETRAIN}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not fit {config_path}: missing {missing[:3]}, unexpected {unexpected[:3]}; {_FIX}"
        )
    model.eval()
    try:
        spec = FeatureSpec.from_dict(config["feature_spec"])
    except (KeyError, TypeError, ValueError) as err:
        raise SpecMismatchError(f"{config_path} has no usable feature_spec ({_reason(err)})") from None
    return Checkpoint(model=model.to(torch.device(map_location)), spec=spec, metadata=config.get("metadata", {}),
                      path=directory)

