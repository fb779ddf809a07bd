"""Reference tests pinning the paper's equations (eqs. 4-19) as docs/model.md reads them, and Algorithm 1's phases.

Each equation test hand-sets the weights of a tiny module (L = 2-3, d = 2-4, 1-2 heads) and computes the expected
result independently, in numpy, from docs/model.md's formulas. Notation: a paper matrix W (in, out) acts on row
vectors, x W; torch's nn.Linear stores weight (out, in) and computes x weight^T, so we load weight = W^T.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mcihn.config import ABLATIONS, MCIHNConfig
from mcihn.data import FeatureSet, FeatureSplit, spec_from_split
from mcihn.losses import (
    AdaptiveLoss,
    discriminator_loss,
    gaussian_mmd,
    generator_loss,
    reconstruction_loss,
    task_loss,
)
from mcihn.model import MCIHN, CrossModalGate, MultiHeadAttention
from mcihn.spec import MODALITIES
from mcihn.train import Batch, TrainConfig, Trainer, config_for_data

PAIRS = ("vision-text", "vision-audio", "text-audio")
# Core modality -> the other two, as eq. 6 sums them.
OTHERS = {"vision": ("text", "audio"), "text": ("vision", "audio"), "audio": ("vision", "text")}
# Core modality -> the pair feature of the other two (eqs. 12-14's F^{others}).
OTHER_PAIR = {"vision": "text-audio", "text": "vision-audio", "audio": "vision-text"}


# -- numpy references, written from docs/model.md --------------------------------------------------------------


def softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_matching(core: np.ndarray, others_sum: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Eq. 6 with our 1/sqrt(d): M = S^m W (sum_o S^o)^T / sqrt(d), (L, L)."""
    return core @ w @ others_sum.T / math.sqrt(core.shape[-1])


