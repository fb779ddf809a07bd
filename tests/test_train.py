"""Training, resume, determinism and the `mcihn` command on a small synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mcihn.checkpoint import load_checkpoint
from mcihn.config import MCIHNConfig
from mcihn.data import DataError, FeatureSet, FeatureSplit, save_feature_store, sentiment_classes, spec_from_split
from mcihn.mcn_cl import MCNCL, MCNCLConfig
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


# ---------------------------------------------------------------------------------------------------------
# MCN-CL through the same machinery (`mcihn train --model mcn-cl`)
# ---------------------------------------------------------------------------------------------------------

CLASSES = ["low", "mid", "high"]


def synthetic_classes() -> FeatureSet:
    """synthetic_set's regression labels binned into three classes (low < -1 <= mid <= 1 < high)."""
    splits = {}
    for name, split in synthetic_set().splits.items():
        labels = np.digitize(split.labels, [-1.0, 1.0 + 1e-6]).astype(np.int64)
        splits[name] = FeatureSplit(split.features, split.lengths, labels, split.ids)
    return FeatureSet("synthetic-classes", splits, spec_from_split(splits["train"]), "classification", CLASSES)


def tiny_mcn_cl(data: FeatureSet, **overrides) -> MCNCLConfig:
    sizes = {"d_model": 8, "num_heads": 2, "num_layers": 1, "psa_kernels": (1, 3), "projection_dim": 4,
             "hard_negatives": 2, "dropout": 0.1}
    return config_for_data(data, MCNCLConfig(**{**sizes, **overrides}))


def test_mcn_cl_trains_with_one_optimizer_and_no_aae(tmp_path):
    data = synthetic_classes()
    cfg = tiny_mcn_cl(data)
    assert cfg.input_dims == {m: d for m, (_, d) in DIMS.items()} and cfg.labels == CLASSES
    trainer = Trainer(data, cfg, TrainConfig(seed=0, epochs=2, progress=False), tmp_path)
    assert isinstance(trainer.fit(), MCNCL)
    assert list(trainer.optimizers) == ["joint"] and trainer.adaptive is None
    # The one Adam holds every parameter once: nothing is left untrained, nothing stepped twice.
    held = [id(p) for g in trainer.optimizers["joint"].param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in trainer.model.parameters())
    assert set(trainer.history[-1]) >= {"task", "contrastive"}
    assert not {"reconstruction", "discriminator", "generator", "adaptive"} & set(trainer.history[-1])
    assert trainer.history[-1]["contrastive"] > 0
    assert "adaptive" not in torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(evaluate(trainer.model, data, "test")) >= {"Acc", "F1 (weighted)"}


def test_mcn_cl_deterministic_and_resumable(tmp_path):
    data = synthetic_classes()
    config = TrainConfig(seed=2, epochs=4, patience=10, progress=False)
    straight = _weights(Trainer(data, tiny_mcn_cl(data), config, tmp_path / "a").fit())
    Trainer(data, tiny_mcn_cl(data), TrainConfig(seed=2, epochs=2, patience=10, progress=False), tmp_path / "b").fit()
    resumed = Trainer(data, tiny_mcn_cl(data), config, tmp_path / "b")
    resumed_weights = _weights(resumed.fit())
    assert resumed.epoch == 4 and len(resumed.history) == 4
    assert all(torch.equal(straight[k], resumed_weights[k]) for k in straight)
    # An MCIHN run folder is not resumed as MCN-CL (nor the other way round).
    with pytest.raises(ValueError, match="another model config"):
        Trainer(data, tiny(data), TrainConfig(seed=2, epochs=5, progress=False), tmp_path / "b").fit()


def test_mcn_cl_refuses_regression_data():
    with pytest.raises(DataError, match="MCN-CL classifies.*--target acc2-non0"):
        tiny_mcn_cl(synthetic_set())


