"""MCIHN model: gradients, ablations, missing modalities, checkpoints, ONNX export."""

from __future__ import annotations

import pytest
import torch

from mcihn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mcihn.config import MCIHNConfig
from mcihn.losses import AdaptiveLoss, gaussian_mmd, task_loss
from mcihn.model import MCIHN
from mcihn.spec import MODALITIES, FeatureSpec, ModalitySpec, SpecMismatchError

DIMS = {"vision": 12, "text": 16, "audio": 10}
LENS = {"vision": 3, "text": 5, "audio": 7}


def tiny_config(**overrides) -> MCIHNConfig:
    return MCIHNConfig(input_dims=DIMS, seq_lens=LENS, latent_len=4, latent_dim=16, num_heads=2, dropout=0.0,
                       **overrides)


def tiny_spec() -> FeatureSpec:
    return FeatureSpec(**{m: ModalitySpec(dim=DIMS[m], seq_len=LENS[m], extractor=f"tiny-{m}") for m in MODALITIES})


def inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(batch, LENS[m], DIMS[m], generator=g) for m in MODALITIES}
    lengths = torch.tensor([[LENS[m] for m in MODALITIES]] * batch)
    if batch > 1:
        lengths[1, 2] = 4  # a padded audio sequence
    return feats, lengths


def run(model: MCIHN, feats, lengths) -> torch.Tensor:
    return model(feats["vision"], feats["text"], feats["audio"], lengths)


def test_paper_default_shapes():
    cfg = MCIHNConfig()
    assert cfg.input_dims == {"vision": 512, "text": 768, "audio": 512}
    assert cfg.seq_lens == {"vision": 10, "text": 36, "audio": 128}
    assert (cfg.latent_len, cfg.latent_dim, cfg.dropout) == (32, 256, 0.5)
    model = MCIHN(cfg).eval()
    x = {m: torch.randn(2, cfg.seq_lens[m], cfg.input_dims[m]) for m in MODALITIES}
    lengths = torch.tensor([[10, 36, 128], [10, 20, 100]])
    out = model.forward_train(x, lengths)
    assert out.prediction.shape == (2,)
    assert all(c.shape == (2, 32, 256) for c in out.codes.values())
    assert set(out.pair_features) == {"vision-text", "vision-audio", "text-audio"}
    assert all(f.shape == (2, 32, 256) for f in out.pair_features.values())


