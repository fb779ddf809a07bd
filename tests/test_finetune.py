"""Fine-tuning the text encoder with MCIHN (mcihn/finetune.py, `mcihn finetune-text`), with the tiny BERT stand-in."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from engines.extractors import ExtractorOptions, build_extractor
from engines.text import TextExtractor
from mcihn.checkpoint import load_checkpoint
from mcihn.config import MCIHNConfig
from mcihn.data import DataError, FeatureSet, FeatureSplit, load_feature_store, save_feature_store, spec_from_split
from mcihn.finetune import TEXT_ENCODER_DIR, TextFineTuner, encode_texts, with_text_features
from mcihn.train import TrainConfig, Trainer, config_for_data, predict

TOKENS = 8
POSITIVE, NEGATIVE = ("good", "great", "happy", "love"), ("bad", "sad", "angry", "hate")


def split(n: int, seed: int) -> FeatureSplit:
    """Sentiment carried by the words (vision and audio are noise); one utterance without words (text absent)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        positive = bool(rng.integers(0, 2))
        words = rng.choice(POSITIVE if positive else NEGATIVE, size=int(rng.integers(1, 4)))
        texts.append("" if i == n - 1 else "the movie was " + " ".join(words))
        labels.append((2.0 if positive else -2.0) + rng.normal(0, 0.3))
    feats = {"vision": rng.normal(size=(n, 2, 3)), "text": np.zeros((n, 1, 2)), "audio": rng.normal(size=(n, 2, 4))}
    feats = {m: f.astype(np.float32) for m, f in feats.items()}
    lengths = {m: np.full(n, f.shape[1], np.int64) for m, f in feats.items()}
    return FeatureSplit(feats, lengths, np.asarray(labels, np.float32), [f"s{seed}_{i}" for i in range(n)], texts)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these tiny models run several times faster so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def raw() -> FeatureSet:
    splits = {"train": split(48, 0), "valid": split(16, 1), "test": split(16, 2)}
    return FeatureSet("words", splits, spec_from_split(splits["train"]))


def encoder(standin_models) -> TextExtractor:
    """A fresh copy of the tiny BERT's pretrained weights (fine-tuning changes the extractor it is given)."""
    return TextExtractor(str(standin_models["text"]), seq_len=TOKENS)


@pytest.fixture(scope="module")
def data(raw, standin_models) -> FeatureSet:
    return with_text_features(raw, encoder(standin_models))


def tiny(data: FeatureSet) -> MCIHNConfig:
    return config_for_data(data, MCIHNConfig(latent_len=2, latent_dim=8, num_heads=2, dropout=0.1))


def train_config(**kw) -> TrainConfig:
    return TrainConfig(**{"seed": 0, "epochs": 2, "patience": 10, "progress": False, **kw})


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def trained(data, standin_models, tmp_path_factory):
    """A fine-tuned trainer (2 epochs) and its checkpoint."""
    root = tmp_path_factory.mktemp("finetuned")
    trainer = TextFineTuner(data, tiny(data), train_config(), root / "state", encoder(standin_models))
    trainer.fit()
    metrics = {"test": trainer.evaluate("test")}
    trainer.save(root / "ckpt", metrics)
    return trainer, root / "ckpt", metrics


def test_with_text_features_are_the_extractors(raw, data, standin_models):
    text = encoder(standin_models)
    extracted = text.extract_batch(raw["test"].texts)
    np.testing.assert_allclose(data["test"].features["text"], np.stack([f.values for f in extracted]), atol=1e-5)
    assert data["test"].lengths["text"].tolist() == [f.length for f in extracted]
    assert data["test"].lengths["text"][-1] == 0  # no words: text absent
    assert data.spec.text == text.spec and data.spec.vision == raw.spec.vision
    np.testing.assert_array_equal(data["train"].features["audio"], raw["train"].features["audio"])


def test_fine_tuning_moves_every_encoder_layer_and_the_frozen_path_moves_none(trained, data, standin_models, tmp_path):
    base = weights(encoder(standin_models).encoder)
    trainer = trained[0]
    moved = changed(base, trainer.text.encoder)
    layer_weights = {k for k in base if k.startswith("encoder.layer.") and k.endswith("weight")}
    assert layer_weights and layer_weights <= moved
    assert "embeddings.word_embeddings.weight" in moved

    # The frozen path: `mcihn train`'s Trainer on the same encoder's features never touches the encoder.
    frozen = encoder(standin_models)
    Trainer(data, tiny(data), train_config(), tmp_path / "frozen").fit()
    assert not changed(base, frozen.encoder)
    # text lr 0: MCIHN learns, the encoder stays (so only the encoder's own optimiser moves it).
    still = encoder(standin_models)
    zero = TextFineTuner(data, tiny(data), train_config(), tmp_path / "zero", still, text_lr=0.0)
    start = weights(zero.model)
    zero.fit()
    assert not changed(base, still.encoder)
    assert changed(start, zero.model)


def test_only_the_joint_phase_sends_gradients_into_the_encoder(data, standin_models, tmp_path):
    trainer = TextFineTuner(data, tiny(data), train_config(), tmp_path, encoder(standin_models))
    batch = next(trainer.train_tensors.batches(16, trainer.generator))
    trainer.text_core.train()
    assert {"reconstruction", "discriminator", "generator"} <= set(trainer.aae_phases(batch))
    assert all(p.grad is None for p in trainer.text_core.parameters())
    trainer.joint_phase(batch)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainer.text_core.parameters())


