"""Opt-in: fine-tune the text encoder jointly with MCIHN, as the paper does (BERT at lr 2e-5, section 4.3).

`mcihn train` reads stored features from frozen extractors. Here the text modality's features are computed in
the training loop, every batch, by the text encoder of `engines/text.py`'s `TextExtractor`: its `tokenize` (the
window, left truncation, padding) and its neural core (the module every backend runs live), so the fine-tuned
encoder gives live exactly the features the fusion model was trained on. Vision and audio come from the stored
features (or are absent with `text_only`).

`TextFineTuner` is `mcihn.train.Trainer` with the text encoder added:
- the encoder's parameters get their own Adam (`text_lr`, default 2e-5) stepped with the joint phase (eq. 19's
  loss); the AAE phases (eqs. 4-5) see the batch's text features detached, so they train MCIHN's encoders and
  decoders only (reconstruction of features the encoder itself moves would reward it for making them trivial);
- the text features of the validation and test splits are recomputed with the current encoder (eval mode);
- the learning-rate halving, early stopping (the encoder of the best epoch is kept with MCIHN's best weights),
  seeds and resuming are the Trainer's; the encoder's weights, its best weights and its Adam state are saved
  with the run state after every epoch;
- `save` writes a checkpoint as `mcihn train` does plus the fine-tuned encoder as a Hugging Face model folder
  (`text_encoder/`, save_pretrained + tokenizer) inside it, and the checkpoint's text spec names that folder
  (absolute path; its revision is the folder's content hash), so `mcihn eval` and the live pipeline load it.

The feature standardisation of the text modality (a buffer of the model) is computed from the *initial*
encoder's features on the training split and then kept fixed: the encoder learns against it, and live
inference applies the same buffer to the fine-tuned encoder's output, as training did.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mcihn.config import MCIHNConfig
from mcihn.data import DataError, FeatureSet, FeatureSplit
from mcihn.spec import NOT_EXTRACTED, FeatureSpec, ModalitySpec
from mcihn.train import Batch, SplitTensors, TrainConfig, Trainer, evaluate

TEXT_ENCODER_DIR = "text_encoder"  # the fine-tuned encoder's folder inside a checkpoint
TEXT_STATE = "text_state_{epoch}.pt"  # the encoder's state that goes with train_state.pt after `epoch` epochs
DEFAULT_TEXT_LR = 2e-5  # the paper's BERT learning rate (section 4.3)
_TOKENS = ("input_ids", "attention_mask")


def tokenize_split(text, texts: list[str]) -> dict[str, np.ndarray]:
    """`text` (a TextExtractor)'s tokens of `texts` as its `extract_batch` makes them: input_ids and attention_mask
    (N, seq_len) int64, and lengths (N,) int64: the token count, 0 for a text without words (text absent)."""
    stripped = [t.strip() for t in texts]
    tokens = text.tokenize(stripped) if stripped else {n: np.zeros((0, text.seq_len), np.int64) for n in _TOKENS}
    lengths = np.array([int(m.sum()) if t else 0 for t, m in zip(stripped, tokens["attention_mask"], strict=True)],
                       dtype=np.int64)
    return {**tokens, "lengths": lengths}


def text_core(text) -> torch.nn.Module:
    """The module a TextExtractor's backends run: (input_ids, attention_mask) -> last_hidden_state (B, T, H)."""
    return text.engine_model().module


@torch.no_grad()
def encode_texts(text, texts: list[str], batch_size: int = 64, device: torch.device | str = "cpu") -> np.ndarray:
    """(N, seq_len, H) float32 features of `texts` by `text` (a TextExtractor) in eval mode, zero beyond each
    text's length: what its `extract_batch` returns, computed on `device` with the module training moves."""
    core = text_core(text)
    was_training = core.training
    core.eval()
    tokens = tokenize_split(text, texts)
    out = np.zeros((len(texts), text.seq_len, text.spec.dim), np.float32)
    try:
        for start in range(0, len(texts), batch_size):
            ids, mask = (torch.as_tensor(tokens[n][start:start + batch_size], device=device) for n in _TOKENS)
            hidden = core(ids, mask).float().cpu().numpy()
            valid = np.arange(text.seq_len)[None, :] < tokens["lengths"][start:start + batch_size, None]
            out[start:start + batch_size] = np.where(valid[..., None], hidden, 0.0)
    finally:
        core.train(was_training)
    return out


