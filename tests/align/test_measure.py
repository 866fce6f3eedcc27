"""alignment_report / alignment_matrix: the one-sweep computation against the naive loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import seeded_randn
from torch import nn

from gradkit.align.measure import REPORT_KEYS, alignment_matrix, alignment_report
from gradkit.align.networks import ACTIVATIONS, forward_states, make_mlp
from gradkit.align.reference import (
    alignment_matrix_naive,
    alignment_report_naive,
    per_loss_gradients,
)
from gradkit.align.targets import layer_losses, make_targets

TOL = 1e-8


def data(
    depth=4,
    width=6,
    batch=5,
    activation="tanh",
    *,
    bias=False,
    init="gaussian",
    seed=0,
    in_features=None,
    dtype=torch.float64,
    target_mode="iid",
):
    net = make_mlp(
        depth,
        width,
        activation,
        bias=bias,
        init=init,
        seed=seed,
        in_features=in_features,
        dtype=dtype,
    )
    generator = torch.Generator().manual_seed(seed + 100)
    if bias:  # the init zeroes biases; give them values so they matter
        with torch.no_grad():
            for layer in net:
                layer.linear.bias.copy_(
                    0.3 * torch.randn(layer.linear.bias.shape, generator=generator)
                )
    x = torch.randn(batch, in_features or width, generator=generator).to(dtype)
    return net, x, make_targets(net, x, target_mode, seed=seed + 1)


def assert_reports_equal(got: dict, want: dict, tol: float = TOL) -> None:
    assert set(got) == set(REPORT_KEYS)
    for key in REPORT_KEYS:
        a, b = got[key], want[key]
        assert a.dtype == torch.float64, key
        assert a.shape == b.shape, key
        assert torch.equal(a.isnan(), b.isnan()), f"{key}: NaN pattern differs\n{a}\n{b}"
        scale = max(1.0, b.nan_to_num(0).abs().max().item())
        err = (a - b).nan_to_num(0).abs().max().item()
        assert err <= tol * scale, f"{key}: max error {err:.3g}\n{a}\n{b}"


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("method", ["auto", "generic"])
def test_fast_equals_naive_for_every_activation(activation, bias, method):
    net, x, targets = data(activation=activation, bias=bias, seed=3)
    got = alignment_report(net, x, targets, method=method)
    assert_reports_equal(got, alignment_report_naive(net, x, targets))


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
@pytest.mark.parametrize("target_mode", ["iid", "uncentered", "teacher"])
def test_fast_equals_naive_for_inits_and_target_modes(init, target_mode):
    net, x, targets = data(activation="relu", init=init, target_mode=target_mode, seed=5)
    assert_reports_equal(alignment_report(net, x, targets), alignment_report_naive(net, x, targets))


@pytest.mark.parametrize(
    ("batch", "in_features", "bias"),
    [(3, 6, False), (3, 6, True), (12, 4, False), (12, 4, True), (5, 4, True), (1, 6, False)],
)
def test_both_gram_factorisations(batch, in_features, bias):
    # n_in + 1 ≤ B uses F = Ã itself; n_in + 1 > B uses the QR factor Rᵀ (B × B).
    net, x, targets = data(3, 6, batch, "tanh", bias=bias, in_features=in_features, seed=7)
    for method in ("dense", "generic"):
        assert_reports_equal(
            alignment_report(net, x, targets, method=method),
            alignment_report_naive(net, x, targets),
        )


class ScaledTanh(nn.Module):
    """A layer with parameters of three kinds: a matrix, a per-row vector, a scalar."""

    def __init__(self, n_in: int, n_out: int, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(n_out, n_in, generator=generator, dtype=torch.float64) / math.sqrt(n_in)
        )
        self.row_scale = nn.Parameter(
            1 + 0.2 * torch.randn(n_out, generator=generator, dtype=torch.float64)
        )
        self.temperature = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, a):
        return torch.tanh(self.temperature * (a @ self.weight.T)) * self.row_scale


class Diagonal(nn.Module):
    """Only a 1-d parameter: the whole layer counts as one row."""

    def __init__(self, n: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=torch.float64))

    def forward(self, a):
        return torch.sin(a * self.scale)


def test_generic_modules_equal_naive():
    generator = torch.Generator().manual_seed(0)
    layers = nn.Sequential(
        nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), nn.Tanh()),
        ScaledTanh(6, 5, generator),
        Diagonal(5),
        nn.Sequential(nn.Linear(5, 3, dtype=torch.float64), nn.Softmax(dim=-1)),
        nn.Linear(3, 3, dtype=torch.float64),
    )
    x = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    targets = [
        torch.randn(s.shape, generator=generator, dtype=torch.float64)
        for s in forward_states(layers, x)
    ]
    want = alignment_report_naive(layers, x, targets)
    assert_reports_equal(alignment_report(layers, x, targets), want)
    assert_reports_equal(alignment_report(layers, x, targets, method="generic"), want)
    # Diagonal has no matrix parameter: its per-row cosine is the whole-vector cosine.
    assert want["local_distant_cosine_per_row"][2].item() == pytest.approx(
        want["local_distant_cosine"][2].item(), abs=1e-12
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(1, 4),
    width=st.integers(1, 6),
    batch=st.integers(1, 6),
    activation=st.sampled_from(ACTIVATIONS[:5]),
    bias=st.booleans(),
    init=st.sampled_from(["gaussian", "orthogonal"]),
    seed=st.integers(0, 10_000),
)
def test_fast_equals_naive_property(depth, width, batch, activation, bias, init, seed):
    net, x, targets = data(depth, width, batch, activation, bias=bias, init=init, seed=seed)
    assert_reports_equal(alignment_report(net, x, targets), alignment_report_naive(net, x, targets))


# --------------------------------------------------------------------------- the quantities


def test_sum_of_per_loss_gradients_is_the_global_gradient():
    net, x, targets = data(4, 5, 6, "tanh", bias=True, seed=11)
    per_loss = per_loss_gradients(net, x, targets)
    total = layer_losses(forward_states(net, x), targets).sum()
    params = list(net.parameters())
    global_grads = torch.autograd.grad(total, params)
    k = 0
    for i, layer in enumerate(net):
        for p_index, _ in enumerate(layer.parameters()):
            summed = sum(per_loss[j][i][p_index] for j in range(i, len(net)))
            torch.testing.assert_close(summed, global_grads[k], rtol=1e-12, atol=1e-12)
            k += 1
        for j in range(i):
            assert per_loss[j][i] is None  # ℓ_j does not depend on later layers
    # The sweep's global norm/cosine (built from Σ_j g_ij) match autograd's global gradient.
    report = alignment_report(net, x, targets)
    flat_global = [
        torch.cat([g.reshape(-1) for g in global_grads[2 * i : 2 * i + 2]]) for i in range(len(net))
    ]
    flat_local = [torch.cat([g.reshape(-1) for g in per_loss[i][i]]) for i in range(len(net))]
    for i in range(len(net)):
        assert report["global_norm"][i].item() == pytest.approx(
            flat_global[i].norm().item(), rel=1e-12
        )
        cos = torch.nn.functional.cosine_similarity(flat_local[i], flat_global[i], dim=0)
        assert report["local_global_cosine"][i].item() == pytest.approx(cos.item(), abs=1e-12)


def test_matrix_layout_and_derived_keys():
    net, x, targets = data(5, 6, 4, "linear", bias=True, seed=2)
    report = alignment_report(net, x, targets)
    S = report["matrix"]
    assert S.shape == (5, 5) and S.dtype == torch.float64
    torch.testing.assert_close(alignment_matrix(net, x, targets), S, rtol=0, atol=0, equal_nan=True)
    lower = torch.ones(5, 5, dtype=torch.bool).tril(-1)
    assert S[lower].isnan().all() and report["grad_norms"][lower].isnan().all()
    assert torch.equal(S.diagonal(), torch.ones(5, dtype=torch.float64))
    assert (S[~lower].abs() <= 1).all()
    torch.testing.assert_close(report["grad_norms"].diagonal(), report["local_norm"])
    assert report["local_distant_cosine"][-1].isnan()
    assert report["local_distant_cosine_per_row"][-1].isnan()
    assert report["distant_norm"][-1].isnan()
    assert report["local_global_cosine"][-1].item() == pytest.approx(1.0)  # global = local there
    params = torch.tensor([6 * 6 + 6.0] * 5, dtype=torch.float64)
    torch.testing.assert_close(report["num_params"], params)
    torch.testing.assert_close(report["random_baseline"], params.rsqrt())


def test_one_linear_layer_by_hand():
    # ℓ = ‖x Wᵀ − t‖², ∂ℓ/∂W = 2 (x Wᵀ − t)ᵀ x: the only entry is the diagonal, and the
    # local norm is that matrix's Frobenius norm.
    generator = torch.Generator().manual_seed(4)
    layer = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    x = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    t = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    report = alignment_report([layer], x, [t])
    grad = 2 * (x @ layer.weight.detach().T - t).T @ x
    assert report["local_norm"].item() == pytest.approx(grad.norm().item(), rel=1e-12)
    assert report["matrix"].item() == 1.0


def test_zero_gradient_gives_nan_cosines():
    net, x, _ = data(3, 4, 5, "tanh", seed=6)
    states = [s.detach() for s in forward_states(net, x)]
    targets = [seeded_randn(*states[0].shape, seed=1), seeded_randn(*states[1].shape, seed=2)]
    targets.append(states[2])  # ℓ_2 = 0
    report = alignment_report(net, x, targets)
    assert report["matrix"][:, 2].isnan().all()  # cos with the zero vector, incl. S[2, 2]
    assert torch.equal(report["grad_norms"][:, 2], torch.zeros(3, dtype=torch.float64))
    assert report["local_global_cosine"][2].isnan()
    assert not report["matrix"][0, :2].isnan().any()
    assert_reports_equal(report, alignment_report_naive(net, x, targets))


def test_float32_network_reports_float64_close_to_float64_network():
    net64, x, targets = data(4, 8, 6, "tanh", seed=9)
    net32 = make_mlp(4, 8, "tanh", seed=9, dtype=torch.float32)
    r32 = alignment_report(net32, x.float(), [t.float() for t in targets])
    r64 = alignment_report(net64, x, targets)
    for key in REPORT_KEYS:
        assert r32[key].dtype == torch.float64
        torch.testing.assert_close(r32[key], r64[key], rtol=1e-4, atol=1e-4, equal_nan=True)


def test_no_side_effects_and_works_under_no_grad():
    net, x, targets = data(3, 4, 5, "relu", seed=1)
    with torch.no_grad():
        report = alignment_report(net, x, targets)
    assert all(p.grad is None for p in net.parameters())
    assert_reports_equal(report, alignment_report_naive(net, x, targets))
    assert torch.equal(alignment_matrix_naive(net, x, targets).isnan(), report["matrix"].isnan())


def test_gist_surprise_twenty_linear_layers_align_positively():
    # The gist: a random 20-layer net with random targets has (almost) all 190 pairwise
    # local/distant cosines positive, strongest next to the diagonal.
    net, x, targets = data(20, 100, 50, "linear", seed=0)
    S = alignment_report(net, x, targets)["matrix"]
    upper = torch.ones(20, 20, dtype=torch.bool).triu(1)
    assert (S[upper] > 0).double().mean() >= 0.95
    first_off, last_off = S.diagonal(1).mean(), S.diagonal(19).mean()
    assert first_off > last_off > 0


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    net, x, targets = data(3, 4, 5, seed=0)
    with pytest.raises(ValueError, match="method"):
        alignment_report(net, x, targets, method="fast")
    with pytest.raises(ValueError, match="at least one layer"):
        alignment_report([], x, [])
    with pytest.raises(TypeError, match="layers"):
        alignment_report(net[0], x, targets[:1])
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        alignment_report([net[0], "relu"], x, targets[:2])
    with pytest.raises(ValueError, match="one tensor per layer"):
        alignment_report(net, x, targets[:2])
    with pytest.raises(ValueError, match=r"targets\[1\].*shape"):
        alignment_report(net, x, [targets[0], targets[1][:, :2], targets[2]])
    with pytest.raises(TypeError, match="x must be a floating"):
        alignment_report(net, x.long(), targets)
    with pytest.raises(TypeError, match=r"x has dtype torch\.float32"):
        alignment_report(net, x.float(), targets)
    with pytest.raises(ValueError, match="x must be finite"):
        alignment_report(net, torch.full_like(x, math.nan), targets)
    with pytest.raises(ValueError, match=r"targets\[2\] must be finite"):
        alignment_report(net, x, [targets[0], targets[1], targets[2] * math.inf])
    with pytest.raises(TypeError, match="targets"):
        alignment_report(net, x, torch.stack(targets))
    # nn.Tanh joins layer 0: two layers, three targets.
    with pytest.raises(ValueError, match=r"3 targets for 2 layers.*group_layers"):
        alignment_report([net[0], nn.Tanh(), net[2]], x, targets)
    with pytest.raises(ValueError, match=r"layers\[0\] \(Tanh\) has no trainable parameters"):
        alignment_report([nn.Tanh(), net[1], net[2]], x, targets[1:])
    with pytest.raises(ValueError, match=r"layers\[0\] and layers\[2\] share a parameter"):
        alignment_report([net[0], net[1], net[0]], x, targets)
    with pytest.raises(ValueError, match="method='dense'"):
        alignment_report([nn.Sequential(net[0])], x, targets[:1], method="dense")
    with torch.no_grad():
        net[1].linear.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"layers\[1\] has a non-finite parameter"):
        alignment_report(net, x, targets)


def test_per_row_cosine_skips_dead_units_and_matches_a_hand_computation():
    # Unit 0 of layer 0 is dead for every example (huge negative bias): its gradient row is
    # zero, its cosine undefined, and the per-row mean is over the other rows only.
    net, x, targets = data(3, 4, 6, "relu", bias=True, seed=12)
    with torch.no_grad():
        net[0].linear.bias[0] = -1e3
    report = alignment_report(net, x, targets)
    per_loss = per_loss_gradients(net, x, targets)
    local = torch.cat([g.reshape(4, -1) for g in per_loss[0][0]], dim=1)  # rows [W[o], b[o]]
    distant = sum(torch.cat([g.reshape(4, -1) for g in per_loss[j][0]], dim=1) for j in (1, 2))
    assert local[0].abs().max() == 0 and distant[0].abs().max() == 0
    cosines = torch.nn.functional.cosine_similarity(local[1:], distant[1:], dim=1)
    assert report["local_distant_cosine_per_row"][0].item() == pytest.approx(
        cosines.mean().item(), abs=1e-12
    )


class _NoVmapSquare(torch.autograd.Function):
    """``x²`` whose backward reads a Python scalar: it cannot run under vmap."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        scale = 2.0 if bool(grad.abs().sum() >= 0) else 0.0  # data-dependent: no vmap
        return scale * grad * x


class NoVmapLayer(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.linear = nn.Linear(n, n, dtype=torch.float64)

    def forward(self, a):
        return _NoVmapSquare.apply(torch.tanh(self.linear(a)))


def test_generic_path_falls_back_when_a_backward_cannot_be_vmapped():
    torch.manual_seed(0)
    layers = nn.Sequential(NoVmapLayer(3), NoVmapLayer(3), NoVmapLayer(3))
    x = seeded_randn(4, 3)
    targets = [seeded_randn(4, 3, seed=i + 1) for i in range(3)]
    assert_reports_equal(
        alignment_report(layers, x, targets), alignment_report_naive(layers, x, targets)
    )


def test_kwta_closed_form_handles_saturated_rows():
    # Huge pre-activations saturate the soft top-k (every p within rounding of 0 or 1): the
    # selection passes no gradient, only the z ⊙ p path does — as autograd through soft_topk.
    net, x, targets = data(3, 6, 5, "kwta", seed=4)
    with torch.no_grad():
        net[0].linear.weight.mul_(1e4)
    assert_reports_equal(alignment_report(net, x, targets), alignment_report_naive(net, x, targets))