def test_sentiment_classes_bin_as_the_mosi_metrics_do():
    data = synthetic_set()
    values = np.array([-3.2, -0.5, 0.0, 0.5, 1.5, 2.5, 3.4], dtype=np.float32)
    data.splits["test"].labels[: len(values)] = values
    n = len(data["test"])
    acc7 = sentiment_classes(data, "acc7")
    assert acc7.task == "classification" and acc7.label_names == ["-3", "-2", "-1", "0", "1", "2", "3"]
    # np.round halves to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2), as metrics' Acc-7.
    assert acc7["test"].labels[: len(values)].tolist() == [0, 3, 3, 3, 5, 5, 6]
    assert sentiment_classes(data, "acc2-has0")["test"].labels[: len(values)].tolist() == [0, 0, 1, 1, 1, 1, 1]
    non0 = sentiment_classes(data, "acc2-non0")
    assert len(non0["test"]) == n - 1 and "s2_2" not in non0["test"].ids  # the sample labelled exactly 0
    assert non0["test"].labels[:6].tolist() == [0, 0, 1, 1, 1, 1]
    assert non0.extra["target"] == "acc2-non0"
    with pytest.raises(DataError, match="drop --target"):
        sentiment_classes(synthetic_classes(), "acc7")


def test_cli_train_mcn_cl_then_eval(tmp_path, capsys):
    store = save_feature_store(synthetic_classes(), tmp_path / "store")
    out = tmp_path / "run"
    args = ["train", "--model", "mcn-cl", "--data", str(store), "--out", str(out), "--epochs", "2",
            "--preset", "small", "--ablation", "no-mining"]
    assert main(args) == 0
    assert "MCN-CL no-mining (1 seeds, test)" in capsys.readouterr().out
    stored = json.loads((out / "seed_0" / "config.json").read_text())
    assert stored["model_type"] == "mcn-cl" and stored["head"]["labels"] == CLASSES
    assert stored["model"]["hard_negative_mining"] is False and stored["model"]["d_model"] == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_type"] == "mcn-cl" and summary["runs"][0]["best_epoch"] in (0, 1)

    assert main(["eval", "--checkpoint", str(out), "--data", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models"] == ["MCN-CL"]
    assert report["runs"][0]["F1 (weighted)"] == pytest.approx(summary["runs"][0]["test"]["F1 (weighted)"])
    assert main(["eval", "--checkpoint", str(out), "--data", str(store)]) == 0
    assert "MCN-CL run (1 ckpt, test)" in capsys.readouterr().out

    # Rerunning resumes: nothing left to train, the same checkpoint.
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["runs"][0]["test"] == summary["runs"][0]["test"]


def test_cli_mcn_cl_faults_are_one_line(tmp_path, capsys):
    classes = save_feature_store(synthetic_classes(), tmp_path / "classes")
    regression = save_feature_store(synthetic_set(), tmp_path / "regression")
    for args, expected in (
        (["--data", str(regression)], "--target"),  # regression data: MCN-CL needs classes
        (["--data", str(classes), "--ablation", "MCIHN-1"], "not one of MCN-CL's"),
        (["--data", str(classes), "--target", "acc7"], "drop --target"),
    ):
        assert main(["train", "--model", "mcn-cl", "--out", str(tmp_path / "r"), "--epochs", "1", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_cli_mcn_cl_on_binned_sentiment(tmp_path, capsys):
    """--target bins MOSI-family sentiment; eval takes the checkpoint's target, and refuses a classifier on
    regression values when told another one."""
    store = save_feature_store(synthetic_set(), tmp_path / "store")
    out = tmp_path / "run"
    assert main(["train", "--model", "mcn-cl", "--target", "acc2-has0", "--data", str(store), "--out", str(out),
                 "--epochs", "1", "--preset", "small", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert json.loads((out / "seed_0" / "config.json").read_text())["metadata"]["target"] == "acc2-has0"
    assert main(["eval", "--checkpoint", str(out), "--data", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_std"]["Acc"][0] == pytest.approx(trained["Acc"][0])
    assert main(["eval", "--checkpoint", str(out), "--data", str(store), "--target", "acc7"]) == 2
    assert "predicts classes" in capsys.readouterr().err


def test_cli_compare_mcn_cl_names_the_model_and_ships_it(tmp_path, capsys):
    store = save_feature_store(synthetic_classes(), tmp_path / "store")
    out, ship = tmp_path / "run", tmp_path / "ship"
    assert main(["compare", "--model", "mcn-cl", "--data", str(store), "--out", str(out), "--seeds", "1",
                 "--epochs", "1", "--export", str(ship)]) == 0
    table = capsys.readouterr().out
    assert "| MCN-CL-small (1 seeds) |" in table and "| logistic regression" in table
    assert json.loads((out / "compare.json").read_text())["mcihn"]["model_type"] == "mcn-cl"
    shipped = load_checkpoint(ship)
    assert isinstance(shipped.model, MCNCL) and shipped.metadata["name"] == "MCN-CL-small SYNTHETIC"
