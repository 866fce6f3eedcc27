"""decomposition: the gist's internal/external cross terms, against brute force and by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradkit.align.decompose import DECOMPOSITION_KEYS, decomposition
from gradkit.align.measure import alignment_report
from gradkit.align.networks import ACTIVATIONS, forward_states, make_mlp
from gradkit.align.reference import decomposition_naive
from gradkit.align.targets import make_targets

TERMS = ("in_in", "in_ex", "ex_in", "ex_ex")


def data(
    depth=4, width=5, batch=6, activation="tanh", *, bias=False, init="gaussian", seed=0, gain=None
):
    net = make_mlp(depth, width, activation, bias=bias, init=init, gain=gain, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    if bias:
        with torch.no_grad():
            for layer in net:
                layer.linear.bias.copy_(
                    0.3 * torch.randn(layer.linear.bias.shape, generator=generator)
                )
    x = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    return net, x, make_targets(net, x, "iid", seed=seed + 1)


def assert_close_nan(a, b, tol=1e-8):
    assert a.shape == b.shape and a.dtype == torch.float64
    assert torch.equal(a.isnan(), b.isnan())
    scale = max(1.0, b.nan_to_num(0).abs().max().item())
    assert (a - b).nan_to_num(0).abs().max().item() <= tol * scale


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("method", ["auto", "generic"])
def test_fast_equals_brute_force(activation, bias, method):
    net, x, targets = data(activation=activation, bias=bias, seed=2)
    got = decomposition(net, x, targets, method=method)
    want = decomposition_naive(net, x, targets)
    assert set(got) == set(DECOMPOSITION_KEYS)
    for key in DECOMPOSITION_KEYS:
        assert_close_nan(got[key], want[key])


def test_generic_module_sequence_equals_brute_force():
    generator = torch.Generator().manual_seed(3)
    layers = nn.Sequential(
        *[nn.Sequential(nn.Linear(4, 4, dtype=torch.float64), nn.Tanh()) for _ in range(3)]
    )
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    targets = [
        torch.randn(s.shape, generator=generator, dtype=torch.float64)
        for s in forward_states(layers, x)
    ]
    got, want = decomposition(layers, x, targets), decomposition_naive(layers, x, targets)
    for key in DECOMPOSITION_KEYS:
        assert_close_nan(got[key], want[key])


@pytest.mark.parametrize("activation", ["linear", "relu", "kwta"])
def test_four_terms_add_up_to_the_alignment_matrix(activation):
    net, x, targets = data(5, 6, 4, activation, bias=True, seed=4)
    parts = decomposition(net, x, targets)
    S = alignment_report(net, x, targets)["matrix"]
    total = sum(parts[name] for name in TERMS)
    assert_close_nan(total, S, tol=1e-12)
    assert_close_nan(parts["matrix"], S, tol=1e-12)
    # Unnormalised: ⟨g_ii, g_ij⟩ = Σ raw terms = S · ‖g_ii‖‖g_ij‖.
    norms = alignment_report(net, x, targets)["grad_norms"]
    raw_total = sum(parts[f"{name}_raw"] for name in TERMS)
    assert_close_nan(raw_total, S * norms.diagonal().unsqueeze(1) * norms, tol=1e-10)
    assert_close_nan(parts["grad_norms"], norms, tol=1e-12)


def test_internal_part_ignores_targets_and_zero_targets_have_no_external_part():
    net, x, targets = data(4, 5, 6, "tanh", seed=8)
    other = make_targets(net, x, "iid", seed=99)
    a, b = decomposition(net, x, targets), decomposition(net, x, other)
    assert_close_nan(a["in_in_raw"], b["in_in_raw"], tol=1e-12)
    assert_close_nan(a["internal_norms"], b["internal_norms"], tol=1e-12)
    zeros = decomposition(net, x, [torch.zeros_like(t) for t in targets])
    upper = torch.ones(4, 4, dtype=torch.bool).triu()
    for name in ("in_ex", "ex_in", "ex_ex"):
        assert (zeros[name][upper] == 0).all()
    assert_close_nan(zeros["in_in"], zeros["matrix"], tol=1e-12)


def test_gist_two_layer_linear_example_by_its_formulas():
    # s1 = w1 x, s2 = w2 s1 (rows are examples here, so s1 = x w1ᵀ). The gist's formulas,
    # times the 2 of ∂‖·‖², with our sign convention (external = full − internal):
    #   ∂ℓ1/∂w1 = 2 s1ᵀx − 2 s1*ᵀx,   ∂ℓ2/∂w1 = 2 (s1 w2ᵀ w2)ᵀx − 2 (s2* w2)ᵀx.
    net, x, targets = data(2, 5, 7, "linear", seed=1)
    w1, w2 = (layer.linear.weight.detach() for layer in net)
    t1, t2 = targets
    s1 = x @ w1.T
    in_1, ex_1 = 2 * s1.T @ x, -2 * t1.T @ x
    in_2, ex_2 = 2 * (s1 @ w2.T @ w2).T @ x, -2 * (t2 @ w2).T @ x
    parts = decomposition(net, x, targets)
    dot = lambda a, b: (a * b).sum().item()  # noqa: E731
    assert parts["in_in_raw"][0, 1].item() == pytest.approx(dot(in_1, in_2), rel=1e-12)
    assert parts["in_ex_raw"][0, 1].item() == pytest.approx(dot(in_1, ex_2), rel=1e-12)
    assert parts["ex_in_raw"][0, 1].item() == pytest.approx(dot(ex_1, in_2), rel=1e-12)
    assert parts["ex_ex_raw"][0, 1].item() == pytest.approx(dot(ex_1, ex_2), rel=1e-12)
    norm = (in_1 + ex_1).norm().item() * (in_2 + ex_2).norm().item()
    assert parts["in_in"][0, 1].item() == pytest.approx(dot(in_1, in_2) / norm, rel=1e-12)
    cos = dot(in_1 + ex_1, in_2 + ex_2) / norm
    assert alignment_report(net, x, targets)["matrix"][0, 1].item() == pytest.approx(cos)
    assert parts["internal_norms"][0, 1].item() == pytest.approx(in_2.norm().item(), rel=1e-12)
    # The gist's claim: the internal terms align (here ⟨in_1, in_2⟩ = 4‖w2 w1 xᵀx‖² > 0).
    assert dot(in_1, in_2) == pytest.approx(4 * (w2 @ w1 @ x.T @ x).norm().item() ** 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(2, 5),
    width=st.integers(1, 6),
    batch=st.integers(1, 6),
    init=st.sampled_from(["gaussian", "orthogonal"]),
    gain=st.floats(0.2, 3.0),
    seed=st.integers(0, 10_000),
)
def test_linear_net_internal_terms_never_disagree(depth, width, batch, init, gain, seed):
    # ⟨in_ii, in_ij⟩ = 4 tr(Mᵀ PᵀP M) = 4‖P M‖² ≥ 0 with M = W_i AᵀA, P = W_j⋯W_{i+1}.
    net, x, targets = data(depth, width, batch, "linear", init=init, gain=gain, seed=seed)
    raw = decomposition(net, x, targets)["in_in_raw"]
    upper = torch.ones(depth, depth, dtype=torch.bool).triu()
    values = raw[upper]
    assert not values.isnan().any()
    assert (values >= -1e-12 * max(1.0, values.abs().max().item())).all(), raw