def ref_transfer(core: np.ndarray, others_sum: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Eqs. 7-8: A = softmax_rows(M) (sum_o S^o), (L, d)."""
    return softmax_rows(ref_matching(core, others_sum, w)) @ others_sum


def ref_gate_features(codes: dict[str, np.ndarray], weights: dict) -> dict[str, np.ndarray]:
    """Eqs. 6-11 for three modalities: pair name -> F (L, d)."""
    joint = {}
    for m, (o1, o2) in OTHERS.items():
        transferred = ref_transfer(codes[m], codes[o1] + codes[o2], weights["W"])
        p, c = weights["combine"][m]
        joint[m] = np.concatenate([transferred, codes[m]], axis=-1) @ p + c  # P_m([A^m, S^m])
    features = {}
    for pair in PAIRS:
        m, n = pair.split("-")
        w_gate, b_gate = weights["gates"][pair]
        s_m, s_n = codes[m], codes[n]
        gate = np.maximum(np.concatenate([s_m, s_n, s_m - s_n, s_m * s_n], axis=-1) @ w_gate + b_gate, 0.0)
        features[pair] = gate * joint[m] + gate * joint[n]
    return features


def ref_mha(query, key, value, weights: dict, heads: int, key_keep: np.ndarray | None = None) -> np.ndarray:
    """Eqs. 15-16: heads of softmax(Q W^Q (K W^K)^T / sqrt(d/h)) V W^V, concatenated, times W^O."""
    q = query @ weights["q"][0] + weights["q"][1]
    k = key @ weights["k"][0] + weights["k"][1]
    v = value @ weights["v"][0] + weights["v"][1]
    d = q.shape[-1]
    head_dim = d // heads
    outputs = []
    for i in range(heads):
        cols = slice(i * head_dim, (i + 1) * head_dim)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(d / heads)
        if key_keep is not None:
            scores = np.where(key_keep[None, :], scores, -np.inf)
        outputs.append(softmax_rows(scores) @ v[:, cols])
    return np.concatenate(outputs, axis=-1) @ weights["o"][0] + weights["o"][1]


def ref_mmd(x: np.ndarray, y: np.ndarray, scales) -> float:
    """Eq. 12 for one sample: squared MMD with a sum of Gaussians whose bandwidths are `scales` times the mean
    pairwise squared distance of the joint set (docs/model.md, MMD adaptive loss)."""
    joint = np.concatenate([x, y], axis=0)
    dist = ((joint[:, None, :] - joint[None, :, :]) ** 2).sum(-1)
    bandwidth = dist.mean()
    kernel = sum(np.exp(-dist / (bandwidth * s)) for s in scales)
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


# -- helpers -----------------------------------------------------------------------------------------------------


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def set_linear(linear: nn.Linear, w: np.ndarray, b: np.ndarray | None = None) -> None:
    """Load the paper's (in, out) matrix W (and bias b) into an nn.Linear."""
    with torch.no_grad():
        linear.weight.copy_(t(w).T)
        if linear.bias is not None:
            linear.bias.copy_(t(np.zeros(w.shape[1]) if b is None else b))


def small_ints(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-2, 3, size=shape).astype(np.float64)


def config(latent_len: int = 2, latent_dim: int = 4, num_heads: int = 1, **overrides) -> MCIHNConfig:
    sizes = {"latent_len": latent_len, "latent_dim": latent_dim, "num_heads": num_heads, "dropout": 0.0}
    return MCIHNConfig(input_dims={"vision": 3, "text": 3, "audio": 3}, seq_lens={"vision": 2, "text": 2, "audio": 2},
                       **{**sizes, **overrides})


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def batched(codes: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {m: t(c)[None] for m, c in codes.items()}


def gate_weights(rng: np.random.Generator, d: int) -> dict:
    return {
        "W": small_ints(rng, d, d),
        "gates": {p: (small_ints(rng, 4 * d, d) / 4, small_ints(rng, d) / 2) for p in PAIRS},
        "combine": {m: (small_ints(rng, 2 * d, d) / 2, small_ints(rng, d) / 2) for m in MODALITIES},
    }


def load_gate(gate: CrossModalGate, weights: dict) -> None:
    set_linear(gate.W, weights["W"])
    for p in PAIRS:
        set_linear(gate.gates[p], *weights["gates"][p])
    for m in MODALITIES:
        set_linear(gate.combine[m], *weights["combine"][m])


# -- eqs. 4-5: the adversarial autoencoder's losses --------------------------------------------------------------


def test_eq4_reconstruction_loss_is_mean_squared_error_over_valid_steps():
    x = np.array([[[1.0, 2.0], [3.0, -1.0], [9.0, 9.0]], [[0.0, 1.0], [5.0, 5.0], [7.0, 7.0]]])
    x_hat = np.array([[[0.0, 2.0], [1.0, 0.0], [-9.0, 0.0]], [[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = np.array([[True, True, False], [True, False, False]])  # 3 valid steps of D = 2
    # Squared errors of the valid steps: (1 + 0) + (4 + 1) + (4 + 0) = 10, over 3 steps x 2 dims.
    expected = ((x - x_hat) ** 2 * valid[..., None]).sum() / (valid.sum() * x.shape[-1])
    assert expected == pytest.approx(10 / 6)
    close(reconstruction_loss(t(x), t(x_hat), torch.as_tensor(valid)), expected)


def test_eq5_discriminator_and_generator_losses():
    real, fake = np.array([[2.0, -1.0], [0.5, 0.0]]), np.array([[-3.0, 1.0], [0.0, 2.0]])
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    # max_w E[log D(d)] + E[log(1 - D(E(X)))], as a loss to minimise; the generator's non-saturating -log D(E(X)).
    expected_disc = -np.log(sigmoid(real)).mean() - np.log(1 - sigmoid(fake)).mean()
    expected_gen = -np.log(sigmoid(fake)).mean()
    close(discriminator_loss(t(real), t(fake)), expected_disc)
    close(generator_loss(t(fake)), expected_gen)


# -- eqs. 6-11: the cross-modal gate -----------------------------------------------------------------------------


def test_eq6_matching_matrix_sums_other_codes_and_scales_by_inverse_sqrt_d():
    rng = np.random.default_rng(6)
    codes = {m: small_ints(rng, 2, 4) for m in MODALITIES}
    w = small_ints(rng, 4, 4)
    gate = CrossModalGate(config(latent_dim=4))
    set_linear(gate.W, w)
    for core, (o1, o2) in OTHERS.items():  # one W shared by every core
        matching = gate.matching(batched(codes), core)[0]
        expected = codes[core] @ w @ (codes[o1] + codes[o2]).T / 2.0  # sqrt(d) = 2
        close(matching, expected)
        assert np.abs(expected).max() > 0  # so the unscaled matrix (twice this) differs


def test_eq7_softmax_is_over_each_row_of_the_matching_matrix():
    # Others' codes summing to the identity make A^v = softmax(M^v) itself (eq. 8 with values = I).
    codes = {"vision": np.array([[1.0, 2.0], [0.0, -1.0]]), "text": np.array([[1.0, 0.0], [0.0, 0.0]]),
             "audio": np.array([[0.0, 0.0], [0.0, 1.0]])}
    w = np.array([[1.0, 0.0], [1.0, 1.0]])
    gate = CrossModalGate(config(latent_dim=2))
    set_linear(gate.W, w)
    scores = codes["vision"] @ w / math.sqrt(2)
    transferred = gate.transfer(batched(codes), "vision")[0]
    close(transferred, softmax_rows(scores))
    close(transferred.sum(-1), np.ones(2))
    assert not np.allclose(softmax_rows(scores), softmax_rows(scores.T).T)  # a column softmax would differ


def test_eq8_transfer_carries_the_other_modalities_summed_codes():
    rng = np.random.default_rng(8)
    codes = {m: small_ints(rng, 3, 2) for m in MODALITIES}
    w = small_ints(rng, 2, 2)
    gate = CrossModalGate(config(latent_len=3, latent_dim=2))
    set_linear(gate.W, w)
    for core, (o1, o2) in OTHERS.items():
        others_sum = codes[o1] + codes[o2]
        weights = softmax_rows(ref_matching(codes[core], others_sum, w))
        expected = weights @ others_sum
        assert not np.allclose(expected, weights @ codes[core], atol=0.1)  # the core's own code would differ
        close(gate.transfer(batched(codes), core)[0], expected)


def test_eq9_gate_input_is_the_four_way_concatenation_times_w_plus_b():
    rng = np.random.default_rng(9)
    codes = {m: small_ints(rng, 2, 2) for m in MODALITIES}
    gate = CrossModalGate(config(latent_dim=2))
    for pair in PAIRS:
        m, n = pair.split("-")
        w = small_ints(rng, 8, 2)
        b = np.array([40.0, 50.0])  # large enough that ReLU passes everything: this pins eq. 9 alone
        set_linear(gate.gates[pair], w, b)
        s_m, s_n = codes[m], codes[n]
        expected = np.concatenate([s_m, s_n, s_m - s_n, s_m * s_n], axis=-1) @ w + b
        assert expected.min() > 0
        close(gate.gate_activation(batched(codes), (m, n))[0], expected)


def test_eq10_gate_is_relu_so_a_negative_pre_activation_gives_exactly_zero():
    codes = {"vision": np.array([[1.5, -2.0], [-0.5, 3.0]]), "text": np.zeros((2, 2)), "audio": np.zeros((2, 2))}
    gate = CrossModalGate(config(latent_dim=2))
    rng = np.random.default_rng(10)
    for p in PAIRS:
        set_linear(gate.gates[p], small_ints(rng, 8, 2), small_ints(rng, 2))
    w_vt = np.zeros((8, 2))
    w_vt[:2] = np.eye(2)  # pre-activation S^{vt} = S^v
    set_linear(gate.gates["vision-text"], w_vt)
    # P_v and P_t output constant 1/2 each, so F^{vt} = G^{vt} * 1 exposes the gate through the full forward.
    for m in MODALITIES:
        set_linear(gate.combine[m], np.zeros((4, 2)), np.full(2, 0.5))
    features = gate(batched(codes))["vision-text"][0]
    expected = np.maximum(codes["vision"], 0.0)
    close(features, expected)
    assert (features[codes["vision"] < 0] == 0).all()  # exactly zero: a sigmoid gives > 0


def test_eq11_pair_feature_is_gate_times_each_combined_transfer_summed():
    rng = np.random.default_rng(11)
    codes = {m: small_ints(rng, 2, 3) / 2 for m in MODALITIES}
    weights = gate_weights(rng, 3)
    gate = CrossModalGate(config(latent_dim=3))
    load_gate(gate, weights)
    expected = ref_gate_features(codes, weights)
    features = gate(batched(codes))
    assert set(features) == set(PAIRS)
    for pair in PAIRS:
        assert np.abs(expected[pair]).max() > 0.1
        close(features[pair][0], expected[pair])


# -- eqs. 12-14: the MMD adaptive loss ---------------------------------------------------------------------------


def test_eq12_gaussian_mmd_hand_computed():
    # x = two points at 0, y = two at 1: squared distances 0 within a set, 1 across; their mean over the
    # 4 x 4 joint matrix is 8/16 = 0.5, so the bandwidth is 0.5 * s and k(x, y) = sum_s exp(-2 / s).
    x, y = torch.zeros(1, 2, 1), torch.ones(1, 2, 1)
    close(gaussian_mmd(x, y, (1.0,)), np.array([2 - 2 * math.exp(-2)]))
    close(gaussian_mmd(x, y, (1.0, 2.0)), np.array([2 * 2 - 2 * (math.exp(-2) + math.exp(-1))]))
    # A general case: unequal set sizes, per-sample bandwidths.
    rng = np.random.default_rng(12)
    xs, ys = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 4, 2)) + 1
    scales = (0.5, 1.0, 2.0)
    close(gaussian_mmd(t(xs), t(ys), scales), np.array([ref_mmd(xs[i], ys[i], scales) for i in range(2)]))


@pytest.mark.parametrize("modalities", [MODALITIES, ("vision", "text")])
def test_eq14_adaptive_loss_sums_over_cores_and_averages_over_the_batch(modalities):
    rng = np.random.default_rng(14)
    cfg = config(latent_len=3, latent_dim=3, modalities=modalities)
    codes = {m: rng.normal(size=(3, 3, 3)) for m in modalities}
    pair_features = {p: rng.normal(size=(3, 3, 3)) + 0.5 for p in PAIRS}
    present = {m: np.ones(3, dtype=bool) for m in modalities}
    present[modalities[-1]][2] = False  # sample 2 misses a modality: left out of every core's term
    xi_w, xi_b = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [1.0, -1.0, 0.0]]), np.array([0.5, 0.0, -1.0])
    adaptive = AdaptiveLoss(cfg)
    set_linear(adaptive.xi, xi_w, xi_b)
    scales = cfg.mmd_kernel_scales
    expected = 0.0
    for core in modalities:
        pair = OTHER_PAIR[core] if len(modalities) == 3 else "-".join(modalities)
        per_sample = [ref_mmd(codes[core][i] @ xi_w + xi_b, pair_features[pair][i] @ xi_w + xi_b, scales)
                      for i in (0, 1)]
        expected += np.mean(per_sample)
    loss = adaptive({m: t(c) for m, c in codes.items()}, {p: t(f) for p, f in pair_features.items()},
                    {m: torch.as_tensor(k) for m, k in present.items()})
    close(loss, np.array(expected))


@pytest.mark.parametrize(("kernel_map", "direction"), [("adversarial", 1), ("minimised", -1)])
def test_eq12_kernel_map_switch_sets_whether_xi_ascends_or_descends_the_mmd(kernel_map, direction):
    """"adversarial" (default): xi ascends the MMD by gradient reversal; "minimised" (the paper's literal reading):
    xi descends it. Either way the codes upstream descend it."""
    torch.manual_seed(0)
    cfg = config(latent_len=4, latent_dim=4, mmd_kernel_map=kernel_map)
    adaptive = AdaptiveLoss(cfg)
    codes = {m: torch.randn(2, 4, 4, requires_grad=True) for m in MODALITIES}
    pairs = {p: torch.randn(2, 4, 4) + 0.5 for p in PAIRS}
    present = {m: torch.ones(2, dtype=torch.bool) for m in MODALITIES}
    xi_step = torch.optim.SGD(adaptive.parameters(), lr=1e-2)
    loss = adaptive(codes, pairs, present)
    loss.backward()
    xi_step.step()
    with torch.no_grad():
        after_xi = adaptive(codes, pairs, present)
        assert (after_xi - loss) * direction > 1e-5
        moved_codes = {m: c - 1e-2 * c.grad for m, c in codes.items()}  # the codes' gradient is never reversed
        assert adaptive(moved_codes, pairs, present) < after_xi


# -- eqs. 15-17: fusion and output -------------------------------------------------------------------------------


def mha_weights(rng: np.random.Generator, d: int) -> dict:
    return {k: (small_ints(rng, d, d), small_ints(rng, d) / 2) for k in "qkvo"}


def load_mha(mha: MultiHeadAttention, weights: dict) -> None:
    for k in "qkvo":
        set_linear(getattr(mha, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}[k]), *weights[k])


def test_eq15_16_multi_head_attention_matches_reference_and_query_key_are_not_interchangeable():
    rng = np.random.default_rng(15)
    d, heads = 4, 2
    weights = mha_weights(rng, d)
    for k in "qk":  # modest scores so the softmax is not one-hot and the scale shows
        weights[k] = (weights[k][0] / 2, weights[k][1])
    mha = MultiHeadAttention(d, heads).eval()
    load_mha(mha, weights)
    query, key, value = (small_ints(rng, 2, d) / 2 for _ in range(3))
    expected = ref_mha(query, key, value, weights, heads)
    swapped = ref_mha(key, query, value, weights, heads)
    assert not np.allclose(expected, swapped, atol=1e-2)
    one_head_scale = ref_mha(query, key, value, weights, 1)  # softmax over sqrt(d), heads not split
    assert not np.allclose(expected, one_head_scale, atol=1e-2)
    close(mha(t(query)[None], t(key)[None], t(value)[None])[0], expected)
    # Masked keys take no weight.
    keep = np.array([True, False])
    close(mha(t(query)[None], t(key)[None], t(value)[None], key_mask=torch.as_tensor(keep)[None])[0],
          ref_mha(query, key, value, weights, heads, key_keep=keep))


def test_eq15_16_scale_is_sqrt_of_the_per_head_dim():
    # One head of dim 2 inside d = 4, h = 2; identity projections; query . key = 4 on head 0, 0 on head 1.
    mha = MultiHeadAttention(4, 2).eval()
    identity = {k: (np.eye(4), np.zeros(4)) for k in "qkvo"}
    load_mha(mha, identity)
    query = np.array([[2.0, 0.0, 0.0, 0.0]])
    key = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    value = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    weight = 1 / (1 + math.exp(-2 / math.sqrt(2)))  # head 0: softmax([2, 0] / sqrt(d/h)), d/h = 2
    expected = np.array([[weight, 0.0, 0.5, 0.5]])  # head 1: scores all 0 -> uniform
    close(mha(t(query)[None], t(key)[None], t(value)[None])[0], expected)


def model_with_codes(codes: dict[str, np.ndarray], cfg: MCIHNConfig) -> MCIHN:
    """An MCIHN whose encoders return the given codes (so the test starts at eq. 6)."""
    model = MCIHN(cfg).eval()
    for m, code in codes.items():
        model.paths[m].encode = lambda x, valid, code=code: t(code)[None].expand(x.shape[0], -1, -1)
    return model


def test_eq15_fusion_query_key_are_pair_features_and_value_is_the_core_code():
    rng = np.random.default_rng(150)
    cfg = config(latent_len=2, latent_dim=2)
    codes = {m: small_ints(rng, 2, 2) for m in MODALITIES}
    features = {p: small_ints(rng, 2, 2) for p in PAIRS}
    model = MCIHN(cfg).eval()
    identity = {k: (np.eye(2), np.zeros(2)) for k in "qkvo"}
    for m in MODALITIES:
        load_mha(model.fusion[m], identity)
    # docs/model.md: F^{v-ta} = MHA(F^{vt}, F^{va}, S^v), F^{t-va} = MHA(F^{vt}, F^{ta}, S^t),
    # F^{a-vt} = MHA(F^{va}, F^{ta}, S^a); eq. 17 adds them.
    expected = (ref_mha(features["vision-text"], features["vision-audio"], codes["vision"], identity, 1)
                + ref_mha(features["vision-text"], features["text-audio"], codes["text"], identity, 1)
                + ref_mha(features["vision-audio"], features["text-audio"], codes["audio"], identity, 1))
    close(model.fuse(batched(codes), batched(features))[0], expected)


@pytest.mark.parametrize("head", ["regression", "classification"])
def test_eq17_output_is_linear_of_the_mean_pooled_sum(head):
    rng = np.random.default_rng(17)
    d = 4
    labels = ["neg", "neu", "pos"] if head == "classification" else []
    cfg = config(latent_len=3, latent_dim=d, num_heads=2, head=head, labels=labels)
    codes = {m: small_ints(rng, 3, d) / 2 for m in MODALITIES}
    model = model_with_codes(codes, cfg)
    gate = gate_weights(rng, d)
    load_gate(model.gate, gate)
    fusion = {m: mha_weights(rng, d) for m in MODALITIES}
    for m in MODALITIES:
        load_mha(model.fusion[m], fusion[m])
    w_out, b_out = small_ints(rng, d, cfg.num_outputs), small_ints(rng, cfg.num_outputs) / 2
    set_linear(model.head, w_out, b_out)

    f = ref_gate_features(codes, gate)
    added = (ref_mha(f["vision-text"], f["vision-audio"], codes["vision"], fusion["vision"], 2)
             + ref_mha(f["vision-text"], f["text-audio"], codes["text"], fusion["text"], 2)
             + ref_mha(f["vision-audio"], f["text-audio"], codes["audio"], fusion["audio"], 2))
    logits = added.mean(axis=0) @ w_out + b_out
    lengths = torch.tensor([[2, 2, 2]])
    inputs = [torch.zeros(1, 2, 3) for _ in MODALITIES]
    if head == "regression":
        close(model(*inputs, lengths)[0], logits[0])
    else:  # eq. 17's softmax at inference; training takes the logits (cross-entropy, eq. 18)
        close(model.forward_train(dict(zip(MODALITIES, inputs, strict=True)), lengths).prediction[0], logits)
        close(model(*inputs, lengths)[0], softmax_rows(logits))


# -- eqs. 18-19: task loss and the joint objective ---------------------------------------------------------------


def test_eq18_l1_for_regression_and_cross_entropy_for_classification():
    prediction, target = np.array([0.5, -1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    close(task_loss(t(prediction), t(target), "regression"), np.array(np.abs(prediction - target).mean()))
    logits, classes = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]]), np.array([0, 2, 2])
    nll = -np.log(softmax_rows(logits)[np.arange(3), classes])
    close(task_loss(t(logits), torch.as_tensor(classes), "classification"), np.array(nll.mean()))
    weight = np.array([2.0, 1.0, 0.5])
    close(task_loss(t(logits), torch.as_tensor(classes), "classification", t(weight)),
          np.array((weight[classes] * nll).sum() / weight[classes].sum()))