def with_text_features(data: FeatureSet, text, text_only: bool = False, batch_size: int = 64) -> FeatureSet:
    """`data` (with transcripts) with its text modality replaced by `text`'s (a TextExtractor's) features of each
    split's transcripts, and its spec's text by the extractor's. Vision and audio stay the stored features, or
    with `text_only` become absent (length 0), as `mcihn extract-text` stores them."""
    missing = [name for name, split in data.splits.items() if split.texts is None]
    if missing:
        raise DataError(f"dataset {data.name!r} has no transcripts for split(s) {', '.join(missing)}; fine-tuning "
                        f"the text encoder needs them (a CMU-MOSI .npz has them as text_raw; a feature store keeps "
                        f"them in texts.json)")
    splits = {}
    for name, split in data.splits.items():
        features, lengths = dict(split.features), dict(split.lengths)
        features["text"] = encode_texts(text, split.texts, batch_size)
        lengths["text"] = tokenize_split(text, split.texts)["lengths"]
        if text_only:
            for m in ("vision", "audio"):
                features[m] = np.zeros((len(split), 1, 1), np.float32)
                lengths[m] = np.zeros(len(split), np.int64)
        splits[name] = FeatureSplit(features, lengths, split.labels, split.ids, split.texts)
    absent = ModalitySpec(dim=1, seq_len=1, extractor=NOT_EXTRACTED, preprocessing="not extracted (text-only)")
    parts = {"vision": absent, "audio": absent} if text_only else {"vision": data.spec.vision, "audio": data.spec.audio}
    spec = FeatureSpec(text=text.spec, **parts, window=data.spec.window)
    return dataclasses.replace(data, splits=splits, spec=spec)


def first_samples(data: FeatureSet, n: int) -> FeatureSet:
    """The first `n` samples of every split (per-sample extras follow): a subset for a quick smoke run."""
    from mcihn.data import _subset

    splits, extra = {}, dict(data.extra)
    for name, split in data.splits.items():
        keep = np.arange(len(split)) < n
        splits[name] = _subset(split, keep)
        for key, value in data.extra.items():
            if isinstance(value, dict) and set(value) == set(data.splits) and name in value:
                extra[key] = {**extra[key], name: np.asarray(value[name])[keep]}
    return dataclasses.replace(data, splits=splits, extra=extra)


