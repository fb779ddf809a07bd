"""Checkpoints: `model.safetensors` (weights) + `config.json` (model config, head and labels, feature spec).

A checkpoint is a folder. Loading it against data or extractors checks the feature spec first and names
the modality and field that differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mcihn.config import MCIHNConfig
from mcihn.model import MCIHN
from mcihn.spec import FeatureSpec, SpecMismatchError

FORMAT = "mcihn-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or unreadable."""


@dataclass
class Checkpoint:
    model: MCIHN
    spec: FeatureSpec
    metadata: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> MCIHNConfig:
        return self.model.config

    def check_features(self, spec: FeatureSpec, what: str = "data", structural_only: bool = False) -> None:
        """Refuse features whose spec differs (SpecMismatchError names modality and field)."""
        self.spec.check_matches(spec, what=what, structural_only=structural_only)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, model: MCIHN, spec: FeatureSpec, metadata: dict | None = None) -> Path:
    """Write weights and config into `directory` (created). Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(weights, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, directory / WEIGHTS_FILE)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.to_dict(),
        "head": {"type": model.config.head, "labels": list(model.config.labels)},
        "feature_spec": spec.to_dict(),
        "metadata": metadata or {},
    }
    _atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


def load_checkpoint(directory: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Rebuild the model from `config.json` and load `model.safetensors` strictly."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory} (train one with `mcihn train`)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}; it is incomplete, retrain or re-copy it")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON ({err})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not an MCIHN checkpoint (format={config.get('format')!r})")
    if config.get("version", 0) > VERSION:
        raise CheckpointError(f"{directory} was written by a newer mcihn (version {config['version']}); upgrade")
    model = MCIHN(MCIHNConfig.from_dict(config["model"]))
    state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.eval()
    try:
        spec = FeatureSpec.from_dict(config["feature_spec"])
    except (KeyError, TypeError) as err:
        raise SpecMismatchError(f"{directory / CONFIG_FILE} has no usable feature_spec ({err})") from None
    return Checkpoint(model=model.to(torch.device(map_location)), spec=spec, metadata=config.get("metadata", {}),
                      path=directory)