SHAPES = {"vision": (2, 3), "text": (3, 4), "audio": (2, 3)}  # (T, D)


def tiny_split(n: int, seed: int) -> FeatureSplit:
    rng = np.random.default_rng(seed)
    feats = {m: rng.normal(size=(n, steps, dim)).astype(np.float32) for m, (steps, dim) in SHAPES.items()}
    labels = (3 * feats["text"].mean(axis=(1, 2))).astype(np.float32)
    lengths = {m: np.full(n, steps, dtype=np.int64) for m, (steps, _) in SHAPES.items()}
    return FeatureSplit(feats, lengths, labels, [f"s{seed}_{i}" for i in range(n)])


def tiny_trainer(tmp_path: Path, n: int = 16, lr: float = 1e-3, **overrides) -> Trainer:
    """A trainer on a 16-sample synthetic set: one batch per epoch, no dropout of any kind."""
    splits = {"train": tiny_split(n, 0), "valid": tiny_split(8, 1), "test": tiny_split(8, 2)}
    data = FeatureSet("tiny", splits, spec_from_split(splits["train"]))
    sizes = {"latent_len": 2, "latent_dim": 8, "num_heads": 2, "dropout": 0.0, "modality_dropout": 0.0}
    cfg = config_for_data(data, MCIHNConfig(**{**sizes, **overrides}))
    return Trainer(data, cfg, TrainConfig(seed=0, batch_size=n, lr=lr, progress=False), tmp_path)


