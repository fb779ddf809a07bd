"""Training MCIHN with Algorithm 1 of the paper, or MCN-CL, early stopping on validation, resumable runs.

MCIHN: each batch runs the paper's phases in order: (1) reconstruction: update encoders and decoders on eq. 4;
(2) regularisation: update the discriminators on eq. 5, then the encoders against them; (3) joint: update
everything on L(Mul) + lambda * L(Adp) (eq. 19). Without the AAE (MCIHN-1) only phase 3 runs.

MCN-CL (mcihn/mcn_cl.py): only the joint step, one Adam over every parameter on cross-entropy + the weighted
supervised contrastive loss (`MCNCL.training_loss`). Seeds, modality dropout, early stopping, learning-rate
halving and resuming are the same machinery for both.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mcihn.checkpoint import save_checkpoint
from mcihn.config import MCIHNConfig
from mcihn.data import SENTIMENT_TARGETS, DataError, FeatureSet, FeatureSplit
from mcihn.losses import (
    AdaptiveLoss,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
    task_loss,
)
from mcihn.mcn_cl import MCNCL, MCNCLConfig
from mcihn.metrics import compute_metrics
from mcihn.model import MCIHN, ModalityAAE
from mcihn.spec import MODALITIES

STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    """Optimisation settings (paper section 4.3: Adam, lr 1e-3, batch 32, early stopping)."""

    seed: int = 0
    epochs: int = 100
    patience: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    # Halve every learning rate after this many epochs without a validation improvement (0 = never).
    lr_decay_patience: int = 2
    # A validation improvement smaller than this does not count (stops long tails of tiny gains).
    min_delta: float = 1e-3
    # Classification: "none", or "balanced" to weigh each class's cross-entropy by n / (C * its train count).
    class_weights: str = "none"
    device: str = "cpu"
    progress: bool = True


@dataclass
class Batch:
    features: dict[str, Tensor]  # modality -> (B, T, D)
    lengths: Tensor  # (B, 3) int64, MODALITIES order
    labels: Tensor  # (B,)


class SplitTensors:
    """A split held as tensors once, sliced into batches by index."""

    def __init__(self, split: FeatureSplit, device: torch.device):
        self.features = {m: torch.as_tensor(np.asarray(split.features[m]), dtype=torch.float32, device=device)
                         for m in MODALITIES}
        self.lengths = torch.as_tensor(np.stack([split.lengths[m] for m in MODALITIES], axis=1), dtype=torch.long,
                                       device=device)
        self.labels = torch.as_tensor(np.asarray(split.labels), device=device)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor) -> Batch:
        return Batch({m: f[index] for m, f in self.features.items()}, self.lengths[index], self.labels[index])

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start : start + batch_size].to(self.labels.device))


def config_for_data(data: FeatureSet, base: MCIHNConfig | MCNCLConfig | None = None,
                    **overrides) -> MCIHNConfig | MCNCLConfig:
    """A model config whose input dims, sequence lengths and head fit `data`; of `base`'s model (MCIHN when None)."""
    if isinstance(base, MCNCLConfig):
        return _mcn_cl_config_for_data(data, base, **overrides)
    base_dict = (base or MCIHNConfig()).to_dict()
    base_dict["input_dims"] = {m: data.spec[m].dim for m in MODALITIES}
    base_dict["seq_lens"] = {m: data.spec[m].seq_len for m in MODALITIES}
    base_dict["head"] = data.task
    base_dict["labels"] = list(data.label_names or []) if data.task == "classification" else []
    base_dict.update(overrides)
    return MCIHNConfig.from_dict(base_dict)


def _mcn_cl_config_for_data(data: FeatureSet, base: MCNCLConfig, **overrides) -> MCNCLConfig:
    """MCN-CL's config for `data`: it only classifies (its contrastive loss needs classes), so regression data is
    refused, naming the targets that bin MOSI-family sentiment into classes."""
    if data.task != "classification":
        raise DataError(f"MCN-CL classifies, and dataset {data.name!r} is {data.task}: pass --target "
                        f"{'|'.join(SENTIMENT_TARGETS)} to bin its sentiment into classes, or use --model mcihn")
    base_dict = base.to_dict()
    base_dict["input_dims"] = {m: data.spec[m].dim for m in MODALITIES}
    base_dict["seq_lens"] = {m: data.spec[m].seq_len for m in MODALITIES}
    base_dict["labels"] = list(data.label_names or [])
    base_dict.update(overrides)
    return MCNCLConfig.from_dict(base_dict)


