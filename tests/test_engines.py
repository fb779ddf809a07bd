"""Engines: backends, ONNX export and parity, the TensorRT engine cache, and `mcihn build`.

ONNX -> onnxruntime (CPU) is tested in full here. TensorRT is not installable on these machines
(docs/design.md): its key and cache logic is plain Python and tested with a fake builder; building and running
real engines is tested where `import tensorrt` works and there is a GPU, and skipped with the reason elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engines.backends import (
    BackendUnavailableError,
    OnnxRuntimeBackend,
    TorchBackend,
    create_backend,
    is_available,
    resolve_kind,
)
from engines.export import (
    ExportError,
    ParityError,
    cached_onnx,
    check_parity,
    export_onnx,
    mcihn_engine_model,
)
from engines.extractor import EngineModel
from engines.tensorrt import EngineCache, EngineKey, normalise_profile
from mcihn.config import ABLATIONS, MCIHNConfig
from mcihn.model import MCIHN
from mcihn.spec import MODALITIES, FeatureSpec, ModalitySpec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Export and parity need onnx, onnxscript and onnxruntime; the engine cache tests need none of them.
needs_onnx = pytest.mark.skipif(
    not all(is_available(p) for p in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript or onnxruntime not installed (pip install 'mcihn-live[onnx]')",
)

DIMS = {"vision": 12, "text": 16, "audio": 10}
LENS = {"vision": 3, "text": 5, "audio": 7}


def tiny_config(**overrides) -> MCIHNConfig:
    settings = dict(input_dims=DIMS, seq_lens=LENS, latent_len=4, latent_dim=16, num_heads=2, dropout=0.0)
    return MCIHNConfig(**{**settings, **overrides})


class _Pooler(nn.Module):
    """x (B, T, D) float, mask (B, T) int64 -> (masked mean (B, H), per-step features (B, T, H))."""

    def __init__(self, dim: int = 6, hidden: int = 5):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self.proj(x) * mask[..., None].to(x.dtype)
        pooled = steps.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
        return pooled, steps


def generic_model(seed: int = 0) -> EngineModel:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mask = np.ones((1, 4), dtype=np.int64)
    mask[0, 3] = 0
    return EngineModel(
        name="pooler",
        module=_Pooler().eval(),
        example_inputs={"x": rng.standard_normal((1, 4, 6)).astype(np.float32), "mask": mask},
        output_names=("pooled", "steps"),
        dynamic_axes={"x": {0: "batch", 1: "time"}, "mask": {0: "batch", 1: "time"}, "pooled": {0: "batch"},
                      "steps": {0: "batch", 1: "time"}},
        shape_profile={"x": ((1, 1, 6), (1, 4, 6), (8, 16, 6)), "mask": ((1, 1), (1, 4), (8, 16))},
    )


def mcihn_inputs(config, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {m: rng.standard_normal((batch, config.seq_lens[m], config.input_dims[m])).astype(np.float32)
              for m in MODALITIES}
    lengths = np.array([[config.seq_lens[m] for m in MODALITIES]] * batch, dtype=np.int64)
    lengths[0, 2] = 0  # audio absent (no speech) in the first sample
    if batch > 2:
        lengths[2, 1] = 2  # padded text
    inputs["lengths"] = lengths
    return inputs


@pytest.fixture(scope="module")
def mcihn_onnx(tmp_path_factory):
    """The tiny full MCIHN, its engine model and its exported ONNX (exported once for the module)."""
    torch.manual_seed(0)
    model = MCIHN(tiny_config()).eval()
    em = mcihn_engine_model(model)
    path = export_onnx(em, tmp_path_factory.mktemp("onnx") / "mcihn.onnx")
    return em, path


@pytest.fixture(scope="module")
def generic_onnx(tmp_path_factory):
    em = generic_model()
    return em, export_onnx(em, tmp_path_factory.mktemp("onnx") / "pooler.onnx")


# ---------------------------------------------------------------------------------------------------------
# ONNX export and parity
# ---------------------------------------------------------------------------------------------------------


def test_mcihn_engine_model_interface():
    em = mcihn_engine_model(MCIHN(tiny_config()), batch=2)
    assert em.name == "mcihn"
    assert em.input_names == ("vision", "text", "audio", "lengths")
    assert em.output_names == ("scores",)
    assert em.example_inputs["lengths"].dtype == np.int64 and em.example_inputs["lengths"].shape == (2, 3)
    lo, opt, hi = em.shape_profile["vision"]
    assert lo[0] == 1 and opt[0] == 2 and hi[0] >= 2 and lo[1:] == opt[1:] == hi[1:]
    assert TorchBackend(em).run(em.example_inputs)["scores"].shape == (2,)


@needs_onnx
def test_mcihn_onnx_parity_full(mcihn_onnx):
    em, path = mcihn_onnx
    report = check_parity(em, path)  # example inputs and a second batch size
    assert report.passed and report.worst < 1e-4 and dataclasses.asdict(report)["passed"] is True
    assert report.cases == ["batch 1", "batch 3"]
    assert set(report.max_abs_diff) == {"scores"}
    # An absent modality and padding through the exported graph, at a batch size never seen at export.
    cases = [mcihn_inputs(em.module.config, 5, seed=1), mcihn_inputs(em.module.config, 1, seed=2)]
    assert check_parity(em, path, cases).worst < 1e-4


@needs_onnx
@pytest.mark.parametrize("ablation", ["-VT", "MCIHN-2"])
def test_mcihn_onnx_parity_ablation(tmp_path, ablation):
    torch.manual_seed(1)
    model = MCIHN(tiny_config(**ABLATIONS[ablation])).eval()
    em = mcihn_engine_model(model)
    path = export_onnx(em, tmp_path / "mcihn.onnx")
    report = check_parity(em, path, [em.example_inputs, mcihn_inputs(model.config, 4, seed=3)])
    assert report.worst < 1e-4


@needs_onnx
def test_mcihn_classification_head_exports_softmax(tmp_path):
    torch.manual_seed(2)
    model = MCIHN(tiny_config(head="classification", labels=["neg", "neu", "pos"])).eval()
    em = mcihn_engine_model(model)
    path = export_onnx(em, tmp_path / "cls.onnx")
    out = OnnxRuntimeBackend(path, em).run(mcihn_inputs(model.config, 3, seed=4))["scores"]
    assert out.shape == (3, 3) and np.allclose(out.sum(-1), 1.0, atol=1e-5)
    assert check_parity(em, path).worst < 1e-4


@needs_onnx
def test_generic_model_parity_and_dynamic_axes(generic_onnx):
    em, path = generic_onnx
    assert check_parity(em, path).worst < 1e-4
    # Batch and time both dynamic in onnxruntime.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 9, 6)).astype(np.float32)
    mask = (rng.random((6, 9)) > 0.3).astype(np.int64)
    out = OnnxRuntimeBackend(path, em).run({"x": x, "mask": mask})
    assert out["pooled"].shape == (6, 5) and out["steps"].shape == (6, 9, 5)
    assert check_parity(em, path, {"x": x, "mask": mask}, tolerance=1e-4).passed


@needs_onnx
def test_exported_graph_has_named_dynamic_axes(generic_onnx):
    import onnx

    em, path = generic_onnx
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert dims["x"] == ["batch", "time", 6]
    assert dims["mask"] == ["batch", "time"]
    assert dims["pooled"][0] == "batch"


@needs_onnx
def test_parity_error_reports_the_numbers(generic_onnx):
    em, path = generic_onnx
    drifted = generic_model()
    with torch.no_grad():
        drifted.module.proj[0].bias.add_(0.5)  # the torch model moved on; the ONNX file did not
    with pytest.raises(ParityError, match=r"pooled .*e-0.*ABOVE tolerance") as info:
        check_parity(drifted, path)
    assert info.value.report.max_abs_diff["pooled"] > 1e-3
    report = check_parity(drifted, path, raise_on_failure=False)
    assert not report.passed and report.worst > 1e-3


@needs_onnx
def test_export_refuses_a_dynamic_axis_the_model_fixes(tmp_path):
    class FixedBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, -1).sum(-1)  # only works for batch 2

    em = EngineModel("fixed", FixedBatch(), {"x": np.ones((1, 3), np.float32)}, ("y",),
                     dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    with pytest.raises(ExportError, match="fixed"):
        export_onnx(em, tmp_path / "fixed.onnx")
    assert not list(tmp_path.iterdir())  # no half-written file left behind


@needs_onnx
def test_cached_onnx_is_keyed_by_content(tmp_path):
    em = generic_model()
    path, cached = cached_onnx(em, tmp_path)
    assert not cached and path.is_file() and path.name.startswith("pooler-")
    again, cached = cached_onnx(generic_model(), tmp_path)  # same weights, a new object
    assert cached and again == path
    other, cached = cached_onnx(generic_model(seed=1), tmp_path)  # other weights: another file
    assert not cached and other != path


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


@needs_onnx
def test_backends_agree_with_torch(mcihn_onnx, tmp_path):
    em, path = mcihn_onnx
    inputs = mcihn_inputs(em.module.config, 4, seed=6)
    expected = TorchBackend(em).run(inputs)["scores"]
    backends = [
        OnnxRuntimeBackend(path, em),
        OnnxRuntimeBackend(path, ["scores"], providers=["CPUExecutionProvider"], threads=1),
        OnnxRuntimeBackend(path),  # output names from the file
        create_backend(em, "torch", device="cpu"),
        create_backend(em, "onnxruntime", device="cpu", onnx_path=path, threads=1),
    ]
    for backend in backends:
        out = backend.run(inputs)
        assert out["scores"].dtype == np.float32, backend.describe()
        np.testing.assert_allclose(out["scores"], expected, atol=1e-4, err_msg=backend.describe())


@needs_onnx
def test_auto_backend_on_cpu(monkeypatch, tmp_path):
    em = generic_model()
    assert resolve_kind("auto", "cpu") == "onnxruntime"  # installed here, and faster on the CPU
    backend = create_backend(em, "auto", device="cpu", cache_dir=tmp_path)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert list((tmp_path / "onnx").glob("pooler-*.onnx"))  # exported into the cache
    expected = TorchBackend(em).run(em.example_inputs)
    for name, value in backend.run(em.example_inputs).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-5)
    # Without onnxruntime, auto falls back to torch rather than failing.
    monkeypatch.setattr("engines.backends.is_available", lambda package: package not in ("onnxruntime",))
    assert resolve_kind("auto", "cpu") == "torch"
    assert isinstance(create_backend(em, "auto", device="cpu", cache_dir=tmp_path), TorchBackend)
    assert resolve_kind("auto", "cuda") == "tensorrt"
    monkeypatch.setattr("engines.backends.is_available", lambda package: False)
    assert resolve_kind("auto", "cuda") == "torch"


@needs_onnx
def test_onnxruntime_backend_casts_inputs_and_names_missing_ones(generic_onnx):
    em, path = generic_onnx
    backend = OnnxRuntimeBackend(path, em)
    inputs = {"x": em.example_inputs["x"].astype(np.float64), "mask": em.example_inputs["mask"].astype(np.int32)}
    np.testing.assert_allclose(backend.run(inputs)["pooled"], TorchBackend(em).run(em.example_inputs)["pooled"],
                               atol=1e-5)
    with pytest.raises(KeyError, match="mask"):
        backend.run({"x": em.example_inputs["x"]})


def test_fp16_and_cuda_graphs_refused_on_cpu():
    em = generic_model()
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        TorchBackend(em, "cpu", precision="fp16")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        create_backend(em, "torch", device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TorchBackend(em, "cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="precision"):
        TorchBackend(em, "cpu", precision="int8")
    with pytest.raises(ValueError, match="unknown backend"):
        create_backend(em, "tflite", device="cpu")


def test_tensorrt_missing_names_the_extra():
    if is_available("tensorrt"):
        pytest.skip("tensorrt is installed here; this checks the message on machines without it")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'mcihn-live\[tensorrt\]'"):
        create_backend(generic_model(), "tensorrt", device="cpu")
    from engines.tensorrt import TensorRTBackend, build_engine

    with pytest.raises(BackendUnavailableError, match=r"mcihn-live\[tensorrt\]"):
        build_engine("model.onnx", {}, "fp16")
    with pytest.raises(BackendUnavailableError, match=r"mcihn-live\[tensorrt\]"):
        TensorRTBackend("model.engine", generic_model())


def test_onnxruntime_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'mcihn-live\[onnx\]'"):
        OnnxRuntimeBackend("model.onnx")


@needs_cuda
def test_torch_fp16_cuda_graphs_match_fp32():
    torch.manual_seed(3)
    model = MCIHN(tiny_config()).eval()
    em = mcihn_engine_model(model)
    reference = TorchBackend(em)  # fp32 CPU
    fast = TorchBackend(em, "cuda", precision="fp16", cuda_graphs=True, max_graphs=2)
    assert next(em.module.parameters()).dtype == torch.float32  # the engine model's module is untouched
    for batch, seed in [(1, 0), (1, 1), (4, 2), (1, 3)]:  # replays the batch-1 graph with new data
        inputs = mcihn_inputs(model.config, batch, seed)
        np.testing.assert_allclose(fast.run(inputs)["scores"], reference.run(inputs)["scores"], atol=2e-2)
    assert len(fast._graphs) == 2
    with pytest.warns(RuntimeWarning, match="input shapes"):
        out = fast.run(mcihn_inputs(model.config, 3, 4))  # a third shape: eager
    assert out["scores"].shape == (3,) and len(fast._graphs) == 2


# ---------------------------------------------------------------------------------------------------------
# TensorRT engine keys and cache (plain Python)
# ---------------------------------------------------------------------------------------------------------

PROFILE = {"x": ((1, 4), (1, 4), (8, 4)), "mask": ((1,), (2,), (8,))}


def make_key(**changes) -> EngineKey:
    fields = dict(onnx_sha256="ab" * 32, tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3",
                  compute_capability="9.0", precision="fp16", shape_profile=PROFILE, label="pooler")
    return EngineKey(**{**fields, **changes})


def test_engine_key_digest_is_stable():
    key = make_key()
    assert key.digest() == make_key().digest() and len(key.digest()) == 64
    # Independent of the profile's dict order and of list vs tuple shapes; the label is not part of the key.
    reordered = {"mask": ([1], [2], [8]), "x": ([1, 4], [1, 4], [8, 4])}
    assert make_key(shape_profile=reordered, label="other").digest() == key.digest()
    assert make_key(label="other") == key
    assert json.loads(json.dumps(key.identity())) == key.identity()


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32},
    {"tensorrt_version": "10.4.0"},
    {"gpu_name": "NVIDIA GeForce RTX 4090"},
    {"compute_capability": "8.9"},
    {"precision": "fp32"},
    {"shape_profile": {**PROFILE, "x": ((1, 4), (2, 4), (8, 4))}},
    {"shape_profile": {"x": PROFILE["x"]}},
])
def test_engine_key_changes_with_every_field(change):
    assert make_key(**change).digest() != make_key().digest()
    assert EngineCache("/c").path_for(make_key(**change)) != EngineCache("/c").path_for(make_key())


def test_engine_key_checks_its_profile():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        make_key(shape_profile={"x": ((2, 4), (1, 4), (8, 4))})
    with pytest.raises(ValueError, match="precision"):
        make_key(precision="int4")
    assert normalise_profile(PROFILE)[0][0] == "mask"
    assert {f.name for f in dataclasses.fields(EngineKey)} >= {
        "onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "precision", "shape_profile"}


class FakeBuilder:
    """Stands in for TensorRT: returns distinct engine bytes and counts builds."""

    def __init__(self):
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return f"engine #{self.calls}".encode()


def test_engine_cache_builds_once_then_reuses(tmp_path):
    cache, key, build = EngineCache(tmp_path), make_key(), FakeBuilder()
    assert cache.lookup(key) is None and cache.miss_reason(key) == "not built yet"
    path, cached = cache.get_or_build(key, build)
    assert not cached and build.calls == 1 and path.read_bytes() == b"engine #1"
    assert path.parent == tmp_path and path.name.startswith("pooler-") and path.suffix == ".engine"
    sidecar = json.loads(cache.sidecar_for(key).read_text())
    assert sidecar["key"] == key.identity()
    path2, cached = cache.get_or_build(key, build)
    assert cached and path2 == path and build.calls == 1
    # Another GPU's key is another engine, built separately; the first stays valid.
    other = make_key(gpu_name="NVIDIA A10G", compute_capability="8.6")
    assert cache.get_or_build(other, build)[1] is False and build.calls == 2
    assert cache.lookup(key) == path


def _plant(cache: EngineCache, key: EngineKey, sidecar_key: dict | None, engine: bytes = b"foreign") -> None:
    """Put an engine at `key`'s path whose sidecar describes `sidecar_key` (as a copied-in file would)."""
    import hashlib

    path = cache.path_for(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(engine)
    if sidecar_key is not None:
        record = {"format": "mcihn-tensorrt-engine", "version": 1, "key": sidecar_key,
                  "engine_sha256": hashlib.sha256(engine).hexdigest()}
        cache.sidecar_for(key).write_text(json.dumps(record))


@pytest.mark.parametrize("field_name, value, reason", [
    ("gpu_name", "NVIDIA A10G", "gpu_name"),                  # foreign: built on another GPU
    ("compute_capability", "8.6", "compute_capability"),
    ("tensorrt_version", "10.0.1", "tensorrt_version"),       # stale: an older TensorRT
    ("onnx_sha256", "00" * 32, "onnx_sha256"),                # stale: the model was re-exported
    ("precision", "fp32", "precision"),
    ("shape_profile", [["x", [1, 4], [1, 4], [4, 4]]], "shape profile"),
])
def test_foreign_or_stale_engine_is_rebuilt(tmp_path, field_name, value, reason):
    cache, key, build = EngineCache(tmp_path), make_key(), FakeBuilder()
    _plant(cache, key, {**key.identity(), field_name: value})
    assert cache.lookup(key) is None
    assert reason in cache.miss_reason(key)
    path, cached = cache.get_or_build(key, build)
    assert not cached and build.calls == 1 and path.read_bytes() == b"engine #1"
    assert cache.lookup(key) == path


def test_engine_without_valid_sidecar_is_rebuilt(tmp_path):
    cache, key = EngineCache(tmp_path), make_key()
    _plant(cache, key, None)  # no sidecar: an interrupted build or a hand-copied file
    assert "missing" in cache.miss_reason(key)
    _plant(cache, key, key.identity())
    cache.sidecar_for(key).write_text("{not json")
    assert "unreadable" in cache.miss_reason(key)
    # A valid sidecar but the engine file changed after it was written.
    cache.store(key, b"good engine")
    cache.path_for(key).write_bytes(b"tampered")
    assert "changed since it was built" in cache.miss_reason(key)
    build = FakeBuilder()
    assert cache.get_or_build(key, build) == (cache.path_for(key), False) and build.calls == 1


@needs_onnx
def test_find_or_build_engine_uses_injected_builder(tmp_path, generic_onnx, monkeypatch):
    """The build path above the TensorRT calls, with the machine identity and the builder faked."""
    import engines.tensorrt as trt_module

    em, onnx_path = generic_onnx
    monkeypatch.setattr(trt_module, "require_tensorrt", lambda: type("trt", (), {"__version__": "10.3.0"}))
    monkeypatch.setattr(trt_module, "gpu_identity", lambda device=0: ("Fake GPU", "9.0"))
    calls = []

    def fake_build(path, profile, precision):
        calls.append((path, normalise_profile(profile), precision))
        return b"fake engine"

    cache = EngineCache(tmp_path)
    path, cached, key = trt_module.find_or_build_engine(em, onnx_path, cache, "fp16", builder=fake_build)
    assert not cached and path.read_bytes() == b"fake engine"
    assert key.onnx_sha256 == trt_module.file_sha256(onnx_path) and key.gpu_name == "Fake GPU"
    assert calls == [(onnx_path, normalise_profile(em.shape_profile), "fp16")]
    assert trt_module.find_or_build_engine(em, onnx_path, cache, "fp16", builder=fake_build)[1] is True
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------
# TensorRT itself (a GPU machine with tensorrt installed)
# ---------------------------------------------------------------------------------------------------------


@needs_onnx
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_tensorrt_engine_matches_torch(tmp_path, mcihn_onnx, precision, tolerance):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (not installable here, docs/design.md)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from engines.tensorrt import TensorRTBackend, find_or_build_engine

    em, onnx_path = mcihn_onnx
    cache = EngineCache(tmp_path)
    path, cached, key = find_or_build_engine(em, onnx_path, cache, precision)
    assert not cached and cache.lookup(key) == path
    backend = TensorRTBackend(path, em)
    for batch, seed in [(1, 0), (5, 1)]:
        inputs = mcihn_inputs(em.module.config, batch, seed)
        np.testing.assert_allclose(backend.run(inputs)["scores"], TorchBackend(em).run(inputs)["scores"],
                                   atol=tolerance)
    assert find_or_build_engine(em, onnx_path, cache, precision)[1] is True
    auto = create_backend(em, "auto", device="cuda", precision=precision, cache_dir=tmp_path / "auto")
    assert auto.name == "tensorrt"


# ---------------------------------------------------------------------------------------------------------
# mcihn build
# ---------------------------------------------------------------------------------------------------------


def _build_args(*argv: str) -> argparse.Namespace:
    from tools import build

    parser = argparse.ArgumentParser(prog="mcihn")
    build.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["build", *argv])