def one_batch(trainer: Trainer) -> Batch:
    return next(trainer.train_tensors.batches(len(trainer.train_tensors)))


@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_eq19_joint_loss_is_task_plus_weighted_adaptive(tmp_path, weight):
    trainer = tiny_trainer(tmp_path, adaptive_loss_weight=weight)
    stepped = []
    trainer._step = lambda name, loss: stepped.append((name, loss.item()))
    losses = trainer.joint_phase(one_batch(trainer))
    assert losses["adaptive"] > 1e-3
    assert stepped == [("joint", pytest.approx(losses["task"] + weight * losses["adaptive"], rel=1e-6))]


# -- Algorithm 1: the phases of one batch ------------------------------------------------------------------------


def parameter_group(name: str) -> str:
    """'paths.text.encoder.ffn.0.weight' -> 'text encoder'; 'gate.W.weight' -> 'gate'; 'adaptive.xi.bias' -> 'xi'."""
    parts = name.split(".")
    if parts[0] == "paths":
        return f"{parts[1]} {parts[2]}"
    return "xi" if parts[0] == "adaptive" else parts[0]


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    adaptive = [(f"adaptive.{n}", p) for n, p in trainer.adaptive.named_parameters()]
    named = list(trainer.model.named_parameters()) + adaptive
    return {n: p.detach().clone() for n, p in named}


