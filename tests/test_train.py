"""Training, resume, determinism and the `mcihn` command on a small synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mcihn.config import MCIHNConfig
from mcihn.data import FeatureSet, FeatureSplit, save_feature_store, spec_from_split
from mcihn.spec import MODALITIES
from mcihn.train import STATE_FILE, TrainConfig, Trainer, config_for_data, drop_modalities, evaluate
from tools.cli import main

DIMS = {"vision": (3, 6), "text": (4, 8), "audio": (5, 5)}  # (T, D)
MOSI = Path(__file__).resolve().parents[1].parent / "shared/data/cmu-mosi/mosi_utterance_features.npz"


def synthetic_split(n: int, seed: int) -> FeatureSplit:
    """Labels in [-3, 3] that depend on the mean text features and, less, on vision."""
    rng = np.random.default_rng(seed)
    feats = {m: rng.normal(size=(n, t, d)).astype(np.float32) for m, (t, d) in DIMS.items()}
    score = feats["text"].mean(1)[:, :3].sum(1) + 0.5 * feats["vision"].mean(1)[:, 0]
    labels = np.clip(score * 2, -3, 3).astype(np.float32)
    lengths = {m: np.full(n, t, dtype=np.int64) for m, (t, _) in DIMS.items()}
    return FeatureSplit(feats, lengths, labels, [f"s{seed}_{i}" for i in range(n)])


def synthetic_set() -> FeatureSet:
    splits = {"train": synthetic_split(256, 0), "valid": synthetic_split(64, 1), "test": synthetic_split(64, 2)}
    return FeatureSet("synthetic", splits, spec_from_split(splits["train"]))


def tiny(data: FeatureSet, **overrides) -> MCIHNConfig:
    sizes = {"latent_len": 4, "latent_dim": 16, "num_heads": 2, "dropout": 0.1}
    return config_for_data(data, MCIHNConfig(**{**sizes, **overrides}))


def test_training_learns_and_beats_constant_predictor(tmp_path):
    data = synthetic_set()
    trainer = Trainer(data, tiny(data), TrainConfig(seed=0, epochs=15, patience=15, progress=False), tmp_path)
    model = trainer.fit()
    metrics = evaluate(model, data, "test")
    constant_mae = float(np.abs(data["test"].labels - np.median(data["train"].labels)).mean())
    assert metrics["MAE"] < 0.8 * constant_mae
    assert metrics["Corr"] > 0.5
    assert {"reconstruction", "discriminator", "generator", "task", "adaptive"} <= set(trainer.history[0])


@pytest.mark.parametrize("ablation", ["MCIHN-1", "MCIHN-2", "-TA"])
def test_ablations_train(tmp_path, ablation):
    data = synthetic_set()
    cfg = config_for_data(data, MCIHNConfig.for_ablation(ablation, latent_len=4, latent_dim=16, num_heads=2))
    trainer = Trainer(data, cfg, TrainConfig(seed=0, epochs=2, progress=False), tmp_path)
    trainer.fit()
    losses = trainer.history[-1]
    assert ("reconstruction" in losses) == (ablation != "MCIHN-1")
    assert (losses["adaptive"] == 0.0) == (ablation == "MCIHN-2")


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_deterministic_and_resumable(tmp_path):
    data = synthetic_set()
    config = TrainConfig(seed=3, epochs=4, patience=10, progress=False)
    straight = _weights(Trainer(data, tiny(data), config, tmp_path / "a").fit())
    again = _weights(Trainer(data, tiny(data), config, tmp_path / "b").fit())
    assert all(torch.equal(straight[k], again[k]) for k in straight)

    # Interrupted after 2 epochs, then resumed by a new process-like Trainer on the same folder.
    Trainer(data, tiny(data), TrainConfig(seed=3, epochs=2, patience=10, progress=False), tmp_path / "c").fit()
    resumed = Trainer(data, tiny(data), config, tmp_path / "c")
    resumed_weights = _weights(resumed.fit())
    assert resumed.epoch == 4
    assert all(torch.equal(straight[k], resumed_weights[k]) for k in straight)


def test_resume_refuses_other_config(tmp_path):
    data = synthetic_set()
    Trainer(data, tiny(data), TrainConfig(seed=0, epochs=1, progress=False), tmp_path).fit()
    with pytest.raises(ValueError, match="another model config"):
        Trainer(data, tiny(data, dropout=0.3), TrainConfig(seed=0, epochs=2, progress=False), tmp_path).fit()


def test_resume_accepts_a_state_saved_before_newer_config_fields(tmp_path):
    """A run folder from before mmd_kernel_map / fusion_attention_dropout existed resumes (their defaults are the
    behaviour of that time)."""
    data = synthetic_set()
    Trainer(data, tiny(data), TrainConfig(seed=0, epochs=1, progress=False), tmp_path).save_state()
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    old_config = json.loads(state["model_config"])
    for new_field in ("mmd_kernel_map", "fusion_attention_dropout"):
        del old_config[new_field]
    state["model_config"] = json.dumps(old_config)
    torch.save(state, tmp_path / STATE_FILE)
    Trainer(data, tiny(data), TrainConfig(seed=0, epochs=1, progress=False), tmp_path).load_state()
    with pytest.raises(ValueError, match="another model config"):
        Trainer(data, tiny(data, mmd_kernel_map="minimised"), TrainConfig(seed=0, epochs=1, progress=False),
                tmp_path).load_state()


def test_modality_dropout_keeps_one_modality():
    torch.manual_seed(0)
    lengths = torch.tensor([[3, 4, 5]] * 500)
    dropped = drop_modalities(lengths, 0.9, MODALITIES)
    assert ((dropped > 0).sum(1) >= 1).all()
    assert (dropped == 0).any()
    assert torch.equal(drop_modalities(lengths, 0.0, MODALITIES), lengths)


def test_cli_train_eval_baseline_end_to_end(tmp_path, capsys):
    store = save_feature_store(synthetic_set(), tmp_path / "store")
    out = tmp_path / "run"
    assert main(["train", "--data", str(store), "--out", str(out), "--seeds", "2", "--epochs", "2"]) == 0
    table = capsys.readouterr().out
    assert "MCIHN full (2 seeds, test)" in table and "±" in table
    assert (out / "seed_1" / "model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 2 and set(summary["test"]) >= {"MAE", "Corr", "Acc-2 (non0)"}

    assert main(["eval", "--checkpoint", str(out), "--data", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["runs"]) == 2
    assert report["runs"][0]["MAE"] == pytest.approx(summary["runs"][0]["test"]["MAE"])

    assert main(["baseline", "--data", str(store), "--json"]) == 0
    assert "test" in json.loads(capsys.readouterr().out)


def test_cli_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]

    # A checkpoint trained on other dims is refused, naming modality and field.
    store = save_feature_store(synthetic_set(), tmp_path / "store")
    assert main(["train", "--data", str(store), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    other = synthetic_set()
    for split in other.splits.values():
        split.features["audio"] = split.features["audio"][:, :, :3].copy()
    other_store = save_feature_store(FeatureSet("other", other.splits, spec_from_split(other["train"])),
                                     tmp_path / "other")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(other_store)]) == 2
    err = capsys.readouterr().err
    assert "audio dim is 3" in err and "Traceback" not in err


@pytest.mark.skipif(not MOSI.exists(), reason=f"shared CMU-MOSI features not found at {MOSI}")
def test_mosi_one_epoch_learns(tmp_path):
    """On the real data one epoch of the utterance preset already beats the constant predictor."""
    from mcihn.data import load_mosi_npz
    from tools.cli import UTTERANCE_PRESET

    data = load_mosi_npz(MOSI)
    cfg = config_for_data(data, MCIHNConfig(**UTTERANCE_PRESET))
    model = Trainer(data, cfg, TrainConfig(seed=0, epochs=2, progress=False), tmp_path).fit()
    metrics = evaluate(model, data, "test")
    assert metrics["MAE"] < 1.2 and metrics["Acc-2 (non0)"] > 0.8