def test_every_module_receives_gradient():
    torch.manual_seed(0)
    model = MCIHN(tiny_config())
    adaptive = AdaptiveLoss(model.config)
    feats, lengths = inputs()
    out = model.forward_train(feats, lengths)
    # Targets far from every prediction, so the L1 gradient cannot cancel out across the batch.
    loss = task_loss(out.prediction, torch.full((4,), 100.0), "regression")
    loss = loss + adaptive(out.codes, out.pair_features, out.present)
    # The decoders and discriminators are trained by the AAE phases: include their losses too.
    for m in MODALITIES:
        path = model.paths[m]
        code = path.encoder(path.normalise(feats[m], torch.ones(4, LENS[m], dtype=torch.bool)),
                            torch.ones(4, LENS[m], dtype=torch.bool))
        loss = loss + path.decoder(code).pow(2).mean() + path.discriminator(code).mean()
    loss.backward()
    no_grad = [n for n, p in list(model.named_parameters()) + list(adaptive.named_parameters())
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    # missing_code is only used for absent modalities; everything else must learn.
    assert [n for n in no_grad if "missing_code" not in n] == []


def test_missing_code_receives_gradient_when_modality_absent():
    model = MCIHN(tiny_config())
    feats, lengths = inputs()
    lengths[:, 0] = 0
    model.forward_train(feats, lengths).prediction.sum().backward()
    assert model.paths["vision"].missing_code.grad.abs().sum() > 0


@pytest.mark.parametrize("modality", MODALITIES)
def test_masked_modality_input_does_not_affect_output(modality):
    torch.manual_seed(0)
    model = MCIHN(tiny_config()).eval()
    feats, lengths = inputs()
    lengths[:, MODALITIES.index(modality)] = 0
    reference = run(model, feats, lengths)
    for garbage in (torch.randn_like(feats[modality]) * 100, torch.full_like(feats[modality], float("nan")),
                    torch.full_like(feats[modality], float("inf"))):
        changed = dict(feats, **{modality: garbage})
        assert torch.equal(run(model, changed, lengths), reference)
    # ...while a present modality's input does change it (so the test above can fail).
    other = MODALITIES[(MODALITIES.index(modality) + 1) % 3]
    changed = dict(feats, **{other: torch.randn_like(feats[other])})
    assert not torch.allclose(run(model, changed, lengths), reference)


def test_padding_beyond_length_does_not_affect_output():
    model = MCIHN(tiny_config()).eval()
    feats, lengths = inputs()
    reference = run(model, feats, lengths)
    feats["audio"][1, 4:] = 1e6  # sample 1 has audio length 4
    assert torch.equal(run(model, feats, lengths), reference)


@pytest.mark.parametrize(
    ("name", "absent"),
    [
        ("-VT", {"audio"}),
        ("-VA", {"text"}),
        ("-TA", {"vision"}),
    ],
)
def test_bimodal_ablations_remove_a_modality(name, absent):
    model = MCIHN(MCIHNConfig.for_ablation(name, input_dims=DIMS, seq_lens=LENS, latent_len=4, latent_dim=16,
                                           num_heads=2)).eval()
    assert set(model.paths) == set(MODALITIES) - absent
    assert len(model.gate.gates) == 1
    feats, lengths = inputs()
    reference = run(model, feats, lengths)
    (m,) = absent
    assert torch.equal(run(model, dict(feats, **{m: torch.randn_like(feats[m])}), lengths), reference)


def test_mcihn1_has_no_aae_and_mcihn2_no_gate():
    no_aae = MCIHN(MCIHNConfig.for_ablation("MCIHN-1", input_dims=DIMS, seq_lens=LENS, latent_len=4, latent_dim=16,
                                            num_heads=2))
    assert all(p.decoder is None and p.discriminator is None for p in no_aae.paths.values())
    assert not any("decoder" in n or "discriminator" in n for n, _ in no_aae.named_parameters())
    assert no_aae.gate is not None
    no_gate = MCIHN(MCIHNConfig.for_ablation("MCIHN-2", input_dims=DIMS, seq_lens=LENS, latent_len=4, latent_dim=16,
                                             num_heads=2))
    assert no_gate.gate is None
    assert not any(n.startswith("gate.") for n, _ in no_gate.named_parameters())
    feats, lengths = inputs()
    assert run(no_gate.eval(), feats, lengths).shape == (4,)


def test_classification_head_gives_softmax_scores():
    model = MCIHN(tiny_config(head="classification", labels=["neg", "neu", "pos"])).eval()
    feats, lengths = inputs()
    scores = run(model, feats, lengths)
    assert scores.shape == (4, 3)
    torch.testing.assert_close(scores.sum(-1), torch.ones(4))


def test_mmd_is_zero_for_identical_sets_and_positive_for_shifted():
    x = torch.randn(3, 8, 5)
    assert gaussian_mmd(x, x, (0.5, 1.0, 2.0)).abs().max() < 1e-5
    assert (gaussian_mmd(x, x + 3.0, (0.5, 1.0, 2.0)) > 0.1).all()


def test_adaptive_loss_kernel_map_is_trained_adversarially():
    """xi's gradient is reversed (it ascends the MMD) while the codes' gradient is not."""
    cfg = tiny_config()
    adaptive = AdaptiveLoss(cfg)
    codes = {m: torch.randn(2, 4, 16, requires_grad=True) for m in MODALITIES}
    pairs = {p: torch.randn(2, 4, 16) for p in ("vision-text", "vision-audio", "text-audio")}
    present = {m: torch.ones(2, dtype=torch.bool) for m in MODALITIES}
    loss = adaptive(codes, pairs, present)
    loss.backward()
    xi_weight = adaptive.xi.weight
    with torch.no_grad():
        xi_weight -= 1e-2 * xi_weight.grad  # a gradient-descent step on the reversed gradient = ascent
    assert adaptive(codes, pairs, present) > loss


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = MCIHN(tiny_config(head="classification", labels=["a", "b"])).eval()
    model.set_feature_stats("text", torch.full((16,), 0.5), torch.full((16,), 2.0))
    save_checkpoint(tmp_path / "ckpt", model, tiny_spec(), {"note": "test"})
    ckpt = load_checkpoint(tmp_path / "ckpt")
    feats, lengths = inputs()
    assert torch.equal(run(ckpt.model, feats, lengths), run(model, feats, lengths))
    assert ckpt.config.labels == ["a", "b"] and ckpt.metadata == {"note": "test"}
    assert ckpt.spec == tiny_spec()


def test_checkpoint_refuses_other_features_naming_modality_and_field(tmp_path):
    save_checkpoint(tmp_path / "ckpt", MCIHN(tiny_config()), tiny_spec())
    ckpt = load_checkpoint(tmp_path / "ckpt")
    other = FeatureSpec(vision=tiny_spec().vision, text=ModalitySpec(dim=32, seq_len=5, extractor="tiny-text"),
                        audio=tiny_spec().audio)
    with pytest.raises(SpecMismatchError, match="text dim is 32 but the checkpoint was trained with 16"):
        ckpt.check_features(other)
    renamed = FeatureSpec(vision=ModalitySpec(dim=12, seq_len=3, extractor="clip"), text=tiny_spec().text,
                          audio=tiny_spec().audio)
    with pytest.raises(SpecMismatchError, match="vision extractor"):
        ckpt.check_features(renamed)
    ckpt.check_features(renamed, structural_only=True)


def test_missing_or_broken_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "ckpt", MCIHN(tiny_config()), tiny_spec())
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "ckpt")


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="unknown ablation"):
        MCIHNConfig.for_ablation("-XY")
    with pytest.raises(ValueError, match="label names"):
        MCIHNConfig(head="classification")
    with pytest.raises(ValueError, match="modalities"):
        MCIHNConfig(modalities=("vision",))


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install .[onnx])")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install .[onnx])")
    torch.manual_seed(0)
    model = MCIHN(tiny_config()).eval()
    feats, lengths = inputs(batch=3)
    path = tmp_path / "mcihn.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        model,
        (feats["vision"], feats["text"], feats["audio"], lengths),
        str(path),
        input_names=["vision", "text", "audio", "lengths"],
        output_names=["scores"],
        dynamic_shapes={"vision": {0: batch}, "text": {0: batch}, "audio": {0: batch}, "lengths": {0: batch}},
        dynamo=True,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 5):  # a batch size other than the one exported with
        f, lens = inputs(batch=batch_size, seed=batch_size)
        if batch_size == 5:
            lens[2, 0] = 0  # an absent modality through the exported graph
        feed = {"vision": f["vision"].numpy(), "text": f["text"].numpy(), "audio": f["audio"].numpy(),
                "lengths": lens.numpy()}
        (onnx_out,) = session.run(None, feed)
        expected = run(model, f, lens).detach().numpy()
        assert abs(onnx_out - expected).max() < 1e-4
