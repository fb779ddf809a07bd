"""Dataset loaders, the feature store and validation (mcihn.data)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mcihn.data import (
    SPLITS,
    DataError,
    FeatureSet,
    FeatureSplit,
    detect_format,
    load_dataset,
    load_feature_store,
    load_mmsa_pickle,
    load_mosi_npz,
    save_feature_store,
    spec_from_split,
    validate_feature_set,
)
from mcihn.spec import MODALITIES

MOSI_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/cmu-mosi"
MOSI_NPZ = MOSI_DIR / "mosi_utterance_features.npz"

DIMS = {"vision": (4, 3), "text": (5, 6), "audio": (7, 2)}  # modality -> (T, D)


def make_split(n: int, seed: int = 0, dims: dict[str, tuple[int, int]] = DIMS) -> FeatureSplit:
    """A random split of n samples; every modality present at full length."""
    rng = np.random.default_rng(seed)
    return FeatureSplit(
        features={m: rng.standard_normal((n, t, d)).astype(np.float32) for m, (t, d) in dims.items()},
        lengths={m: np.full(n, dims[m][0], dtype=np.int64) for m in MODALITIES},
        labels=rng.uniform(-3, 3, n).astype(np.float32),
        ids=[f"s{seed}_{i}" for i in range(n)],
        texts=[f"text {i}" for i in range(n)],
    )


def make_set(sizes: tuple[int, int, int] = (6, 3, 4)) -> FeatureSet:
    splits = {name: make_split(n, seed) for seed, (name, n) in enumerate(zip(SPLITS, sizes, strict=True))}
    return FeatureSet(name="synthetic", splits=splits, spec=spec_from_split(splits["train"]))


def assert_same(a: FeatureSet, b: FeatureSet) -> None:
    assert (a.name, a.task, a.metric_family, a.label_names, a.spec) == (
        b.name,
        b.task,
        b.metric_family,
        b.label_names,
        b.spec,
    )
    for name in SPLITS:
        x, y = a[name], b[name]
        assert x.ids == y.ids and x.texts == y.texts
        np.testing.assert_array_equal(x.labels, y.labels)
        assert x.labels.dtype == y.labels.dtype
        for m in MODALITIES:
            np.testing.assert_array_equal(x.features[m], y.features[m])
            np.testing.assert_array_equal(x.lengths[m], y.lengths[m])
            assert y.features[m].dtype == np.float32 and y.lengths[m].dtype == np.int64


# --- CMU-MOSI npz ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not MOSI_NPZ.is_file(), reason=f"shared CMU-MOSI data not present at {MOSI_DIR}")
def test_mosi_npz_shapes_and_splits():
    fs = load_mosi_npz(MOSI_NPZ)
    assert (fs.name, fs.task, fs.metric_family) == ("cmu-mosi-utterance", "regression", "mosi")
    assert {s: len(fs[s]) for s in SPLITS} == {"train": 1284, "valid": 229, "test": 686}
    train = fs["train"]
    assert train.features["vision"].shape == (1284, 1, 100)
    assert train.features["text"].shape == (1284, 1, 100)
    assert train.features["audio"].shape == (1284, 1, 73)
    assert all((train.lengths[m] == 1).all() for m in MODALITIES)
    assert train.labels.dtype == np.float32 and np.abs(train.labels).max() <= 3
    assert len(train.texts) == 1284 and train.texts[0].strip()
    assert fs.spec["vision"].extractor == "precomputed:declare-lab/3d-cnn"
    assert detect_format(MOSI_NPZ) == "mosi-npz"
    assert len(load_dataset(MOSI_NPZ)["test"]) == 686


# --- MMSA pickle ----------------------------------------------------------------------------------------


def write_mmsa_pickle(path: Path, *, sims: bool = False) -> None:
    """An MMSA-style pickle: text zero-padded at the end, some vision_lengths 0, one audio length > T."""
    rng = np.random.default_rng(1)
    data = {}
    for name, n in zip(SPLITS, (5, 3, 3), strict=True):
        text = rng.standard_normal((n, 6, 8)).astype(np.float32)
        text_lengths = np.array([6, 4, 1, 3, 2][:n])
        for i, k in enumerate(text_lengths):
            text[i, k:] = 0.0
        text[0, 2] = 0.0  # a zero row mid-sequence must not cut the length
        audio_lengths = [5, 2, 9, 0, 1][:n]  # 9 > T = 5: clipped
        vision_lengths = np.array([0, 4, 3, 0, 4][:n])
        labels = rng.uniform(-1, 1, (n, 1)) if sims else rng.uniform(-3, 3, (n, 1))
        data[name] = {
            "id": [f"{name}$_${i}" for i in range(n)],
            "raw_text": [f"words {i}" for i in range(n)],
            "text": text,
            "audio": rng.standard_normal((n, 5, 3)),  # float64 in MMSA's MOSI
            "vision": rng.standard_normal((n, 4, 2)).astype(np.float32),
            "audio_lengths": audio_lengths,
            "vision_lengths": vision_lengths,
            "regression_labels": labels.astype(np.float32),
        }
        if sims:
            for key in ("regression_labels_T", "regression_labels_A", "regression_labels_V"):
                data[name][key] = rng.uniform(-1, 1, n).astype(np.float32)
    with open(path, "wb") as f:
        pickle.dump(data, f)


def test_mmsa_pickle_needs_opt_in(tmp_path):
    path = tmp_path / "mosi_unaligned.pkl"
    write_mmsa_pickle(path)
    with pytest.raises(DataError, match="allow_pickle=True"):
        load_mmsa_pickle(path)
    with pytest.raises(DataError, match="--allow-pickle"):
        load_dataset(path)


def test_mmsa_pickle_lengths(tmp_path):
    path = tmp_path / "mosi_unaligned.pkl"
    write_mmsa_pickle(path)
    fs = load_dataset(path, allow_pickle=True)
    assert fs.metric_family == "mosi" and fs.name == "mmsa-mosi_unaligned"
    train = fs["train"]
    assert train.lengths["text"].tolist() == [6, 4, 1, 3, 2]
    assert train.lengths["audio"].tolist() == [5, 2, 5, 0, 1]
    assert train.lengths["vision"].tolist() == [0, 4, 3, 0, 4]
    assert train.features["audio"].dtype == np.float32 and train.labels.shape == (5,)
    assert train.ids[1] == "train$_$1" and train.texts[2] == "words 2"


def test_mmsa_sims_metric_family_and_unimodal_labels(tmp_path):
    # Neutral folders: the pytest tmp folder's own name contains "sims" here.
    (tmp_path / "a" / "b").mkdir(parents=True)
    unit_range = tmp_path / "a" / "b" / "mosi.pkl"
    write_mmsa_pickle(unit_range, sims=True)
    with open(unit_range, "rb") as f:
        data = pickle.load(f)
    for split in data.values():
        for key in ("regression_labels_T", "regression_labels_A", "regression_labels_V"):
            del split[key]
    with open(unit_range, "wb") as f:
        pickle.dump(data, f)
    # Labels in [-1, 1] alone do not make it SIMS; the unimodal label keys (or the file name) do.
    assert load_mmsa_pickle(unit_range, allow_pickle=True).metric_family == "mosi"
    (tmp_path / "SIMS" / "Processed").mkdir(parents=True)
    path = tmp_path / "SIMS" / "Processed" / "unaligned_39.pkl"
    write_mmsa_pickle(path)
    assert load_mmsa_pickle(path, allow_pickle=True).name == "mmsa-sims-unaligned_39"
    path = tmp_path / "a" / "b" / "unaligned_39.pkl"
    write_mmsa_pickle(path, sims=True)
    fs = load_mmsa_pickle(path, allow_pickle=True, name="ch-sims")
    assert fs.metric_family == "sims" and fs.name == "ch-sims"
    assert fs.extra["regression_labels_T"]["valid"].shape == (3,)
    # The store keeps the per-split extras.
    assert_same(fs, load_feature_store(save_feature_store(fs, tmp_path / "store")))
    np.testing.assert_array_equal(
        load_feature_store(tmp_path / "store").extra["regression_labels_V"]["test"],
        fs.extra["regression_labels_V"]["test"],
    )


def test_mmsa_token_ids_rejected(tmp_path):
    path = tmp_path / "bert.pkl"
    split = {
        "id": ["a"],
        "text": np.ones((1, 3, 50), dtype=np.int64),
        "audio": np.zeros((1, 2, 2)),
        "vision": np.zeros((1, 2, 2)),
        "regression_labels": np.zeros(1),
    }
    with open(path, "wb") as f:
        pickle.dump({s: split for s in SPLITS}, f)
    with pytest.raises(DataError, match="token ids"):
        load_mmsa_pickle(path, allow_pickle=True)


# --- feature store --------------------------------------------------------------------------------------


def test_store_round_trip(tmp_path):
    fs = make_set()
    fs["valid"].lengths["audio"][1] = 0  # an absent modality survives the round trip
    directory = save_feature_store(fs, tmp_path / "store")
    assert detect_format(directory) == "store"
    assert_same(fs, load_feature_store(directory))
    assert_same(fs, load_dataset(directory))
    assert_same(fs, load_feature_store(directory, mmap=True))
    assert not list(directory.rglob(".*tmp*"))  # no temp files left behind


def test_store_classification_round_trip(tmp_path):
    fs = make_set()
    fs.task, fs.label_names = "classification", ["neg", "neu", "pos"]
    for split in fs.splits.values():
        split.labels = np.arange(len(split)) % 3
        split.texts = None
    assert_same(fs, load_dataset(save_feature_store(fs, tmp_path / "store")))


def test_store_missing_labels(tmp_path):
    directory = save_feature_store(make_set(), tmp_path / "store")
    (directory / "valid" / "labels.npy").unlink()
    with pytest.raises(DataError, match=r"missing: .*valid.*labels\.npy"):
        load_dataset(directory)


def test_store_wrong_format_version(tmp_path):
    directory = save_feature_store(make_set(), tmp_path / "store")
    meta = directory / "meta.json"
    meta.write_text(meta.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(DataError, match="version 99"):
        load_feature_store(directory)


# --- validation -----------------------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_nan_features():
    fs = make_set()
    fs["test"].features["audio"][2, 0, :2] = np.nan
    fs["test"].features["audio"][3, 1, 0] = np.inf
    with pytest.raises(DataError) as err:
        validate_feature_set(fs)
    message = one_line(err)
    assert "'test'" in message and "audio" in message and "3 NaN/inf values in 2 samples" in message
    assert "drop" in message


def test_nan_labels():
    fs = make_set()
    fs["train"].labels[0] = np.nan
    with pytest.raises(DataError, match="labels have 1 NaN/inf"):
        validate_feature_set(fs)


def test_dims_differ_across_splits():
    fs = make_set()
    fs.splits["valid"] = make_split(3, dims={**DIMS, "text": (5, 9)})
    with pytest.raises(DataError) as err:
        validate_feature_set(fs)
    assert "text features differ in shape across splits" in one_line(err)


def test_empty_split(tmp_path):
    fs = make_set()
    fs.splits["valid"] = make_split(0)
    with pytest.raises(DataError, match="split 'valid' is empty"):
        validate_feature_set(fs)
    with pytest.raises(DataError, match="split 'valid' is empty"):
        save_feature_store(fs, tmp_path / "store")
    assert not (tmp_path / "store" / "meta.json").exists()


def test_count_mismatch_and_bad_lengths():
    fs = make_set()
    fs["train"].ids.pop()
    with pytest.raises(DataError, match="sample counts differ"):
        validate_feature_set(fs)
    fs = make_set()
    fs["train"].lengths["vision"][0] = 99
    with pytest.raises(DataError, match="vision lengths lie outside"):
        validate_feature_set(fs)


def test_classification_label_out_of_range():
    fs = make_set()
    fs.task, fs.label_names = "classification", ["a", "b"]
    for split in fs.splits.values():
        split.labels = np.zeros(len(split), dtype=np.int64)
    fs["test"].labels[0] = 2
    with pytest.raises(DataError, match="outside \\[0, 2\\)"):
        validate_feature_set(fs)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=f"not found: {missing}"):
        load_dataset(missing)


def test_unknown_format(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("x")
    with pytest.raises(DataError, match="mosi-npz, mmsa-pickle, store"):
        load_dataset(path)
    with pytest.raises(DataError, match="unknown dataset format 'hdf5'.*mosi-npz"):
        load_dataset(path, fmt="hdf5")
    with pytest.raises(DataError, match="without meta.json"):
        detect_format(tmp_path)