def differing_groups(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], kind: str = "") -> set[str]:
    """Parameter groups (ending in `kind`) with a tensor that differs between snapshots a and b."""
    return {parameter_group(n) for n in a if parameter_group(n).endswith(kind) and not torch.equal(a[n], b[n])}


def changed_groups(trainer: Trainer, before: dict[str, torch.Tensor]) -> set[str]:
    return differing_groups(before, snapshot(trainer))


def every_modality(*parts: str) -> set[str]:
    return {f"{m} {part}" for m in MODALITIES for part in parts}


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("reconstruction_phase", every_modality("encoder", "decoder")),
        ("discriminator_phase", every_modality("discriminator")),
        ("generator_phase", every_modality("encoder")),
    ],
)
def test_algorithm1_aae_phase_updates_only_its_parameters(tmp_path, phase, expected):
    trainer = tiny_trainer(tmp_path)
    before = snapshot(trainer)
    getattr(trainer, phase)(trainer.aae_inputs(one_batch(trainer)))
    assert changed_groups(trainer, before) == expected


def test_algorithm1_joint_phase_updates_everything_but_decoders_and_discriminators(tmp_path):
    trainer = tiny_trainer(tmp_path)
    before = snapshot(trainer)
    trainer.joint_phase(one_batch(trainer))
    # missing_code stays: every modality is present in this batch, so it gets no gradient.
    assert changed_groups(trainer, before) == every_modality("encoder") | {"gate", "fusion", "head", "xi"}


