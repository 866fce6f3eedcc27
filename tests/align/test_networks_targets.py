"""networks.py and targets.py: init statistics, reproducibility, target modes, errors."""

from __future__ import annotations

import math

import pytest
import torch
from support import seeded_randn
from torch import nn

from gradkit import soft_topk
from gradkit.align.networks import (
    ACTIVATIONS,
    DenseLayer,
    KWinnersTakeAll,
    default_gain,
    forward_states,
    make_activation,
    make_mlp,
    reinitialize,
)
from gradkit.align.targets import TARGET_MODES, layer_losses, make_targets


def weights(net) -> list[torch.Tensor]:
    return [layer.linear.weight.detach().clone() for layer in net]


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize(
    ("activation", "gain"),
    [("linear", 1.0), ("relu", math.sqrt(2)), ("tanh", 1.0), ("kwta", math.sqrt(2))],
)
def test_gaussian_init_has_variance_gain_squared_over_fan_in(activation, gain):
    net = make_mlp(2, 300, activation, seed=0)
    assert default_gain(activation) == pytest.approx(gain)
    for w in weights(net):
        n = w.numel()
        expected = gain**2 / w.shape[1]
        assert w.var().item() == pytest.approx(expected, rel=0.03)  # 90 000 draws: ±1 %
        assert abs(w.mean().item()) < 4 * math.sqrt(expected / n)


def test_explicit_gain_scales_the_weights():
    base, scaled = (
        make_mlp(2, 50, "tanh", seed=3, gain=1.0),
        make_mlp(2, 50, "tanh", seed=3, gain=2.5),
    )
    for w, w2 in zip(weights(base), weights(scaled), strict=True):
        torch.testing.assert_close(w2, 2.5 * w)


@pytest.mark.parametrize(
    ("in_features", "width", "out_features"), [(8, 8, 8), (3, 8, 5), (12, 6, 9)]
)
def test_orthogonal_init_is_gain_times_semi_orthogonal(in_features, width, out_features):
    net = make_mlp(
        3,
        width,
        "linear",
        init="orthogonal",
        gain=1.7,
        seed=1,
        in_features=in_features,
        out_features=out_features,
    )
    for w in weights(net):
        rows, cols = w.shape
        gram = w.T @ w if rows >= cols else w @ w.T
        torch.testing.assert_close(gram, 1.7**2 * torch.eye(min(rows, cols), dtype=torch.float64))


def test_shapes_dtype_bias_and_layer_kinds():
    net = make_mlp(3, 6, "relu", bias=True, in_features=4, out_features=2, dtype=torch.float32)
    assert len(net) == 3 and all(isinstance(layer, DenseLayer) for layer in net)
    assert [tuple(layer.linear.weight.shape) for layer in net] == [(6, 4), (6, 6), (2, 6)]
    assert all(layer.linear.weight.dtype == torch.float32 for layer in net)
    assert all(torch.equal(layer.linear.bias, torch.zeros_like(layer.linear.bias)) for layer in net)
    assert all(layer.activation_name == "relu" for layer in net)
    assert all(layer.linear.bias is None for layer in make_mlp(2, 3, seed=0))


def test_same_seed_same_network_and_reinitialize_restores_it():
    a, b, c = (
        make_mlp(3, 5, "tanh", seed=7),
        make_mlp(3, 5, "tanh", seed=7),
        make_mlp(3, 5, "tanh", seed=8),
    )
    for wa, wb, wc in zip(weights(a), weights(b), weights(c), strict=True):
        assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    original = weights(a)
    with torch.no_grad():
        for layer in a:
            layer.linear.weight.add_(1.0)
    reinitialize(a, 7)
    assert all(torch.equal(w, o) for w, o in zip(weights(a), original, strict=True))
    # Layers are drawn from one generator in sequence: no two layers are equal.
    assert not torch.equal(original[1], original[2])