def feature_stats(split: FeatureSplit, modality: str) -> tuple[Tensor, Tensor]:
    """Mean and std per feature dim over the valid steps of present samples of the training split."""
    x = np.asarray(split.features[modality])
    valid = np.arange(x.shape[1])[None, :] < split.lengths[modality][:, None]
    steps = x[valid]
    if steps.shape[0] == 0:
        return torch.zeros(x.shape[2]), torch.ones(x.shape[2])
    return torch.as_tensor(steps.mean(0), dtype=torch.float32), torch.as_tensor(steps.std(0), dtype=torch.float32)


def class_weights(data: FeatureSet, kind: str, device: torch.device | str = "cpu") -> Tensor | None:
    """(C,) float32 cross-entropy weights for `kind` ("none" -> None; "balanced" -> n / (C * count_c) on the
    train split, 0 for a class absent from it)."""
    if kind == "none" or data.task != "classification":
        return None
    if kind != "balanced":
        raise ValueError(f"unknown class weights {kind!r}; use none or balanced")
    labels = np.asarray(data["train"].labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(data.label_names)).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (len(counts) * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


def drop_modalities(lengths: Tensor, probability: float, modalities: tuple[str, ...]) -> Tensor:
    """Modality dropout: hide each present modality of a sample with `probability`, keeping at least one."""
    if probability <= 0:
        return lengths
    columns = [MODALITIES.index(m) for m in modalities]
    present = lengths[:, columns] > 0
    drop = (torch.rand(present.shape, device=lengths.device) < probability) & present
    all_gone = (present & ~drop).sum(dim=1) == 0
    drop[all_gone] = False
    out = lengths.clone()
    out[:, columns] = torch.where(drop, torch.zeros_like(lengths[:, columns]), lengths[:, columns])
    return out


@torch.no_grad()
def predict(model: MCIHN | MCNCL, split: FeatureSplit | SplitTensors, batch_size: int = 256) -> np.ndarray:
    """Predictions for a split: (N,) values (regression) or (N, C) softmax scores (classification)."""
    model.eval()
    device = next(model.parameters()).device
    tensors = split if isinstance(split, SplitTensors) else SplitTensors(split, device)
    outputs = [model(b.features["vision"], b.features["text"], b.features["audio"], b.lengths)
               for b in tensors.batches(batch_size)]
    return torch.cat(outputs).cpu().numpy()


def evaluate(model: MCIHN | MCNCL, data: FeatureSet, split: str,
             tensors: SplitTensors | None = None) -> dict[str, float]:
    """Metrics of `model` on one split of `data` (MMSA definitions, see metrics.py)."""
    scores = predict(model, tensors if tensors is not None else data[split])
    labels = np.asarray(data[split].labels)
    if data.task == "classification":
        return compute_metrics("classification", data.metric_family, scores.argmax(-1), labels, len(data.label_names))
    return compute_metrics("regression", data.metric_family, scores, labels)


class Trainer:
    """Trains one model (MCIHN, or MCN-CL for an MCNCLConfig) on one seed; `fit` is resumable from
    `run_dir/train_state.pt`."""

    def __init__(self, data: FeatureSet, model_config: MCIHNConfig | MCNCLConfig, train_config: TrainConfig,
                 run_dir: str | Path):
        self.data, self.cfg, self.tc = data, model_config, train_config
        self.run_dir = Path(run_dir)
        self.device = torch.device(train_config.device)
        self.is_mcn_cl = isinstance(model_config, MCNCLConfig)
        torch.manual_seed(train_config.seed)
        self.model = (MCNCL if self.is_mcn_cl else MCIHN)(model_config).to(self.device)
        for m in model_config.modalities:
            mean, std = feature_stats(data["train"], m)
            self.model.set_feature_stats(m, mean.to(self.device), std.to(self.device))
        # MCIHN's adaptive loss (eq. 12-14) has parameters of its own; MCN-CL has no such loss.
        self.adaptive = None if self.is_mcn_cl else AdaptiveLoss(model_config).to(self.device)
        self.class_weight = class_weights(data, train_config.class_weights, self.device)
        self.train_tensors = SplitTensors(data["train"], self.device)
        self.valid_tensors = SplitTensors(data["valid"], self.device)
        self.generator = torch.Generator().manual_seed(train_config.seed)
        self.optimizers = self._mcn_cl_optimizers() if self.is_mcn_cl else self._mcihn_optimizers()
        self.epoch = 0
        self.lr_scale = 1.0
        self.best_score = math.inf
        self.best_epoch = -1
        self.best_state: dict[str, Tensor] | None = None
        self.history: list[dict] = []

    def _adam(self, params: list[Tensor]) -> torch.optim.Optimizer:
        # The fused kernel is several times faster on CPU for these many small parameter tensors.
        return torch.optim.Adam(params, lr=self.tc.lr, fused=True)

    def _mcn_cl_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam over every parameter: MCN-CL has a single loss and no adversarial players."""
        return {"joint": self._adam(list(self.model.parameters()))}

    def _mcihn_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Algorithm 1's optimisers: one per AAE phase (with the AAE) and the joint one."""
        model_config = self.cfg
        paths = [self.model.paths[m] for m in model_config.modalities]
        encoders = [p for path in paths for p in path.encoder.parameters()]
        adam = self._adam
        aux_ids = set()
        optimizers: dict[str, torch.optim.Optimizer] = {}
        if model_config.use_aae:
            decoders = [p for path in paths for p in path.decoder.parameters()]
            discriminators = [p for path in paths for p in path.discriminator.parameters()]
            aux_ids = {id(p) for p in decoders + discriminators}
            optimizers["reconstruction"] = adam(encoders + decoders)
            optimizers["discriminator"] = adam(discriminators)
            optimizers["generator"] = adam(encoders)
        joint = [p for p in self.model.parameters() if id(p) not in aux_ids] + list(self.adaptive.parameters())
        optimizers["joint"] = adam(joint)
        return optimizers

    # -- one batch -----------------------------------------------------------------------------------------

    def _step(self, name: str, loss: Tensor) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def aae_inputs(self, batch: Batch) -> list[tuple[ModalityAAE, Tensor, Tensor]]:
        """Per modality (path, standardised x (B', T, D), valid (B', T)) over the samples where it is present."""
        inputs = []
        for m in self.cfg.modalities:
            valid = self.model.valid_steps(m, len(batch.labels), batch.lengths)
            keep = valid.any(dim=1)
            if bool(keep.any()):
                path = self.model.paths[m]
                inputs.append((path, path.normalise(batch.features[m][keep], valid[keep]), valid[keep]))
        return inputs

    def reconstruction_phase(self, inputs: list[tuple[ModalityAAE, Tensor, Tensor]]) -> float:
        """Algorithm 1 lines 9-12: encoders and decoders descend eq. 4, summed over modalities."""
        rec = sum(reconstruction_loss(x, p.decoder(p.encoder(x, v)), v) for p, x, v in inputs)
        self._step("reconstruction", rec)
        return rec.item()

    def discriminator_phase(self, inputs: list[tuple[ModalityAAE, Tensor, Tensor]]) -> float:
        """Algorithm 1 line 13, first half: the discriminators learn prior samples (real) from codes (fake)."""
        disc = 0
        for p, x, v in inputs:
            with torch.no_grad():
                code = p.encoder(x, v)
            disc = disc + discriminator_loss(p.discriminator(torch.randn_like(code)), p.discriminator(code))
        self._step("discriminator", disc)
        return disc.item()

    def generator_phase(self, inputs: list[tuple[ModalityAAE, Tensor, Tensor]]) -> float:
        """Algorithm 1 line 13, second half: the encoders make their codes pass the fixed discriminators."""
        gen = sum(generator_loss(p.discriminator(p.encoder(x, v))) for p, x, v in inputs)
        self._step("generator", gen)
        return gen.item()

    def aae_phases(self, batch: Batch) -> dict[str, float]:
        """Algorithm 1 lines 8-13 for every modality: reconstruction, then discriminator, then generator."""
        inputs = self.aae_inputs(batch)
        if not inputs:
            return {}
        losses = {"reconstruction": self.reconstruction_phase(inputs)}
        losses["discriminator"] = self.discriminator_phase(inputs)
        losses["generator"] = self.generator_phase(inputs)
        return losses

    def joint_phase(self, batch: Batch) -> dict[str, float]:
        """Algorithm 1 lines 14-23: CGMM, FFM, L(Combined) = L(Mul) + lambda * L(Adp). MCN-CL: its own loss."""
        if self.is_mcn_cl:
            return self.mcn_cl_phase(batch)
        lengths = drop_modalities(batch.lengths, self.cfg.modality_dropout, self.cfg.modalities)
        out = self.model.forward_train(batch.features, lengths)
        mul = task_loss(out.prediction, batch.labels, self.cfg.head, self.class_weight)
        adp = self.adaptive(out.codes, out.pair_features, out.present) if self.cfg.use_cgmm else mul.new_zeros(())
        self._step("joint", mul + self.cfg.adaptive_loss_weight * adp)
        return {"task": mul.item(), "adaptive": adp.item()}

    def mcn_cl_phase(self, batch: Batch) -> dict[str, float]:
        """MCN-CL's one step: cross-entropy + contrastive_weight * the supervised contrastive loss, with the same
        modality dropout as MCIHN (so absent modalities, masked by the missing token, are seen in training)."""
        lengths = drop_modalities(batch.lengths, self.cfg.modality_dropout, self.cfg.modalities)
        out = self.model.forward_train(batch.features, lengths)
        loss, parts = self.model.training_loss(out, batch.labels, self.class_weight)
        self._step("joint", loss)
        return parts

    # -- epochs --------------------------------------------------------------------------------------------

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        for batch in self.train_tensors.batches(self.tc.batch_size, self.generator):
            losses = self.aae_phases(batch) if not self.is_mcn_cl and self.cfg.use_aae else {}
            losses.update(self.joint_phase(batch))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}

    def validation_score(self) -> tuple[float, dict[str, float]]:
        """Lower is better: MAE for regression, 1 - weighted F1 for classification."""
        metrics = evaluate(self.model, self.data, "valid", self.valid_tensors)
        score = metrics["MAE"] if self.cfg.head == "regression" else 1.0 - metrics["F1 (weighted)"]
        return score, metrics

    def fit(self, resume: bool = True) -> MCIHN | MCNCL:
        """Train until early stopping; returns the model with the best validation weights loaded."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.run_dir / STATE_FILE).exists():
            self.load_state()
        bar = tqdm(total=self.tc.epochs, initial=self.epoch, desc=f"seed {self.tc.seed}", unit="epoch",
                   disable=not self.tc.progress, leave=False)
        while self.epoch < self.tc.epochs and self.epoch - self.best_epoch <= self.tc.patience:
            start = time.perf_counter()
            losses = self.train_epoch()
            score, metrics = self.validation_score()
            if not math.isfinite(losses.get("task", 0.0)):
                raise FloatingPointError(f"training diverged at epoch {self.epoch} (task loss {losses['task']})")
            if score < self.best_score - self.tc.min_delta:
                self.best_score, self.best_epoch = score, self.epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            elif self.tc.lr_decay_patience and (self.epoch - self.best_epoch) % self.tc.lr_decay_patience == 0:
                self.set_lr_scale(self.lr_scale / 2)
            self.history.append({"epoch": self.epoch, **losses, **{f"valid {k}": v for k, v in metrics.items()},
                                 "seconds": time.perf_counter() - start})
            self.epoch += 1
            self.save_state()
            bar.update(1)
            bar.set_postfix(task=f"{losses['task']:.3f}", valid=f"{score:.3f}", best=self.best_epoch)
        bar.close()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return self.model

    @property
    def train_seconds(self) -> float:
        """Wall seconds spent in training and validation epochs, over every call of `fit` (resumes included)."""
        return float(sum(h.get("seconds", 0.0) for h in self.history))

    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale = scale
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = self.tc.lr * scale

    # -- resume --------------------------------------------------------------------------------------------

    def save_state(self) -> None:
        state = {
            "epoch": self.epoch,
            "lr_scale": self.lr_scale,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "model": self.model.state_dict(),
            **({} if self.adaptive is None else {"adaptive": self.adaptive.state_dict()}),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "history": json.dumps(self.history),
            "train_config": json.dumps(asdict(self.tc)),
            "model_config": json.dumps(self.cfg.to_dict()),
        }
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / STATE_FILE)

    def load_state(self) -> None:
        state = torch.load(self.run_dir / STATE_FILE, weights_only=True, map_location=self.device)
        # Through from_dict, so a state saved before a config field existed matches that field's default.
        if self._saved_config(state) != self.cfg.to_dict():
            raise DataError(f"{self.run_dir / STATE_FILE} belongs to a run with another model config; "
                             f"use a new --out folder or delete it to start over")
        self.model.load_state_dict(state["model"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        self.epoch, self.best_score, self.best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
        self.best_state = state["best_state"]
        self.set_lr_scale(state["lr_scale"])
        self.history = json.loads(state["history"])

    def _saved_config(self, state: dict) -> dict | None:
        """The saved run's model config as this run's config class reads it (through from_dict, so a state saved
        before a field existed matches that field's default); None when it is another model's (an MCIHN state
        under --model mcn-cl, or the other way round: from_dict refuses the other's fields)."""
        try:
            return type(self.cfg).from_dict(json.loads(state["model_config"])).to_dict()
        except (TypeError, ValueError):
            return None

    def save(self, directory: str | Path, metrics: dict | None = None) -> Path:
        meta = {"train": asdict(self.tc), "best_epoch": self.best_epoch, "dataset": self.data.name,
                "metric_family": self.data.metric_family, "metrics": metrics or {}}
        if "target" in self.data.extra:  # sentiment binned into classes: eval bins its data the same way
            meta["target"] = self.data.extra["target"]
        return save_checkpoint(directory, self.model, self.data.spec, meta)