def test_algorithm1_each_batch_runs_reconstruction_discriminator_generator_then_joint(tmp_path):
    trainer = tiny_trainer(tmp_path)
    steps = []
    for name, optimizer in trainer.optimizers.items():
        optimizer.register_step_post_hook(lambda *_, name=name: steps.append(name))
    losses = trainer.train_epoch()  # 16 samples, batch size 16: one batch
    assert steps == ["reconstruction", "discriminator", "generator", "joint"]
    assert {"reconstruction", "discriminator", "generator", "task", "adaptive"} <= set(losses)


def test_algorithm1_aae_phases_reconstruct_first_then_move_discriminators_and_encoders(tmp_path):
    """Two identical trainers: one runs the three AAE phases on a batch, the other reconstruction alone."""
    full, reconstruction_only = tiny_trainer(tmp_path / "a"), tiny_trainer(tmp_path / "b")
    before = snapshot(full)
    full.aae_phases(one_batch(full))
    reconstruction_only.reconstruction_phase(reconstruction_only.aae_inputs(one_batch(reconstruction_only)))
    after, reference = snapshot(full), snapshot(reconstruction_only)
    assert differing_groups(after, reference, "decoder") == set()  # the same reconstruction step, taken first
    assert differing_groups(after, before, "discriminator") == every_modality("discriminator")
    assert differing_groups(after, reference, "encoder") == every_modality("encoder")  # the generator step


