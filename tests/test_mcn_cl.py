"""MCN-CL: gradients, the contrastive loss and hard-negative mining on hand-computed cases, masking,
checkpoints, ONNX export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mcihn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mcihn.config import MCIHNConfig
from mcihn.contrastive import hard_negative_mask, supervised_contrastive_loss
from mcihn.mcn_cl import MCNCL, MCNCLConfig, PyramidSqueezeAttention
from mcihn.model import MCIHN
from mcihn.spec import MODALITIES, FeatureSpec, ModalitySpec

DIMS = {"vision": 12, "text": 16, "audio": 10}
LENS = {"vision": 5, "text": 4, "audio": 7}
LABELS = ["neg", "neu", "pos"]


def tiny_config(**overrides) -> MCNCLConfig:
    base = dict(input_dims=DIMS, seq_lens=LENS, d_model=16, num_heads=2, num_layers=2, dropout=0.0, labels=LABELS,
                projection_dim=8, hard_negatives=2)
    return MCNCLConfig(**{**base, **overrides})


def tiny_spec() -> FeatureSpec:
    return FeatureSpec(**{m: ModalitySpec(dim=DIMS[m], seq_len=LENS[m], extractor=f"tiny-{m}") for m in MODALITIES})


def inputs(batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(batch, LENS[m], DIMS[m], generator=g) for m in MODALITIES}
    lengths = torch.tensor([[LENS[m] for m in MODALITIES]] * batch)
    if batch > 1:
        lengths[1, 0] = 3  # a padded vision sequence (goes through PSA's masks)
        lengths[1, 2] = 4  # a padded audio sequence
    return feats, lengths


def run(model: MCNCL, feats, lengths) -> torch.Tensor:
    return model(feats["vision"], feats["text"], feats["audio"], lengths)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


def test_default_config_shapes():
    cfg = MCNCLConfig()
    model = MCNCL(cfg).eval()
    x = {m: torch.randn(2, cfg.seq_lens[m], cfg.input_dims[m]) for m in MODALITIES}
    out = model.forward_train(x, torch.tensor([[10, 36, 128], [0, 20, 100]]))
    assert out.logits.shape == (2, 7)
    assert all(e.shape == (2, cfg.projection_dim) for e in out.embeddings.values())
    torch.testing.assert_close(out.embeddings["text"].norm(dim=-1), torch.ones(2))
    assert out.present["vision"].tolist() == [True, False]
    scores = run(model, x, torch.tensor([[10, 36, 128], [0, 20, 100]]))
    torch.testing.assert_close(scores.sum(-1), torch.ones(2))


def test_every_parameter_receives_gradient():
    torch.manual_seed(0)
    model = MCNCL(tiny_config())
    feats, lengths = inputs()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    out = model.forward_train(feats, lengths)
    loss, parts = model.training_loss(out, labels)
    assert parts["contrastive"] > 0
    loss.backward()
    bad = [n for n, p in model.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    # The missing tokens stand in for absent modalities only; every modality is present here.
    assert [n for n in bad if "missing_token" not in n] == [], f"no or zero gradient: {bad}"


def test_missing_token_receives_gradient_when_modality_absent():
    model = MCNCL(tiny_config())
    feats, lengths = inputs()
    lengths[:, 0] = 0
    model.forward_train(feats, lengths).logits[:, 0].sum().backward()
    assert model.inputs["vision"].missing_token.grad.abs().sum() > 0


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("samples", ["all", "one"])
def test_absent_modality_input_does_not_affect_output(modality, samples):
    torch.manual_seed(0)
    model = MCNCL(tiny_config()).eval()
    feats, lengths = inputs()
    col = MODALITIES.index(modality)
    rows = slice(None) if samples == "all" else slice(1, 2)
    lengths[rows, col] = 0
    reference = run(model, feats, lengths)
    for garbage in (torch.randn(feats[modality][rows].shape) * 100, float("nan"), float("inf")):
        changed = {m: f.clone() for m, f in feats.items()}
        changed[modality][rows] = garbage
        assert torch.equal(run(model, changed, lengths), reference)
    # ...while a present modality's input does change it (so the test above can fail).
    other = MODALITIES[(col + 1) % 3]
    changed = dict(feats, **{other: torch.randn_like(feats[other])})
    assert not torch.allclose(run(model, changed, lengths), reference)


def test_padding_beyond_length_does_not_affect_output():
    """Sample 1 has 3 of 5 vision steps (PSA's convolutions reach across the boundary) and 4 of 7 audio steps."""
    model = MCNCL(tiny_config()).eval()
    feats, lengths = inputs()
    reference = run(model, feats, lengths)
    feats["vision"][1, 3:] = 1e6
    feats["audio"][1, 4:] = float("nan")
    assert torch.equal(run(model, feats, lengths), reference)
    feats["vision"][1, 2] += 1.0  # the last valid step does count
    assert not torch.allclose(run(model, feats, lengths)[1], reference[1])


def test_psa_ignores_padded_steps():
    """PSA on 3 valid steps of 5 equals PSA on those 3 steps alone: neither the convolutions' bias at padded steps
    nor the padded steps in the squeeze mean reach the valid steps."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(16, (1, 3, 5, 7), reduction=4, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    valid = torch.arange(5)[None, :] < torch.tensor([[3], [5]])
    x = torch.where(valid[..., None], x, torch.zeros_like(x))  # the caller zeroes padding
    out = psa(x, valid)
    alone = psa(x[:1, :3], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(out[:1, :3], alone)
    assert torch.equal(out[0, 3:], torch.zeros(2, 16))
    # The scales really mix time: a step's output depends on its neighbours.
    nudged = x.clone()
    nudged[1, 4] += 1.0
    assert not torch.allclose(psa(nudged, valid)[1, 2], out[1, 2])


def test_feature_standardisation_is_applied():
    model = MCNCL(tiny_config()).eval()
    feats, lengths = inputs()
    reference = run(model, feats, lengths)
    mean, std = torch.full((16,), 0.5), torch.full((16,), 2.0)
    model.set_feature_stats("text", mean, std)
    shifted = dict(feats, text=feats["text"] * 2.0 + 0.5)  # standardises back to the original features
    torch.testing.assert_close(run(model, shifted, lengths), reference)


def test_ablation_switches():
    no_psa = MCNCL(tiny_config(use_psa=False))
    assert no_psa.inputs["vision"].temporal is None
    assert MCNCL(tiny_config()).inputs["vision"].temporal is not None
    no_cl = MCNCL(tiny_config(use_contrastive=False))
    assert no_cl.projections is None
    feats, lengths = inputs()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    out = no_cl.forward_train(feats, lengths)
    loss, parts = no_cl.training_loss(out, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert parts["contrastive"] == 0.0
    # Mining off: the contrastive term uses every negative (the loss is then larger or equal).
    torch.manual_seed(0)
    mined = MCNCL(tiny_config(hard_negatives=1))
    torch.manual_seed(0)
    unmined = MCNCL(tiny_config(hard_negatives=1, hard_negative_mining=False))
    a = mined.contrastive_loss(mined.forward_train(feats, lengths), labels)
    b = unmined.contrastive_loss(unmined.forward_train(feats, lengths), labels)
    assert b > a


def test_config_round_trip_and_missing_fields():
    cfg = tiny_config(psa_kernels=(3, 5), temperature=0.2)
    assert MCNCLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    partial = {"input_dims": DIMS, "seq_lens": LENS, "labels": LABELS}  # written before the other fields existed
    assert MCNCLConfig.from_dict(partial).temperature == MCNCLConfig().temperature
    with pytest.raises(ValueError, match="unknown MCN-CL config fields"):
        MCNCLConfig.from_dict({**partial, "future_knob": 1})
    with pytest.raises(ValueError, match="odd"):
        MCNCLConfig(psa_kernels=(2, 4))
    with pytest.raises(ValueError, match="label"):
        MCNCLConfig(labels=["only"])


# ---------------------------------------------------------------------------------------------------------
# Contrastive loss and hard-negative mining
# ---------------------------------------------------------------------------------------------------------

# Four unit vectors (one given at length 2, to check the normalisation) with pairwise cosines
#   s01 = 0, s02 = 0.6, s03 = -1, s12 = 0.8, s13 = 0, s23 = -0.6;   classes 0, 0, 1, 1.
HAND_Z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
HAND_Y = torch.tensor([0, 0, 1, 1])
TAU = 0.5


def test_contrastive_loss_hand_computed_without_mining():
    # One positive per anchor: L_i = log(1 + sum_{n in N(i)} exp((s_in - s_ip) / tau)).
    e = lambda x: math.exp(x / TAU)  # noqa: E731
    expected = np.mean([
        math.log(1 + e(0.6 - 0.0) + e(-1.0 - 0.0)),  # anchor 0: positive 1, negatives 2, 3
        math.log(1 + e(0.8 - 0.0) + e(0.0 - 0.0)),  # anchor 1: positive 0, negatives 2, 3
        math.log(1 + e(0.6 + 0.6) + e(0.8 + 0.6)),  # anchor 2: positive 3, negatives 0, 1
        math.log(1 + e(-1.0 + 0.6) + e(0.0 + 0.6)),  # anchor 3: positive 2, negatives 0, 1
    ])
    loss = supervised_contrastive_loss(HAND_Z, HAND_Y, TAU, hard_negatives=None)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # k at least the number of negatives is the same as no mining.
    assert supervised_contrastive_loss(HAND_Z, HAND_Y, TAU, hard_negatives=2).item() == pytest.approx(expected,
                                                                                                    rel=1e-5)


def test_contrastive_loss_hand_computed_with_mining_differs():
    # k = 1 keeps each anchor's most similar other-class sample: 0 -> 2 (0.6 > -1), 1 -> 2 (0.8 > 0),
    # 2 -> 1 (0.8 > 0.6), 3 -> 1 (0 > -1).
    e = lambda x: math.exp(x / TAU)  # noqa: E731
    expected = np.mean([
        math.log(1 + e(0.6 - 0.0)),
        math.log(1 + e(0.8 - 0.0)),
        math.log(1 + e(0.8 + 0.6)),
        math.log(1 + e(0.0 + 0.6)),
    ])
    mined = supervised_contrastive_loss(HAND_Z, HAND_Y, TAU, hard_negatives=1)
    assert mined.item() == pytest.approx(expected, rel=1e-5)
    assert mined.item() < supervised_contrastive_loss(HAND_Z, HAND_Y, TAU).item()


def test_contrastive_loss_several_positives_and_anchors_without_positive():
    # Classes 0, 0, 0, 1 on a line: z = (1, 0), (1, 0), (-1, 0), (1, 0); anchor 3 has no positive (left out).
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1])
    e = lambda x: math.exp(x / TAU)  # noqa: E731
    # anchor 0: positives 1 (s=1), 2 (s=-1); negative 3 (s=1). Denominator e(1) + e(-1) + e(1).
    den0 = e(1) + e(-1) + e(1)
    l0 = -0.5 * (math.log(e(1) / den0) + math.log(e(-1) / den0))
    l1 = l0  # anchor 1 is the same as anchor 0
    den2 = e(-1) + e(-1) + e(-1)  # anchor 2: positives 0, 1 and negative 3, all at s = -1
    l2 = -0.5 * (math.log(e(-1) / den2) * 2)
    loss = supervised_contrastive_loss(z, y, TAU)
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-5)
    # valid=False removes sample 2 everywhere: anchors 0 and 1 then have one positive and one negative.
    valid = torch.tensor([True, True, False, True])
    expected = math.log(1 + e(1 - 1))
    assert supervised_contrastive_loss(z, y, TAU, valid=valid).item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_is_zero_and_finite_without_any_positive():
    z = torch.randn(3, 4, requires_grad=True)
    loss = supervised_contrastive_loss(z, torch.tensor([0, 1, 2]), TAU, hard_negatives=1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_hard_negative_selection_on_hand_made_similarities():
    # Classes 0, 0, 1, 1, 2. Row 0's most similar sample overall (1) is a positive and must not be picked.
    similarity = torch.tensor([
        [1.0, 0.9, 0.2, 0.7, 0.5],
        [0.9, 1.0, -0.3, -0.1, 0.4],
        [0.2, -0.3, 1.0, 0.95, 0.8],
        [0.7, -0.1, 0.95, 1.0, -0.2],
        [0.5, 0.4, 0.8, -0.2, 1.0],
    ])
    y = [0, 0, 1, 1, 2]
    negatives = torch.tensor([[y[i] != y[j] for j in range(5)] for i in range(5)])
    picked = hard_negative_mask(similarity, negatives, k=2)
    rows = [sorted(torch.nonzero(r).flatten().tolist()) for r in picked]
    assert rows == [[3, 4], [3, 4], [0, 4], [0, 1], [0, 2]]
    # k = 1: the single closest other-class sample.
    rows = [torch.nonzero(r).flatten().tolist() for r in hard_negative_mask(similarity, negatives, k=1)]
    assert rows == [[3], [4], [4], [0], [2]]
    # A row with fewer negatives than k keeps all of them and nothing else.
    few = torch.zeros(5, 5, dtype=torch.bool)
    few[0, 2] = True
    assert torch.equal(hard_negative_mask(similarity, few, k=3), few)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and ONNX
# ---------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = MCNCL(tiny_config()).eval()
    model.set_feature_stats("vision", torch.full((12,), 0.5), torch.full((12,), 2.0))
    save_checkpoint(tmp_path / "ckpt", model, tiny_spec(), {"note": "mcn-cl"})
    stored = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert stored["model_type"] == "mcn-cl" and stored["head"] == {"type": "classification", "labels": LABELS}
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(ckpt.model, MCNCL) and ckpt.config == model.config
    assert ckpt.metadata == {"note": "mcn-cl"} and ckpt.spec == tiny_spec()
    feats, lengths = inputs()
    lengths[2, 1] = 0
    assert torch.equal(run(ckpt.model, feats, lengths), run(model, feats, lengths))
    torch.testing.assert_close(ckpt.model.inputs["vision"].feature_std, torch.full((12,), 2.0))


def test_checkpoints_without_model_type_are_mcihn(tmp_path):
    mcihn = MCIHN(MCIHNConfig(input_dims=DIMS, seq_lens=LENS, latent_len=2, latent_dim=8, num_heads=2))
    save_checkpoint(tmp_path / "old", mcihn, tiny_spec())
    path = tmp_path / "old" / "config.json"
    stored = json.loads(path.read_text())
    assert stored["version"] == 1  # readers from before model_type still load MCIHN checkpoints
    del stored["model_type"]
    path.write_text(json.dumps(stored))
    assert isinstance(load_checkpoint(tmp_path / "old").model, MCIHN)
    stored["model_type"] = "mystery"
    path.write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="unknown model_type 'mystery'"):
        load_checkpoint(tmp_path / "old")


def test_onnx_export_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install .[onnx])")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install .[onnx])")
    from engines.export import check_parity, export_onnx, mcihn_engine_model

    torch.manual_seed(0)
    model = MCNCL(tiny_config()).eval()
    model.set_feature_stats("audio", torch.full((10,), 0.1), torch.full((10,), 1.5))
    engine = mcihn_engine_model(model)  # the fusion model's engine wrapper (live, `mcihn build`) is generic
    path = export_onnx(engine, tmp_path / "mcn_cl.onnx")
    cases = []
    for batch, seed in ((1, 1), (5, 5)):  # batch sizes other than the exported one
        feats, lengths = inputs(batch, seed)
        if batch == 5:
            lengths[2, 0] = 0  # an absent modality (missing token) through the exported graph
            lengths[3] = 0  # nothing present at all
        cases.append({m: feats[m].numpy() for m in MODALITIES} | {"lengths": lengths.numpy()})
    report = check_parity(engine, path, cases, tolerance=1e-4)
    assert report.passed, report.summary()


def test_engine_model_is_named_by_model_type():
    """The fusion engine (live, `mcihn build`, cached ONNX files) is named after the checkpoint's model_type."""
    from engines.export import mcihn_engine_model

    assert mcihn_engine_model(MCNCL(tiny_config())).name == "mcn-cl"
    mcihn = MCIHN(MCIHNConfig(input_dims=DIMS, seq_lens=LENS, latent_len=2, latent_dim=8, num_heads=2))
    assert mcihn_engine_model(mcihn).name == "mcihn"
