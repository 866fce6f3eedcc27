"""Your own models: flat stacks of modules (conv nets included), grouped into layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradkit.align import (
    alignment_report,
    decomposition,
    group_layers,
    layerwise_losses,
    make_targets,
    train,
)
from gradkit.align.measure import REPORT_KEYS, _dense_parts
from gradkit.align.networks import (
    KWinnersTakeAll,
    forward_states,
    layer_activation,
    reinitialized_copy,
)
from gradkit.align.reference import alignment_report_naive, decomposition_naive
from gradkit.align.targets import _TEACHER_SEED_OFFSET
from gradkit.align.training import copy_network

F64 = torch.float64


def conv_net(seed: int = 0) -> nn.Sequential:
    """Conv-ReLU-MaxPool-Conv-ReLU-Flatten-Linear on 1×8×8 inputs: three layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),  # 8×8 → 6×6
        nn.ReLU(),
        nn.MaxPool2d(2),  # → 3×3
        nn.Conv2d(3, 4, 3, padding=1),  # → 3×3
        nn.ReLU(),
        nn.Flatten(),  # → 36
        nn.Linear(36, 5),
    ).to(F64)


def images(batch: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(seed))


def assert_close_nan(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == F64
    assert torch.equal(a.isnan(), b.isnan()), f"NaN pattern differs\n{a}\n{b}"
    scale = max(1.0, b.nan_to_num(0).abs().max().item())
    assert (a - b).nan_to_num(0).abs().max().item() <= tol * scale, f"\n{a}\n{b}"


def assert_reports_close(got: dict, want: dict, tol: float = 1e-9) -> None:
    assert set(got) == set(want)
    for key in want:
        assert_close_nan(got[key], want[key], tol)


# --------------------------------------------------------------------------- the grouping


def test_conv_stack_groups_into_three_layers_sharing_the_modules():
    net = conv_net()
    groups = group_layers(net)
    assert len(groups) == 3
    assert [type(m) for m in groups[0]] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert [type(m) for m in groups[1]] == [nn.Conv2d, nn.ReLU, nn.Flatten]
    assert groups[2] is net[6]  # a layer that stands alone is the module itself
    assert all(a is b for a, b in zip(groups[0], net[:3], strict=True))  # no copies
    again = group_layers(groups)  # idempotent
    assert len(again) == 3 and all(a is b for a, b in zip(again, groups, strict=True))
    torch.testing.assert_close(groups(images()), net(images()), rtol=0, atol=0)
    states = forward_states(net, images())  # one state per layer, not per module
    assert [tuple(s.shape) for s in states] == [(6, 3, 3, 3), (6, 36), (6, 5)]
    assert group_layers(list(net))[2] is net[6]  # a list and an nn.ModuleList work too
    assert len(group_layers(nn.ModuleList(net))) == 3


def test_nested_sequentials_are_one_layer_each_and_parameter_free_ones_join():
    block = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    tail = nn.Sequential(nn.ReLU(), nn.Dropout(0.0))  # no parameters: joins the layer before
    two_modules = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5))  # one layer, as a whole
    groups = group_layers(nn.Sequential(block, tail, two_modules, nn.Linear(5, 2)))
    assert len(groups) == 3
    assert groups[0][0] is block and groups[0][1] is tail
    assert groups[1] is two_modules


def test_frozen_modules_join_the_layer_before_and_frozen_parameters_are_not_phi():
    generator = torch.Generator().manual_seed(3)
    first, frozen, last = (nn.Linear(4, 4, dtype=F64) for _ in range(3))
    frozen.requires_grad_(False)
    last.bias.requires_grad_(False)  # partly frozen: still a layer, φ = its weight
    net = nn.Sequential(first, nn.Tanh(), frozen, nn.Tanh(), last)
    groups = group_layers(net)
    assert len(groups) == 2 and groups[0][2] is frozen and groups[1] is last
    x = torch.randn(5, 4, dtype=F64, generator=generator)
    targets = [torch.randn(5, 4, dtype=F64, generator=generator) for _ in range(2)]
    report = alignment_report(net, x, targets)
    assert report["num_params"].tolist() == [20.0, 16.0]
    assert_reports_close(report, alignment_report_naive(net, x, targets))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ([nn.ReLU(), nn.Linear(4, 4)], ValueError, r"layers\[0\] \(ReLU\).*join"),
        ([nn.Flatten(), nn.Linear(4, 4)], ValueError, r"Apply it to x before measuring"),
        ([nn.Linear(4, 4), "relu"], TypeError, r"layers\[1\] must be an nn\.Module"),
        ([], ValueError, "at least one layer"),
        (nn.Linear(4, 4), TypeError, r"single Linear.*nn\.Sequential of \(layer, activation\)"),
        (nn.Transformer, TypeError, "sequence of nn.Module"),
    ],
)
def test_stacks_that_cannot_be_grouped_say_how_to_fix_them(layers, error, message):
    with pytest.raises(error, match=message):
        group_layers(layers)