def test_algorithm1_mcihn1_runs_the_joint_phase_only(tmp_path):
    trainer = tiny_trainer(tmp_path, use_aae=False)
    steps = []
    for name, optimizer in trainer.optimizers.items():
        optimizer.register_step_post_hook(lambda *_, name=name: steps.append(name))
    trainer.train_epoch()
    assert steps == ["joint"]


def test_algorithm1_reconstruction_loss_falls_on_a_fixed_batch(tmp_path):
    trainer = tiny_trainer(tmp_path, lr=1e-2)  # a few steps suffice at 10x the paper's lr
    inputs = trainer.aae_inputs(one_batch(trainer))
    losses = [trainer.reconstruction_phase(inputs) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]


def discriminator_accuracy(trainer: Trainer, inputs) -> float:
    """Share of fresh prior samples called real (logit > 0) and of codes called fake, over every modality."""
    right = []
    with torch.no_grad():
        for path, x, valid in inputs:
            code = path.encoder(x, valid)
            right += [(path.discriminator(torch.randn_like(code)) > 0).float().mean(),
                      (path.discriminator(code) < 0).float().mean()]
    return float(torch.stack(right).mean())


def test_algorithm1_discriminator_beats_chance_and_generator_then_fools_it(tmp_path):
    trainer = tiny_trainer(tmp_path, lr=1e-2)
    torch.manual_seed(0)
    inputs = trainer.aae_inputs(one_batch(trainer))
    disc_losses = [trainer.discriminator_phase(inputs) for _ in range(20)]
    chance = len(MODALITIES) * 2 * math.log(2)  # the summed loss of three discriminators that output 1/2
    assert disc_losses[-1] < chance - 1.0
    assert discriminator_accuracy(trainer, inputs) > 0.75
    gen_losses = [trainer.generator_phase(inputs) for _ in range(10)]
    assert gen_losses[-1] < gen_losses[0]  # against the fixed discriminator, codes look more like the prior


