"""Dialogue context (`mcihn extract-text --context K`): which utterances are context, how the encoder reads them
(the target never cut for them, the oldest context words cut first), and the spec that records it."""

from __future__ import annotations

import numpy as np
import pytest
from test_text_emotion import MELD_HEADER

from engines.text import TextExtractor
from mcihn.checkpoint import load_checkpoint, save_checkpoint
from mcihn.data import DataError, dialogue_context, load_dataset
from mcihn.mcn_cl import MCNCL, MCNCLConfig
from mcihn.spec import context_turns
from mcihn.train import config_for_data
from tools.cli import main


def test_context_is_the_preceding_turns_of_the_same_dialogue_newest_first():
    # Shuffled on purpose: the order of the ids does not matter, only the dialogue and the turn index.
    ids = ["d1_u2", "d0_u0", "d1_u0", "d0_u2", "d1_u1", "d0_u1", "d0_u3", "d10_u0", "d1_u3"]
    texts = ["b2", "a0", "b0", "a2", "  ", "a1", "a3", "c0", "b3"]
    ctx = dict(zip(ids, dialogue_context(ids, texts, 2), strict=True))
    assert ctx["d0_u0"] == [] and ctx["d1_u0"] == [] and ctx["d10_u0"] == []  # a first turn has none
    assert ctx["d0_u1"] == ["a0"] and ctx["d0_u3"] == ["a2", "a1"]  # newest first, at most 2
    assert ctx["d1_u2"] == ["b0"]  # d1_u1 has no words: skipped
    assert ctx["d1_u3"] == ["b2", "b0"]
    later = {uid: [t for t in c if t[1] >= uid.split("_u")[1]] for uid, c in ctx.items()}
    assert not any(later.values())  # never the utterance itself nor a later one
    assert all(t[0] == {"d0": "a", "d1": "b", "d10": "c"}[uid.split("_")[0]] for uid, c in ctx.items() for t in c)
    assert dialogue_context(ids, texts, 0) == [[]] * len(ids)
    with pytest.raises(DataError, match="does not name its dialogue"):
        dialogue_context(["clip_7"], ["x"], 1)
    with pytest.raises(DataError, match="share an id"):
        dialogue_context(["d0_u1", "d0_u1"], ["x", "y"], 1)


@pytest.fixture(scope="module")
def texts(standin_models) -> tuple[TextExtractor, TextExtractor]:
    """(without context, with 2 turns of context in a 20-token window), both 12 tokens of the tiny BERT."""
    folder = str(standin_models["text"])
    return TextExtractor(folder, seq_len=12), TextExtractor(folder, seq_len=12, context_turns=2, context_window=20)


def test_the_target_is_never_cut_for_context_and_the_oldest_context_goes_first(texts):
    plain, ctx = texts
    for target in ("i feel great", "good " * 30 + "sad"):  # short, and longer than the 12-token window
        first = plain.tokenize([target])["input_ids"][0]
        first = first[first != plain.tokenizer.pad_token_id].tolist()
        context = ["that was a bad film", "this movie was really good " * 5]
        row = ctx.tokenize_with_context([target], [context])["input_ids"][0].tolist()
        assert row[: len(first)] == first  # [CLS] target [SEP] exactly as without context
        tokens = ctx.tokenizer.convert_ids_to_tokens(row)
        second = tokens[len(first):]
        assert len(row) <= 20 and second[-1] == "[SEP]" and len(second) >= 2
        newest = ctx.tokenizer.tokenize(context[0])
        assert second[: min(len(newest), len(second) - 1)] == newest[: len(second) - 1]  # the newest turn first
    # Room for both turns: the older one follows a [SEP], and nothing beyond the window.
    row = ctx.tokenize_with_context(["hi"], [["bad film", "good"]])["input_ids"][0]
    pieces = ctx.tokenizer.tokenize
    assert ctx.tokenizer.convert_ids_to_tokens(row.tolist()) == ["[CLS]", *pieces("hi"), "[SEP]", *pieces("bad film"),
                                                                  "[SEP]", *pieces("good"), "[SEP]"]


def test_context_conditions_the_targets_features_only(texts):
    plain, ctx = texts
    alone, with_ctx = ctx.extract_batch(["i feel great", "i feel great"], [[], ["that was a bad film"]])
    reference = plain.extract("i feel great")
    assert alone.length == with_ctx.length == reference.length == 5 and alone.values.shape == (12, 32)
    np.testing.assert_allclose(alone.values, reference.values, atol=1e-5)  # no context: the same features
    assert np.abs(with_ctx.values[:5] - reference.values[:5]).max() > 1e-3  # context changes them ...
    assert not with_ctx.values[5:].any()  # ... but only the target's positions are kept
    assert context_turns(ctx.spec) == 2
    assert context_turns(plain.spec) == 0
    with pytest.raises(ValueError, match="without context_turns"):
        plain.extract_batch(["x"], [["y"]])


def test_extract_text_context_store_and_checkpoint_record_it(standin_models, tmp_path):
    folder = tmp_path / "meld"
    folder.mkdir()
    rows = ["i feel great,Rachel,joy,positive,0,0", "that was a bad film,Ross,anger,negative,0,1",
            "no way,Joey,surprise,positive,0,2", "what a day,Monica,sadness,negative,1,0"]
    body = "".join(f'{i},{r},1,1,"00:00:01,000","00:00:02,000"\n' for i, r in enumerate(rows, 1))
    for name in ("train", "dev", "test"):
        (folder / f"{name}_sent_emo.csv").write_text(MELD_HEADER + body, encoding="utf-8")
    out = tmp_path / "store"
    text_model = str(standin_models["text"])
    assert main(["extract-text", "--data", str(folder), "--text", text_model, "--tokens", "12", "--context", "2",
                 "--context-window", "20", "--out", str(out)]) == 0
    store = load_dataset(out)
    assert context_turns(store.spec.text) == 2 and store.name.endswith("-context2")
    extractor = TextExtractor(text_model, seq_len=12, context_turns=2, context_window=20)
    texts = [r.split(",")[0] for r in rows]
    expected = extractor.extract_batch(texts, [[], [texts[0]], [texts[1], texts[0]], []])  # d1_u0: no context
    for got, want, length in zip(store["train"].features["text"], expected, store["train"].lengths["text"],
                                 strict=True):
        assert length == want.length
        np.testing.assert_allclose(got, want.values, atol=1e-5)
    # The checkpoint keeps the setting (its feature spec), so eval and live can tell.
    model = MCNCL(config_for_data(store, MCNCLConfig(d_model=8, num_heads=2, num_layers=1, psa_kernels=(1,),
                                                     projection_dim=4)))
    save_checkpoint(tmp_path / "ckpt", model, store.spec, {})
    assert context_turns(load_checkpoint(tmp_path / "ckpt").spec.text) == 2
    assert main(["extract-text", "--data", str(folder), "--text", text_model, "--tokens", "12", "--context", "2",
                 "--context-window", "13", "--out", str(tmp_path / "x")]) == 2