def test_a_custom_module_is_rejected_with_the_fix_in_the_message():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(TypeError, match=r"wrap the network as nn\.Sequential of \(layer, act"):
        alignment_report(Net(), torch.randn(2, 4), [torch.randn(2, 4)])


def test_layer_activation_is_the_parameter_free_tail():
    net = conv_net()
    groups = group_layers(net)
    body, h = layer_activation(groups[0])
    assert body[0] is net[0] and [type(m) for m in h] == [nn.ReLU, nn.MaxPool2d]
    body, h = layer_activation(groups[2])
    assert body is net[6] and isinstance(h, nn.Identity)


# --------------------------------------------------------------------------- measurements


@pytest.mark.parametrize("method", ["auto", "generic"])
def test_conv_net_fast_sweep_equals_the_naive_oracle(method):
    net, x = conv_net(), images()
    for mode in ("iid", "uncentered", "teacher"):
        targets = make_targets(net, x, mode, seed=2)
        got = alignment_report(net, x, targets, method=method)
        assert_reports_close(got, alignment_report_naive(net, x, targets))
    parts = decomposition(net, x, targets, method=method)
    want = decomposition_naive(net, x, targets)
    for key in want:
        assert_close_nan(parts[key], want[key])


def flat_mlp() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Linear(5, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Dropout(0.5),  # eval mode: the identity; not elementwise-known, so a vjp path
        nn.Linear(6, 6),
        KWinnersTakeAll(k=3, temperature=0.5),  # the closed-form soft top-k part
        nn.Linear(6, 4),
        nn.Softmax(dim=-1),  # not elementwise: the activation-vjp part of the dense path
        nn.Linear(4, 8),
        nn.Unflatten(1, (2, 4)),  # changes the shape: the generic path
        nn.Linear(4, 3),  # a 3-d input, on the dense path
        nn.GELU(),
    ).to(F64)


def test_flat_mlp_takes_the_dense_path_and_equals_the_naive_oracle():
    net = flat_mlp().eval()
    groups = group_layers(net)
    assert len(groups) == 6
    assert [_dense_parts(g) is not None for g in groups] == [True] * 6
    x = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(5))
    targets = make_targets(net, x, "uncentered", seed=1)
    want = alignment_report_naive(net, x, targets)
    for method in ("auto", "generic"):
        assert_reports_close(alignment_report(net, x, targets, method=method), want)
    with pytest.raises(ValueError, match="method='dense' needs layers of the form"):
        alignment_report(net, x, targets, method="dense")
    dense_only = net[:9]  # the first four layers are all h(W a + b)
    assert_reports_close(
        alignment_report(dense_only, x, targets[:4], method="dense"),
        alignment_report_naive(dense_only, x, targets[:4]),
    )


# --------------------------------------------------------------------------- targets


def test_uncentered_conv_targets_are_the_tail_applied_to_a_seeded_draw():
    net, x = conv_net(), images()
    targets = make_targets(net, x, "uncentered", scale=2.0, seed=9)
    states = forward_states(group_layers(net), x)
    assert [t.shape for t in targets] == [s.shape for s in states]
    generator = torch.Generator().manual_seed(9)
    draw = 2.0 * torch.randn((6, 3, 6, 6), generator=generator, dtype=F64)  # conv 1's output
    torch.testing.assert_close(targets[0], nn.functional.max_pool2d(draw.relu(), 2))
    assert (targets[1] >= 0).all() and (targets[1] == 0).any()  # relu, then flatten
    assert (targets[2] < 0).any()  # the linear output has no tail: centred