def test_saved_encoder_reloads_and_gives_the_features_the_model_saw(trained, data, standin_models):
    trainer, folder, _ = trained
    ckpt = load_checkpoint(folder)
    assert ckpt.spec.text.extractor == str((folder / TEXT_ENCODER_DIR).resolve())
    assert ckpt.metadata["text_encoder"]["fine_tuned_from"] == str(standin_models["text"])
    # Built as the live pipeline builds a checkpoint's extractors: from its spec.
    reloaded = build_extractor("text", ExtractorOptions.from_spec(ckpt.spec))
    assert reloaded.spec == ckpt.spec.text  # id, revision, layer, preprocessing: the live spec check passes
    texts = data["test"].texts
    live = reloaded.extract_batch(texts)
    seen = trainer.text_features("test").numpy()
    np.testing.assert_allclose(np.stack([f.values for f in live]), seen, atol=1e-5)
    assert [f.length for f in live] == data["test"].lengths["text"].tolist()
    assert np.abs(seen - data["test"].features["text"]).max() > 1e-3  # the fine-tuned encoder's, not the base's
    # The checkpoint's model on the reloaded encoder's features predicts what the trained model did.
    tensors = trainer.split_tensors("test")
    expected = predict(trainer.model, tensors)
    tensors.features["text"] = torch.as_tensor(np.stack([f.values for f in live]))
    np.testing.assert_allclose(predict(ckpt.model, tensors), expected, atol=1e-5)


def test_resume_continues_from_the_saved_state(data, standin_models, tmp_path):
    def run(epochs: int, folder: str) -> TextFineTuner:
        trainer = TextFineTuner(data, tiny(data), train_config(seed=1, epochs=epochs), tmp_path / folder,
                                encoder(standin_models))
        trainer.fit()
        return trainer

    straight = run(3, "a")
    run(1, "b")
    resumed = run(3, "b")  # a new trainer on the folder, as after an interruption
    assert resumed.epoch == 3 and len(resumed.history) == 3
    assert not changed(weights(straight.model), resumed.model)
    assert not changed(weights(straight.text.encoder), resumed.text.encoder)
    assert changed(weights(encoder(standin_models).encoder), resumed.text.encoder)
    assert [p.name for p in (tmp_path / "b").glob("text_state_*.pt")] == ["text_state_3.pt"]
    with pytest.raises(DataError, match="another text learning rate"):
        TextFineTuner(data, tiny(data), train_config(seed=1, epochs=4), tmp_path / "b", encoder(standin_models),
                      text_lr=1e-4).fit()


class Scripted(TextFineTuner):
    """Validation scores scripted (epoch 1 best), and the encoder's weights recorded after every epoch."""

    SCORES = (1.0, 0.5, 0.9, 0.8)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.after_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def validation_score(self):
        _, metrics = super().validation_score()
        return self.SCORES[self.epoch], metrics

    def save_state(self):
        self.after_epoch[self.epoch - 1] = weights(self.text_core)
        super().save_state()


def test_early_stopping_keeps_the_best_epochs_encoder_across_a_resume(data, standin_models, tmp_path):
    def run(epochs: int) -> Scripted:
        trainer = Scripted(data, tiny(data), train_config(epochs=epochs), tmp_path, encoder(standin_models))
        trainer.fit()
        return trainer

    first = run(3)  # interrupted after epoch 2; epoch 1 was the best
    resumed = run(4)
    assert resumed.best_epoch == 1 and resumed.epoch == 4
    assert not changed(first.after_epoch[1], resumed.text_core)
    assert changed(resumed.after_epoch[3], resumed.text_core)  # not the last epoch's


def test_checkpoint_evaluates_with_mcihn_eval(trained, raw, tmp_path, capsys):
    from tools.cli import main

    _, folder, metrics = trained
    ckpt = load_checkpoint(folder)
    reloaded = build_extractor("text", ExtractorOptions.from_spec(ckpt.spec))
    store = save_feature_store(with_text_features(raw, reloaded), tmp_path / "store")
    ckpt.check_features(load_feature_store(store).spec)  # every identity field, not only the shapes
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(folder), "--data", str(store), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["runs"][0]
    for key, value in metrics["test"].items():
        assert result[key] == pytest.approx(value, abs=1e-5), key


def test_finetune_text_command_writes_a_checkpoint_the_live_pipeline_loads(raw, standin_models, tmp_path):
    from realtime.config import LiveConfig
    from realtime.stack import load_stack
    from tools.finetune import add_parser, run

    store = save_feature_store(raw, tmp_path / "words")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    args = parser.parse_args(["finetune-text", "--data", str(store), "--text", str(standin_models["text"]),
                              "--tokens", str(TOKENS), "--text-only", "--epochs", "2", "--preset", "small",
                              "--text-lr", "1e-3", "--out", str(out)])
    assert args.text_lr == 1e-3 and args.lr == 1e-3 and args.seeds == 1
    assert run(args) == 0
    seed = out / "seed_0"
    for name in ("model.safetensors", "config.json", f"{TEXT_ENCODER_DIR}/config.json",
                 f"{TEXT_ENCODER_DIR}/model.safetensors", f"{TEXT_ENCODER_DIR}/tokenizer_config.json"):
        assert (seed / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["text_finetuned"] == {"from": str(standin_models["text"]), "text_lr": 1e-3}
    assert json.loads((seed / "config.json").read_text())["metadata"]["text_encoder"]["text_lr"] == 1e-3

    stack = load_stack(LiveConfig(checkpoint=str(out), cache_dir=str(tmp_path / "cache"), backend="torch",
                                  device="cpu"))
    assert stack.modalities == ("text",)
    assert stack.models["text"] == str((seed / TEXT_ENCODER_DIR).resolve())
    live = stack.extractors["text"].extract("the movie was good").values
    base = encode_texts(encoder(standin_models), ["the movie was good"])[0]
    assert np.abs(live - base).max() > 1e-3  # the fine-tuned encoder runs live, not the pretrained one
