"""The lab on any device: every result equals the CPU float64 one (CUDA where present).

Each test builds its problem on the CPU, moves it to ``device``, measures there and compares
with the CPU measurement. On ``cpu`` the move is a copy (a round trip through ``.to``) and the
results must be identical; on ``cuda`` they must agree to float64 rounding (other reduction
orders), and the draws (weights, targets, minibatches) must be identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradkit.align import (
    alignment_report,
    decomposition,
    make_mlp,
    make_targets,
    train,
)
from gradkit.align.networks import reinitialized_copy

F64 = torch.float64
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device on this machine"
        ),
    ),
]


def moved(device: str, net: nn.Module, *tensors: torch.Tensor):
    """A copy of ``net`` and of ``tensors`` (or lists of them) on ``device``."""

    def to(t):
        return [to(u) for u in t] if isinstance(t, list) else t.to(device, copy=True)

    return (copy.deepcopy(net).to(device), *[to(t) for t in tensors])


def assert_same(got: dict, want: dict, device: str) -> None:
    for key, value in want.items():
        assert got[key].device.type == "cpu" and got[key].dtype == F64, key
        if device == "cpu":
            assert torch.equal(got[key].isnan(), value.isnan()), key
            assert torch.equal(got[key].nan_to_num(0), value.nan_to_num(0)), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12, equal_nan=True)


def mlp_problem(activation: str, bias: bool, batch: int):
    net = make_mlp(3, 6, activation, bias=bias, seed=2, in_features=5)
    x = torch.randn(batch, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    return net, x, make_targets(net, x, "uncentered", seed=4)


def conv_problem():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 4)
    ).to(F64)
    x = torch.randn(5, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    return net, x, make_targets(net, x, "iid", seed=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("activation", "bias", "batch"),
    [("relu", True, 4), ("kwta", False, 9), ("tanh", True, 9)],  # both Gram factorisations
)
def test_mlp_measurements_match_the_cpu(device, activation, bias, batch):
    net, x, targets = mlp_problem(activation, bias, batch)
    want_report, want_parts = alignment_report(net, x, targets), decomposition(net, x, targets)
    net_d, x_d, targets_d = moved(device, net, x, targets)
    assert_same(alignment_report(net_d, x_d, targets_d), want_report, device)
    assert_same(decomposition(net_d, x_d, targets_d), want_parts, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["auto", "generic"])
def test_conv_measurements_match_the_cpu(device, method):
    net, x, targets = conv_problem()
    want = alignment_report(net, x, targets, method=method)
    net_d, x_d, targets_d = moved(device, net, x, targets)
    assert_same(alignment_report(net_d, x_d, targets_d, method=method), want, device)


@pytest.mark.parametrize("device", DEVICES)
def test_networks_and_targets_are_drawn_identically_on_every_device(device):
    cpu = make_mlp(2, 5, "relu", seed=7)
    there = make_mlp(2, 5, "relu", seed=7, device=device)
    for p, q in zip(cpu.parameters(), there.parameters(), strict=True):
        assert q.device.type == device and torch.equal(p, q.cpu())
    x = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    for mode in ("iid", "uncentered", "teacher"):
        want = make_targets(cpu, x, mode, seed=1)
        got = make_targets(there, x.to(device), mode, seed=1)
        for t, u in zip(want, got, strict=True):
            assert u.device.type == device
            if mode == "teacher" and device != "cpu":  # a forward pass on the device
                torch.testing.assert_close(u.cpu(), t, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(u.cpu(), t), mode
    net, _, _ = conv_problem()
    teacher = reinitialized_copy(copy.deepcopy(net).to(device), 5)
    for p, q in zip(reinitialized_copy(net, 5).parameters(), teacher.parameters(), strict=True):
        assert q.device.type == device and torch.equal(p, q.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_training_history_matches_the_cpu(device):
    net = make_mlp(3, 6, "tanh", seed=1, in_features=4)
    x = torch.randn(12, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    targets = make_targets(net, x, "teacher", seed=3)
    settings = dict(steps=6, lr=0.05, batch_size=4, eval_every=3)
    want = train(copy.deepcopy(net), x, targets, "local", **settings)
    net_d, x_d, targets_d = moved(device, net, x, targets)
    got = train(net_d, x_d, targets_d, "local", **settings)
    assert got["step"] == want["step"]
    for key in ("total_loss", "layer_loss", "local_global_cosine"):
        expected = torch.tensor(want[key], dtype=F64)
        actual = torch.tensor(got[key], dtype=F64)
        if device == "cpu":
            assert torch.equal(actual.nan_to_num(0), expected.nan_to_num(0)), key
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_tensors_on_another_device_than_the_network_are_named():
    net, x, targets = mlp_problem("relu", False, 4)
    with pytest.raises(ValueError, match=r"x is on meta but layers\[0\]'s parameters are on cpu"):
        alignment_report(net, x.to("meta"), targets)
    with pytest.raises(ValueError, match=r"targets\[1\] is on meta"):
        alignment_report(net, x, [targets[0], targets[1].to("meta"), targets[2]])