def test_forward_states_compose_the_layers():
    net = make_mlp(4, 5, "tanh", bias=True, seed=2)
    x = seeded_randn(3, 5)
    states = forward_states(net, x)
    assert len(states) == 4
    s = x
    for layer, state in zip(net, states, strict=True):
        s = torch.tanh(s @ layer.linear.weight.T + layer.linear.bias)
        torch.testing.assert_close(state, s)
    torch.testing.assert_close(states[-1], net(x))


def test_activations_compute_what_they_say():
    x = torch.tensor([-2.0, -0.2, 0.0, 0.3, 2.0], dtype=torch.float64)
    clip = make_activation("centered_leaky_clip")
    expected = torch.tensor(
        [-0.5 - 0.02, -0.2 - 0.002, 0.0, 0.3 + 0.003, 0.5 + 0.02], dtype=torch.float64
    )
    torch.testing.assert_close(clip(x), expected)
    torch.testing.assert_close(make_activation("leaky_relu")(x), torch.where(x > 0, x, 0.01 * x))
    torch.testing.assert_close(make_activation("linear")(x), x)
    assert set(ACTIVATIONS) >= {"linear", "relu", "tanh", "centered_leaky_clip", "kwta"}


def test_kwta_scales_by_soft_top_k_membership():
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    module = KWinnersTakeAll(k=0.3, temperature=0.2)
    assert module.winners(10) == pytest.approx(3.0)
    out = module(x)
    membership = soft_topk(x, 3.0, temperature=0.2)
    torch.testing.assert_close(out, x * membership)
    torch.testing.assert_close(membership.sum(-1), torch.full((4,), 3.0, dtype=torch.float64))
    assert KWinnersTakeAll(k=4).winners(10) == 4.0


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [
        (lambda: make_mlp(0, 5), ValueError, "depth"),
        (lambda: make_mlp(2, 0), ValueError, "width"),
        (lambda: make_mlp(2, 3, "swish"), ValueError, "activation"),
        (lambda: make_mlp(2, 3, init="uniform"), ValueError, "init"),
        (lambda: make_mlp(2, 3, gain=0.0), ValueError, "gain"),
        (lambda: make_mlp(2, 3, gain=math.nan), ValueError, "gain"),
        (lambda: make_mlp(2, 3, seed=1.5), TypeError, "seed must be an integer"),
        (lambda: make_mlp(2, 3, in_features=0), ValueError, "in_features must be an integer ≥ 1"),
        (lambda: make_activation("swish"), ValueError, "activation"),
        (lambda: KWinnersTakeAll(k=0), ValueError, "k"),
        (lambda: KWinnersTakeAll(temperature=0.0), ValueError, "temperature"),
        (lambda: KWinnersTakeAll(k=11)(seeded_randn(2, 10)), ValueError, "exceeds"),
    ],
)
def test_network_errors(factory, error, message):
    with pytest.raises(error, match=message):
        factory()


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("mode", TARGET_MODES)
def test_target_shapes_dtype_and_reproducibility(mode):
    net = make_mlp(3, 6, "tanh", seed=0, in_features=4, out_features=2)
    x = seeded_randn(5, 4)
    before = weights(net)
    targets = make_targets(net, x, mode, seed=3)
    assert [tuple(t.shape) for t in targets] == [(5, 6), (5, 6), (5, 2)]
    assert all(t.dtype == torch.float64 and not t.requires_grad for t in targets)
    again, other = make_targets(net, x, mode, seed=3), make_targets(net, x, mode, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(targets, again, strict=True))
    assert not torch.equal(targets[0], other[0])
    assert all(torch.equal(a, b) for a, b in zip(before, weights(net), strict=True))


def test_iid_targets_are_standard_gaussian_times_scale():
    net = make_mlp(2, 200, "relu", seed=0)
    x = seeded_randn(100, 200)
    for t in make_targets(net, x, "iid", scale=2.0, seed=1):
        assert abs(t.mean().item()) < 4 * 2.0 / math.sqrt(t.numel())
        assert t.std().item() == pytest.approx(2.0, rel=0.02)