class TextFineTuner(Trainer):
    """`Trainer` that also fine-tunes `text` (a TextExtractor whose features `data`'s text modality holds, made by
    `with_text_features`) with its own learning rate. Resumable from `run_dir` like the Trainer."""

    def __init__(self, data: FeatureSet, model_config: MCIHNConfig, train_config: TrainConfig, run_dir: str | Path,
                 text, text_lr: float = DEFAULT_TEXT_LR):
        if not isinstance(model_config, MCIHNConfig):
            raise DataError("fine-tuning the text encoder is implemented for MCIHN only")
        if "text" not in model_config.modalities:
            raise DataError(f"the model config has no text modality ({', '.join(model_config.modalities)}); "
                            f"there is nothing to fine-tune")
        spec = data.spec.text
        if (spec.extractor, spec.revision, spec.dim, spec.seq_len) != (
                text.spec.extractor, text.spec.revision, text.spec.dim, text.spec.seq_len):
            raise DataError(f"dataset {data.name!r}'s text features are not this encoder's ({spec.extractor} "
                            f"{spec.seq_len}x{spec.dim}, encoder {text.spec.extractor} "
                            f"{text.spec.seq_len}x{text.spec.dim}); make them with with_text_features")
        self.text, self.text_lr = text, text_lr
        self.text_base = {"extractor": text.spec.extractor, "revision": text.spec.revision}
        self.text_core = text_core(text).to(train_config.device)
        self.best_text: dict[str, Tensor] | None = None
        self._pending: tuple[Batch, Batch] | None = None  # (batch, with text features) between the AAE and joint phases
        super().__init__(data, model_config, train_config, run_dir)
        # Training batches carry the tokens; their text features are computed by the encoder in the loop.
        for name, tensors in (("train", self.train_tensors), ("valid", self.valid_tensors)):
            tokens = tokenize_split(text, data[name].texts)
            tensors.features.update({n: torch.as_tensor(tokens[n], device=self.device) for n in _TOKENS})
            tensors.features.pop("text")

    # -- optimisers ----------------------------------------------------------------------------------------

    def _mcihn_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = super()._mcihn_optimizers()
        optimizers["text"] = torch.optim.Adam(list(self.text_core.parameters()), lr=self.text_lr)
        return optimizers

    def _step(self, name: str, loss: Tensor) -> None:
        """The joint phase's loss also steps the text encoder (eq. 19 through the encoder); the others do not."""
        if name != "joint":
            super()._step(name, loss)
            return
        text = self.optimizers["text"]
        text.zero_grad(set_to_none=True)
        super()._step(name, loss)
        text.step()

    def set_lr_scale(self, scale: float) -> None:
        super().set_lr_scale(scale)  # halving applies to the encoder's rate too, from its own base rate
        for group in self.optimizers["text"].param_groups:
            group["lr"] = self.text_lr * scale

    # -- one batch -----------------------------------------------------------------------------------------

    def _with_text(self, batch: Batch) -> Batch:
        features = {k: v for k, v in batch.features.items() if k not in _TOKENS}
        features["text"] = self.text_core(*(batch.features[n] for n in _TOKENS))
        return Batch(features, batch.lengths, batch.labels)

    def aae_phases(self, batch: Batch) -> dict[str, float]:
        with_text = self._with_text(batch)
        self._pending = (batch, with_text)  # the joint phase of this batch reuses the forward pass
        detached = {**with_text.features, "text": with_text.features["text"].detach()}
        return super().aae_phases(Batch(detached, batch.lengths, batch.labels))

    def joint_phase(self, batch: Batch) -> dict[str, float]:
        pending, self._pending = self._pending, None
        with_text = pending[1] if pending is not None and pending[0] is batch else self._with_text(batch)
        return super().joint_phase(with_text)

    # -- epochs --------------------------------------------------------------------------------------------

    def train_epoch(self) -> dict[str, float]:
        self.text_core.train()
        try:
            return super().train_epoch()
        finally:
            self._pending = None
            self.text_core.eval()

    def text_features(self, split: str) -> Tensor:
        """(N, T, H) text features of `split` by the current encoder (eval mode): what live extraction gives."""
        features = encode_texts(self.text, self.data[split].texts, device=self.device)
        return torch.as_tensor(features, device=self.device)

    def split_tensors(self, split: str) -> SplitTensors:
        """`split` as tensors, its text features by the current encoder."""
        tensors = self.valid_tensors if split == "valid" else SplitTensors(self.data[split], self.device)
        tensors.features["text"] = self.text_features(split)
        return tensors

    def validation_score(self) -> tuple[float, dict[str, float]]:
        self.split_tensors("valid")
        return super().validation_score()

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on `split` with the current model and encoder (after `fit`: the best epoch's)."""
        return evaluate(self.model, self.data, split, self.split_tensors(split))

    def fit(self, resume: bool = True):
        model = super().fit(resume)
        if self.best_text is not None:
            self.text_core.load_state_dict(self.best_text)
        self.text_core.eval()
        return model

    # -- resume --------------------------------------------------------------------------------------------

    def _text_state_path(self, epoch: int) -> Path:
        return self.run_dir / TEXT_STATE.format(epoch=epoch)

    def save_state(self) -> None:
        """The encoder's state goes to text_state_<epoch>.pt first, then the Trainer's train_state.pt (the commit
        point: a resume reads the text state of the epoch train_state.pt records), then older text states go."""
        if self.epoch > 0 and self.best_epoch == self.epoch - 1:  # fit just recorded a new best epoch
            self.best_text = {k: v.detach().clone() for k, v in self.text_core.state_dict().items()}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {"epoch": self.epoch, "encoder": self.text_core.state_dict(), "best_encoder": self.best_text,
                 "base": json.dumps(self.text_base), "text_lr": self.text_lr}
        path = self._text_state_path(self.epoch)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        super().save_state()
        for old in self.run_dir.glob(TEXT_STATE.format(epoch="*")):
            if old != path:
                old.unlink(missing_ok=True)

    def load_state(self) -> None:
        super().load_state()
        path = self._text_state_path(self.epoch)
        if not path.is_file():
            raise DataError(f"{self.run_dir} has a training state without the text encoder's ({path.name}); it was "
                            f"not written by a text fine-tuning run: use a new --out folder or --fresh")
        state = torch.load(path, weights_only=True, map_location=self.device)
        if json.loads(state["base"]) != self.text_base or state["text_lr"] != self.text_lr:
            raise DataError(f"{path} belongs to a run that fine-tunes another text encoder or at another text "
                            f"learning rate ({state['base']}, {state['text_lr']}); use a new --out folder or --fresh")
        self.text_core.load_state_dict(state["encoder"])
        self.best_text = state["best_encoder"]

    # -- the checkpoint ------------------------------------------------------------------------------------

    def save(self, directory: str | Path, metrics: dict | None = None) -> Path:
        """A checkpoint as `mcihn train` writes one, plus the fine-tuned encoder in `directory/text_encoder`
        (save_pretrained + its tokenizer), which the checkpoint's text spec names."""
        from engines.text import TextExtractor

        directory = Path(directory)
        folder = directory / TEXT_ENCODER_DIR
        self.text.encoder.save_pretrained(folder)
        self.text.tokenizer.save_pretrained(folder)
        # The spec of the saved folder as it loads (its absolute path, the content hash of its weights): what the
        # live pipeline's extractor will report for it.
        saved = TextExtractor(str(folder.resolve()), seq_len=self.text.seq_len)
        data = self.data
        self.data = dataclasses.replace(data, spec=dataclasses.replace(data.spec, text=saved.spec))
        try:
            super().save(directory, metrics)
        finally:
            self.data = data
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["metadata"]["text_encoder"] = {
            "folder": TEXT_ENCODER_DIR, "fine_tuned_from": self.text_base["extractor"],
            "base_revision": self.text_base["revision"], "text_lr": self.text_lr,
        }
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, config_path)
        return directory