@pytest.mark.parametrize(("kernel_map", "direction"), [("adversarial", 1), ("minimised", -1)])
def test_joint_phase_moves_xi_as_the_kernel_map_switch_says(tmp_path, kernel_map, direction):
    trainer = tiny_trainer(tmp_path, mmd_kernel_map=kernel_map)
    batch = one_batch(trainer)
    with torch.no_grad():
        out = trainer.model.forward_train(batch.features, batch.lengths)

    def mmd() -> float:
        with torch.no_grad():
            return trainer.adaptive(out.codes, out.pair_features, out.present).item()

    before = mmd()
    trainer.joint_phase(batch)
    assert (mmd() - before) * direction > 0  # codes held fixed: only xi's step shows


# -- config switches for the paper's literal readings -----------------------------------------------------------


def test_fusion_attention_dropout_defaults_to_dropout_and_can_be_switched_off():
    assert MCIHNConfig().fusion_attention_dropout_rate == 0.5
    assert all(a.dropout.p == 0.3 for a in MCIHN(config(dropout=0.3)).fusion.values())
    literal = MCIHN(config(dropout=0.5, fusion_attention_dropout=0.0)).train()
    assert all(a.dropout.p == 0.0 for a in literal.fusion.values())
    assert literal.head_dropout.p == 0.5  # the other dropouts keep `dropout`
    x = torch.randn(1, 16, 4)  # 16 x 16 attention weights: two dropout masks cannot coincide by chance
    with torch.no_grad():
        assert torch.equal(literal.fusion["text"](x, x, x), literal.fusion["text"](x, x, x))
        torch.manual_seed(0)
        dropped = MCIHN(config(dropout=0.5)).train().fusion["text"]
        assert not torch.equal(dropped(x, x, x), dropped(x, x, x))


def test_config_without_the_new_fields_loads_with_todays_behaviour():
    old = MCIHNConfig().to_dict()
    for new_field in ("mmd_kernel_map", "fusion_attention_dropout"):
        del old[new_field]
    loaded = MCIHNConfig.from_dict(old)
    assert loaded == MCIHNConfig()
    assert (loaded.mmd_kernel_map, loaded.fusion_attention_dropout_rate, loaded.adaptive_loss_weight) == (
        "adversarial", loaded.dropout, 0.1)
    with pytest.raises(ValueError, match="mmd_kernel_map"):
        MCIHNConfig(mmd_kernel_map="maximised")


def test_literal_eq12_14_ablation_is_the_papers_reading():
    from tools.cli import build_parser

    literal = MCIHNConfig.for_ablation("literal-eq12-14")
    assert (literal.mmd_kernel_map, literal.adaptive_loss_weight) == ("minimised", 1.0)
    assert {k: v for k, v in literal.to_dict().items() if k not in ABLATIONS["literal-eq12-14"]} == {
        k: v for k, v in MCIHNConfig().to_dict().items() if k not in ABLATIONS["literal-eq12-14"]}
    args = build_parser().parse_args(["train", "--data", "x.npz", "--ablation", "literal-eq12-14"])
    assert args.ablation == "literal-eq12-14"