def test_teacher_targets_come_from_a_seeded_reinitialised_copy():
    net, x = conv_net(), images()
    before = [p.detach().clone() for p in net.parameters()]
    rng = torch.random.get_rng_state()
    targets = make_targets(net, x, "teacher", seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's RNG is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    teacher = reinitialized_copy(net, 3 + _TEACHER_SEED_OFFSET)
    for t, s in zip(targets, forward_states(teacher, x), strict=True):
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    for p, q in zip(net.parameters(), teacher.parameters(), strict=True):
        assert not torch.equal(p, q)
    again = make_targets(net, x, "teacher", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(targets, again, strict=True))
    other = make_targets(net, x, "teacher", seed=4)
    assert not torch.equal(other[0], targets[0])


def test_teacher_resets_every_submodule_with_reset_parameters():
    # LayerNorm's reset puts weight 1 and bias 0: a moved LayerNorm comes back to them.
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(F64)
    with torch.no_grad():
        net[1].weight.fill_(5.0)
    teacher = reinitialized_copy(net, 0)
    assert torch.equal(teacher[1].weight, torch.ones(4, dtype=F64))
    assert net[1].weight[0].item() == 5.0


# --------------------------------------------------------------------------- training


def test_local_training_of_a_conv_net_gives_each_layer_its_own_gradient():
    net, x = conv_net(), images(12)
    targets = make_targets(net, x, "teacher", seed=0)
    groups = group_layers(net)
    layerwise_losses(net, x, targets, "local").sum().backward()
    for i, layer in enumerate(groups):
        with torch.no_grad():
            below = groups[:i](x) if i else x
        loss = ((layer(below) - targets[i]) ** 2).flatten(1).sum(1).mean()
        for p, g in zip(
            layer.parameters(), torch.autograd.grad(loss, list(layer.parameters())), strict=True
        ):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


def test_train_accepts_a_flat_conv_stack_and_lowers_the_loss():
    net, x = conv_net(), images(24)
    targets = make_targets(net, x, "teacher", seed=0)
    for mode in ("local", "global"):
        history = train(
            copy_network(net), x, targets, mode, steps=20, lr=0.01, batch_size=8, eval_every=20
        )
        assert len(history["layer_loss"][0]) == 3
        assert len(history["local_global_cosine"][0]) == 3
        assert history["total_loss"][-1] < 0.9 * history["total_loss"][0], mode
    with pytest.raises(ValueError, match="3 layers but 2 targets"):
        train(net, x, targets[:2], "local", steps=1, lr=0.01, batch_size=8)


def test_every_report_key_is_float64_on_the_cpu_for_a_conv_net():
    net, x = conv_net(), images()
    report = alignment_report(net, x, make_targets(net, x, "iid"))
    assert set(report) == set(REPORT_KEYS)
    assert all(v.dtype == F64 and v.device.type == "cpu" for v in report.values())
    assert not math.isnan(report["matrix"][0, 2].item())


def conv_zoo() -> list[tuple[nn.Sequential, tuple[int, ...], list[bool]]]:
    """Convolution stacks, their input shape, and which layers take the convolution path."""
    torch.manual_seed(6)
    return [
        (  # stride, dilation, no bias, a tail that is not elementwise
            nn.Sequential(
                nn.Conv2d(2, 3, 3, stride=2, padding=2, bias=False),
                nn.AvgPool2d(2),
                nn.Conv2d(3, 4, 2, dilation=2, padding=1),
                nn.LeakyReLU(0.1),
            ),
            (2, 9, 9),
            [True, True],
        ),
        (  # 1-d and the convolutions the path leaves to the generic one
            nn.Sequential(
                nn.Conv1d(2, 4, 3),
                nn.Tanh(),
                nn.Conv1d(4, 4, 3, groups=2),  # groups > 1
                nn.Conv1d(4, 3, 3, padding="same"),  # padding by name
                nn.Softplus(),
                nn.Conv1d(3, 2, 3, padding=1, padding_mode="circular"),
            ),
            (2, 10),
            [True, False, False, False],
        ),
        (
            nn.Sequential(nn.Conv3d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(54, 3)),
            (1, 4, 4, 4),
            [True, False],
        ),
    ]


@pytest.mark.parametrize("index", range(3))
def test_convolution_path_equals_the_naive_oracle(index):
    from gradkit.align.measure import _conv_parts

    net, shape, expected_path = conv_zoo()[index]
    net = net.to(F64)
    x = torch.randn(4, *shape, dtype=F64, generator=torch.Generator().manual_seed(index))
    groups = group_layers(net)
    states = forward_states(groups, x)
    inputs = [x, *states[:-1]]
    assert [_conv_parts(g, a) is not None for g, a in zip(groups, inputs, strict=True)] == (
        expected_path
    )
    targets = make_targets(net, x, "uncentered", seed=index)
    want = alignment_report_naive(net, x, targets)
    for method in ("auto", "generic"):
        assert_reports_close(alignment_report(net, x, targets, method=method), want)
    parts, want_parts = decomposition(net, x, targets), decomposition_naive(net, x, targets)
    for key in want_parts:
        assert_close_nan(parts[key], want_parts[key])
