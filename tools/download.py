"""`mcihn download`: on a connected machine, fetch the models a checkpoint (or speech recognition) needs into the
Hugging Face cache, where the offline loaders (engines/hub.py, realtime/asr.py) find them afterwards.

Only the files those loaders read are fetched, chosen from each repository's file list: config.json, the weights
(*.safetensors; pytorch_model.bin only when there is no safetensors file), the tokenizer's files and
preprocessor_config.json; for a faster-whisper model model.bin, config.json, tokenizer.json, vocabulary.* and
preprocessor_config.json. No TensorFlow, Flax, ONNX or Rust weights, no subfolders, no READMEs. Files already in
the cache are not fetched again. The revision a checkpoint's feature spec records is the one fetched.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXAMPLE = """examples (on a machine with a network; then copy the Hugging Face cache to an offline one):
  mcihn download --checkpoint runs/sims/seed_0                  # the checkpoint's extractor models
  mcihn download --checkpoint runs/sims/seed_0 --asr-model base # ... and faster-whisper base
  mcihn download --starter --asr-model small                    # the starter needs only a larger Whisper
"""

COMMIT = re.compile(r"[0-9a-f]{40}")
MODEL_FILES = ("config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
# What faster-whisper's own download_model fetches (faster_whisper.utils), and so what its loader reads.
WHISPER_PATTERNS = ("config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*")


class DownloadError(ValueError):
    """Nothing (more) can be downloaded: one line saying why (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class Wanted:
    """One hub repository to fetch: `what` it is for, and the commit a checkpoint recorded (None: main)."""

    what: str
    repo_id: str
    commit: str | None = None
    whisper: bool = False
    modality: str | None = None


@dataclass
class Fetched:
    wanted: Wanted
    commit: str
    snapshot: Path
    fetched: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    bytes: int = 0
    pinned: bool = False  # the hub's main has moved on: the checkpoint's commit, not main, was fetched


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("download", help="fetch the models a checkpoint or speech recognition needs (network)",
                              description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a checkpoint (or run) folder: fetch its feature spec's extractor models")
    p.add_argument("--model", action="append", default=[], metavar="ID",
                   help="also fetch this hub model (org/name) for the extractors; repeatable")
    p.add_argument("--starter", action="store_true",
                   help="what the starter recognizer needs beyond the install (its models come with pip)")
    p.add_argument("--asr-model", default=None,
                   help="also fetch this faster-whisper model: a size (tiny.en, base, small, ...) or a hub id")
    p.add_argument("--cache-dir", default=None,
                   help="the Hugging Face hub cache to fill (default: $HF_HUB_CACHE, $HF_HOME/hub or "
                        "~/.cache/huggingface/hub)")


# ----------------------------------------------------------------------------------------------------
# What to fetch


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder, or a run folder's first seed (as mcihn-live takes it)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DownloadError(f"checkpoint folder not found: {folder}")
    seeds = sorted(folder.glob("seed_*/config.json"))
    if not (folder / "config.json").is_file() and seeds:
        folder = seeds[0].parent
    if not (folder / "config.json").is_file():
        raise DownloadError(f"{folder} has no config.json; point at a checkpoint written by `mcihn train`")
    return folder


def checkpoint_needs(path: str | os.PathLike) -> tuple[list[Wanted], list[str], list[str]]:
    """The hub models a checkpoint's live extractors load, notes on the modalities that need none, and the
    modalities whose model was a local folder that is not on this machine.

    Raises DownloadError when a modality the checkpoint uses was computed by something that is not a model (the
    shared CMU-MOSI features, MMSA pickles, free-form names): such a checkpoint cannot run live at all.
    """
    from mcihn.spec import MODALITIES, NOT_EXTRACTED, PRECOMPUTED, FeatureSpec, is_precomputed

    folder = checkpoint_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
        spec = FeatureSpec.from_dict(config["feature_spec"])
        used = tuple(config.get("model", {}).get("modalities", MODALITIES))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DownloadError(f"{folder / 'config.json'} is not an MCIHN checkpoint config ({err})") from None
    wanted: list[Wanted] = []
    notes: list[str] = []
    not_models: list[str] = []
    elsewhere: list[str] = []
    for m in MODALITIES:
        ms = spec[m]
        name = ms.extractor
        if m not in used or name == NOT_EXTRACTED:
            continue
        if is_precomputed(name):
            not_models.append(f"{m} {name.removeprefix(PRECOMPUTED)!r}")
        elif ms.revision.startswith("local:") or name.startswith((".", "/", "~")) or name.count("/") > 1:
            if Path(name).expanduser().is_dir():
                notes.append(f"{m} model {name} is a local folder: nothing to download")
            else:
                notes.append(f"{m} model {name} was a local folder where the checkpoint was trained, not a hub "
                             f"model: copy it here and pass it to mcihn-live with --{m}-model DIR")
                elsewhere.append(m)
        elif _packaged(name):
            notes.append(f"{m} model {name} comes with the install (a pip package): nothing to download")
        elif is_hub_id(name) and ("/" in name or COMMIT.fullmatch(ms.revision)):
            commit = ms.revision if COMMIT.fullmatch(ms.revision) else None
            wanted.append(Wanted(f"{m} model", name, commit, modality=m))
        else:  # a bare name with no hub commit recorded, or not an id at all ("text CNN")
            not_models.append(f"{m} {name!r}")
    if not_models:
        raise DownloadError(
            f"{folder} was trained on precomputed features ({', '.join(not_models)}) that came from extractors "
            f"that are not models this project can load, so the checkpoint cannot run live; train one on "
            f"features from `mcihn extract` (raw clips) or `mcihn extract-text` (transcripts) instead")
    return wanted, notes, elsewhere


def is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _packaged(model_id: str) -> bool:
    try:
        from engines.hub import packaged_model_path
    except ImportError:  # an install without packaged models
        return False
    return packaged_model_path(model_id) is not None


def whisper_needs(model: str) -> tuple[list[Wanted], list[str]]:
    from faster_whisper.utils import _MODELS

    if Path(model).expanduser().is_dir():
        return [], [f"speech recognition model {model} is a local folder: nothing to download"]
    try:
        from realtime.asr import packaged_whisper
    except ImportError:
        packaged_whisper = None
    if packaged_whisper is not None and packaged_whisper(model) is not None:
        return [], [f"faster-whisper {model} comes with the install (a pip package): nothing to download"]
    if "/" not in model and model not in _MODELS:
        raise DownloadError(f"unknown faster-whisper model {model!r}: use one of {', '.join(_MODELS)} or a hub id")
    repo = _MODELS.get(model, model)
    if not is_hub_id(repo):
        raise DownloadError(f"{model!r} is neither a faster-whisper size, a hub id nor a folder")
    return [Wanted(f"speech recognition ({model})", repo, whisper=True)], []


def model_files(files: list[str]) -> list[str]:
    """The files of a transformers repository that the project's loaders read: config, weights, tokenizer,
    preprocessor. Top level only; safetensors when there are any, else the PyTorch pickle."""
    top = [f for f in files if "/" not in f]
    chosen = [f for f in top if f in MODEL_FILES or f in TOKENIZER_FILES]
    safetensors = [f for f in top if f.endswith(".safetensors")]

    def shards(pattern: str) -> list[str]:
        return [f for f in top if re.fullmatch(pattern, f)]

    if "model.safetensors" in top:
        weights = ["model.safetensors"]
    elif "model.safetensors.index.json" in top:
        weights = ["model.safetensors.index.json", *shards(r"model-\d+-of-\d+\.safetensors")]
    elif safetensors:
        weights = safetensors
    elif "pytorch_model.bin" in top:
        weights = ["pytorch_model.bin"]
    elif "pytorch_model.bin.index.json" in top:
        weights = ["pytorch_model.bin.index.json", *shards(r"pytorch_model-\d+-of-\d+\.bin")]
    else:
        weights = []
    return sorted(set(chosen + weights))


def whisper_files(files: list[str]) -> list[str]:
    return sorted(f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in WHISPER_PATTERNS))


# ----------------------------------------------------------------------------------------------------
# Fetching


def fetch(wanted: Wanted, cache_dir: str) -> Fetched:
    """Fetch `wanted`'s needed files into the cache (main, or the checkpoint's commit when main has moved on)."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    api = HfApi()
    ref, pinned = "main", False
    try:
        info = api.model_info(wanted.repo_id)
        if wanted.commit is not None and info.sha != wanted.commit:
            # main has moved on since the checkpoint was trained: its features need the commit it recorded
            info = api.model_info(wanted.repo_id, revision=wanted.commit)
            ref, pinned = wanted.commit, True
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one line (hub_error)
        raise hub_error(err, wanted, ref if wanted.commit is None else wanted.commit) from None
    files = [s.rfilename for s in info.siblings or []]
    needed = whisper_files(files) if wanted.whisper else model_files(files)
    required = ("model.bin", "config.json") if wanted.whisper else ("config.json",)
    missing = [f for f in required if f not in needed]
    has_weights = wanted.whisper or any(f.endswith((".safetensors", ".bin")) for f in needed)
    if missing or not has_weights:
        lacking = ", ".join(missing) or "PyTorch weights (*.safetensors or pytorch_model.bin)"
        raise DownloadError(f"{wanted.repo_id} on the hub has no {lacking}, so the project cannot load it")
    snapshot = Path(cache_dir) / repo_folder_name(repo_id=wanted.repo_id, repo_type="model") / "snapshots" / info.sha
    result = Fetched(wanted, info.sha, snapshot, pinned=pinned)
    for name in needed:
        was_cached = isinstance(try_to_load_from_cache(wanted.repo_id, name, cache_dir=cache_dir, revision=info.sha),
                                str)
        try:
            # ref "main" writes refs/main (what the offline loaders read); cached files cost one HEAD, no transfer
            path = Path(hf_hub_download(wanted.repo_id, name, revision=ref, cache_dir=cache_dir,
                                        tqdm_class=_file_bar(f"{wanted.repo_id} {name}")))
        except Exception as err:  # noqa: BLE001 - one line, as above
            raise hub_error(err, wanted, ref, name) from None
        if path.parent.name != info.sha:
            raise DownloadError(f"{wanted.repo_id}'s main changed while downloading (now {path.parent.name[:7]}); "
                                f"run the same command again")
        (result.cached if was_cached else result.fetched).append(name)
        if not was_cached:
            result.bytes += path.stat().st_size
    return result


def _file_bar(label: str):
    """A plain tqdm class for one file's bar, named after the file: it shows even when stderr is not a terminal
    (huggingface_hub's own bars hide then), and not as the URL's tail (a CDN hash for weights)."""
    from tqdm.auto import tqdm

    class FileBar(tqdm):
        def __init__(self, *args, **kwargs):
            stage = str(kwargs.get("desc") or "").rpartition(": ")[2] if ": " in str(kwargs.get("desc")) else ""
            kwargs["desc"] = f"{label}: {stage}" if stage else label
            super().__init__(*args, **kwargs)

    return FileBar


def hub_error(err: Exception, wanted: Wanted, revision: str, filename: str | None = None) -> DownloadError:
    """One line for a failed hub request: offline mode, unreachable, not found / private, gated, no such revision."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint, repo = constants.ENDPOINT, wanted.repo_id
    if isinstance(err, OfflineModeIsEnabled):
        return DownloadError(offline_message())
    if isinstance(err, GatedRepoError):
        return DownloadError(f"{repo} is gated on {endpoint}: accept its conditions on its page there, log in "
                             f"(`hf auth login` or HF_TOKEN) and run this again")
    if isinstance(err, RepositoryNotFoundError):
        return DownloadError(f"{repo} ({wanted.what}) is not a model on {endpoint}, or it is private (log in with "
                             f"`hf auth login` or set HF_TOKEN)")
    if isinstance(err, RevisionNotFoundError):
        return DownloadError(f"revision {revision} of {repo} ({wanted.what}) is no longer on {endpoint}, so the "
                             f"exact model the checkpoint was trained with cannot be fetched")
    if isinstance(err, RemoteEntryNotFoundError):
        return DownloadError(f"{filename} of {repo} disappeared from {endpoint} during the download; run it again")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return DownloadError(f"{endpoint} answered HTTP {err.response.status_code} for {repo}; try again later")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return DownloadError(f"cannot reach the Hugging Face hub at {endpoint} ({type(err).__name__}"
                         f"{': ' + first[:160] if first else ''}); check the network, proxy or HF_ENDPOINT")


def offline_message() -> str:
    return ("HF_HUB_OFFLINE is set, so nothing can be downloaded; run this on a machine with a network, without "
            "HF_HUB_OFFLINE=1, then copy the Hugging Face cache here")


# ----------------------------------------------------------------------------------------------------
# The command


def run(args) -> int:
    from huggingface_hub import constants

    if not (args.checkpoint or args.model or args.starter or args.asr_model):
        raise DownloadError("say what to download: --checkpoint DIR, --model ID, --starter and/or --asr-model SIZE")
    if constants.HF_HUB_OFFLINE:
        raise DownloadError(offline_message())
    cache_dir = str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else constants.HF_HUB_CACHE
    wanted: list[Wanted] = []
    notes: list[str] = []
    elsewhere: list[str] = []
    if args.checkpoint:
        found, said, elsewhere = checkpoint_needs(args.checkpoint)
        wanted += found
        notes += said
    for model_id in args.model:
        if Path(model_id).expanduser().is_dir():
            notes.append(f"{model_id} is a local folder: nothing to download")
        elif is_hub_id(model_id):
            wanted.append(Wanted("model", model_id))
        else:
            raise DownloadError(f"--model {model_id!r} is not a Hugging Face model id (org/name)")
    if args.starter:
        notes.append("the starter recognizer's models come with the install (pip packages): nothing to download"
                     + ("" if args.asr_model else "; --asr-model SIZE fetches a larger Whisper for it"))
    if args.asr_model:
        found, said = whisper_needs(args.asr_model)
        wanted += found
        notes += said
    for note in notes:
        print(note)
    results = [fetch(w, cache_dir) for w in wanted]
    report(results, cache_dir)
    print("offline from now on:\n  " + offline_command(args, results, elsewhere))
    return 0


def report(results: list[Fetched], cache_dir: str) -> None:
    if not results:
        return
    fetched = sum(len(r.fetched) for r in results)
    cached = sum(len(r.cached) for r in results)
    size = sum(r.bytes for r in results) / 1e6
    if fetched:
        print(f"fetched {fetched} file(s) ({size:.1f} MB) into {cache_dir}"
              + (f"; {cached} were already there" if cached else ""))
    else:
        print(f"nothing to fetch: all {cached} file(s) were already in {cache_dir}")
    for r in results:
        print(f"  {r.wanted.what}: {r.wanted.repo_id} @ {r.commit[:7]} ({', '.join(r.fetched + r.cached)}) "
              f"-> {r.snapshot}")
        if r.pinned:
            print(f"    the hub's main has moved on since the checkpoint was trained; its commit {r.commit[:7]} was "
                  f"fetched, which mcihn-live loads with --{r.wanted.modality}-model (below)")


def offline_command(args, results: list[Fetched], elsewhere: list[str] = ()) -> str:
    """The mcihn-live command line that now runs without a network (DIR: a local model folder to copy here)."""
    env = []
    if args.cache_dir:
        env.append(f"HF_HUB_CACHE={shlex.quote(str(Path(args.cache_dir).expanduser().resolve()))}")
    elif os.environ.get("HF_HUB_CACHE"):
        env.append(f"HF_HUB_CACHE={shlex.quote(os.environ['HF_HUB_CACHE'])}")
    elif os.environ.get("HF_HOME"):
        env.append(f"HF_HOME={shlex.quote(os.environ['HF_HOME'])}")
    words = [*env, "HF_HUB_OFFLINE=1", "mcihn-live"]
    if args.checkpoint:
        words += ["--checkpoint", shlex.quote(args.checkpoint)]
    for r in results:
        if r.pinned and r.wanted.modality:
            words += [f"--{r.wanted.modality}-model", shlex.quote(str(r.snapshot))]
    for m in elsewhere:
        words += [f"--{m}-model", "DIR"]
    if args.asr_model:
        words += ["--asr-model", shlex.quote(args.asr_model)]
    return " ".join(words)


if __name__ == "__main__":
    from tools.cli import main

    sys.exit(main(["download", *sys.argv[1:]]))