@pytest.fixture
def tiny_checkpoint(tmp_path, standin_models):
    """A tiny MCIHN checkpoint whose text extractor is the tiny BERT stand-in; its vision and audio models are
    not on this machine (folders that do not exist)."""
    from mcihn.checkpoint import save_checkpoint

    dims = {"vision": 12, "text": 32, "audio": 10}
    lens = {"vision": 3, "text": 8, "audio": 7}
    extractors = {"vision": str(tmp_path / "missing-vision-model"), "text": str(standin_models["text"]),
                  "audio": str(tmp_path / "missing-audio-model")}
    spec = FeatureSpec(**{m: ModalitySpec(dim=dims[m], seq_len=lens[m], extractor=extractors[m]) for m in MODALITIES})
    torch.manual_seed(0)
    config = tiny_config(input_dims=dims, seq_lens=lens)
    return save_checkpoint(tmp_path / "ckpt", MCIHN(config).eval(), spec)


@needs_onnx
def test_mcihn_build_end_to_end(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from tools import build

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _build_args("--checkpoint", str(tiny_checkpoint), "--backend", "onnxruntime",
                       "--cache-dir", str(tmp_path / "cache"))
    assert build.run(args) == 0
    first = capsys.readouterr().out
    rows = {line.split()[0]: line for line in first.splitlines() if line.split()[1:2] == ["onnxruntime"]}
    assert set(rows) == {"mcihn", "text-encoder"}, first
    for line in rows.values():
        assert " built " in line and "onnx " in line and str(tmp_path / "cache" / "onnx") in line
    parity = float(rows["mcihn"].split("onnx ")[1].split()[0])
    assert parity < 1e-4
    skipped = [line for line in first.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2 and {"vision", "audio"} == {line.split()[1] for line in skipped}
    assert "2 engines ready (2 built, 0 cached)" in first

    assert build.run(args) == 0  # everything found in the cache
    second = capsys.readouterr().out
    rows = [line for line in second.splitlines() if line.split()[1:2] == ["onnxruntime"]]
    assert len(rows) == 2 and all(" cached " in line for line in rows), second
    assert "2 engines ready (0 built, 2 cached)" in second


def test_mcihn_build_parser_stays_light():
    import subprocess

    from engines.backends import DEFAULT_CACHE_DIR
    from tools import build

    assert build.DEFAULT_CACHE_DIR == DEFAULT_CACHE_DIR
    code = "import sys, tools.build; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "False"  # `mcihn --help` does not pay for importing torch


@needs_onnx
def test_mcihn_build_refuses_what_it_cannot_do(tmp_path, tiny_checkpoint, capsys):
    from tools import build

    args = _build_args("--checkpoint", str(tiny_checkpoint), "--backend", "onnxruntime", "--precision", "fp16",
                       "--cache-dir", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="fp16 applies to TensorRT"):
        build.run(args)
    if not is_available("tensorrt"):
        args = _build_args("--checkpoint", str(tiny_checkpoint), "--backend", "tensorrt",
                           "--cache-dir", str(tmp_path / "cache"))
        assert build.run(args) == 2
        assert "mcihn-live[tensorrt]" in capsys.readouterr().err


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_extractor_exports_with_parity(standin_models, tmp_path, modality):
    """Each extractor's core (tiny stand-in of the real architecture) exports to ONNX and matches torch in
    onnxruntime within 1e-4, on its example input and a second batch size."""
    from engines.extractors import ExtractorOptions, build_extractor

    options = ExtractorOptions(**{m: str(standin_models[m]) for m in MODALITIES})
    model = build_extractor(modality, options).engine_model()
    path = export_onnx(model, tmp_path / f"{model.name}.onnx")
    report = check_parity(model, path, tolerance=1e-4)
    assert report.passed and len(report.cases) >= 2, report.summary()