def test_uncentered_targets_pass_through_the_activation():
    x = seeded_randn(50, 30)
    relu_targets = make_targets(make_mlp(2, 30, "relu", seed=0), x, "uncentered", seed=1)
    assert all((t >= 0).all() and (t == 0).any() for t in relu_targets)
    iid = make_targets(make_mlp(2, 30, "relu", seed=0), x, "iid", seed=1)
    for t, z in zip(relu_targets, iid, strict=True):  # same draws, then h
        torch.testing.assert_close(t, torch.relu(z))
    tanh_targets = make_targets(make_mlp(2, 30, "tanh", seed=0), x, "uncentered", scale=3.0)
    assert all(t.abs().max() < 1 for t in tanh_targets)


def test_teacher_targets_are_reachable_and_iid_ones_are_not():
    # A one-layer linear student can fit teacher targets exactly (least squares residual 0):
    # they come from a network of the same architecture. iid targets are not in that span.
    net = make_mlp(1, 5, "linear", seed=0, in_features=3)
    x = seeded_randn(20, 3)
    for mode, reachable in (("teacher", True), ("iid", False)):
        (target,) = make_targets(net, x, mode, seed=2)
        solution = torch.linalg.lstsq(x, target).solution
        residual = (x @ solution - target).norm().item()
        assert (residual < 1e-10) == reachable, (mode, residual)
    (teacher_target,) = make_targets(net, x, "teacher", seed=2)
    assert not torch.allclose(teacher_target, net(x))  # the teacher is not the student


def test_teacher_targets_match_a_teacher_network_with_the_same_architecture():
    net = make_mlp(3, 6, "tanh", bias=True, seed=0)
    x = seeded_randn(4, 6)
    targets = make_targets(net, x, "teacher", seed=5)
    # The last target is a function of the first through the teacher's layers 2..3: fitting
    # is not needed, consistency is: t_{i+1} = h(W t_i + b) for the same teacher weights.
    teacher_w = torch.linalg.lstsq(
        torch.cat([targets[0], torch.ones(4, 1, dtype=torch.float64)], 1), torch.atanh(targets[1])
    ).solution
    predicted = torch.tanh(
        torch.cat([targets[0], torch.ones(4, 1, dtype=torch.float64)], 1) @ teacher_w
    )
    torch.testing.assert_close(predicted, targets[1])


def test_layer_losses_are_summed_squared_distances():
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(3, 4, generator=generator), torch.randn(3, 2, generator=generator)]
    targets = [torch.randn(3, 4, generator=generator), torch.randn(3, 2, generator=generator)]
    losses = layer_losses(states, targets)
    expected = torch.stack([((s - t) ** 2).sum() for s, t in zip(states, targets, strict=True)])
    torch.testing.assert_close(losses, expected)
    with pytest.raises(ValueError, match="2 states but 1 targets"):
        layer_losses(states, targets[:1])


class _Raw(nn.Module):
    """A layer with a raw parameter and no reset_parameters(): no teacher can be drawn."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(4, dtype=torch.float64))

    def forward(self, a):
        return a @ self.weight


@pytest.mark.parametrize(
    ("layers", "mode", "scale", "error", "message"),
    [
        (None, "random", 1.0, ValueError, "target mode"),
        (None, "iid", 0.0, ValueError, "scale"),
        (None, "iid", -1.0, ValueError, "scale"),
        (None, "iid", math.inf, ValueError, "scale"),
        (None, "iid", "1", TypeError, "scale"),
        ([nn.ReLU(), nn.Linear(4, 4, dtype=torch.float64)], "iid", 1.0, ValueError, "join"),
        ([_Raw()], "teacher", 1.0, TypeError, r"'0\.weight'.*reset_parameters"),
    ],
)
def test_target_errors(layers, mode, scale, error, message):
    layers = layers or make_mlp(2, 4, seed=0)
    with pytest.raises(error, match=message):
        make_targets(layers, seeded_randn(3, 4), mode, scale=scale)
