"""Local versus global training: one step against explicit per-layer autograd, equal footing."""

from __future__ import annotations

import copy

import pytest
import torch

from gradkit.align.networks import make_mlp
from gradkit.align.targets import make_targets
from gradkit.align.training import (
    TRAIN_MODES,
    checkpoint_steps,
    copy_network,
    layerwise_losses,
    minibatch_indices,
    train,
)

SAMPLES, BATCH, LR, MOMENTUM = 12, 4, 0.05, 0.9


def tiny_problem(activation: str = "tanh", seed: int = 0):
    net = make_mlp(3, 5, activation, bias=True, in_features=4, out_features=3, seed=seed, gain=1.3)
    with torch.no_grad():  # non-zero biases so their gradients are exercised too
        for layer in net:
            layer.linear.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(SAMPLES, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    targets = make_targets(net, x, "iid", seed=seed)
    return net, x, targets


def per_example_loss(state: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ = (1/B) Σ_b ‖s_b − s_b*‖², written out independently of the module under test."""
    return ((state - target) ** 2).sum(dim=1).mean()


def reference_local_gradients(net, x, targets) -> list[list[torch.Tensor]]:
    """For each layer i separately: autograd of ℓ_i w.r.t. φ_i, everything else held fixed."""
    grads = []
    for i, layer in enumerate(net):
        with torch.no_grad():
            below = x
            for earlier in net[:i]:
                below = earlier(below)
        loss_i = per_example_loss(layer(below), targets[i])
        grads.append(list(torch.autograd.grad(loss_i, list(layer.parameters()))))
    return grads


def reference_global_gradients(net, x, targets) -> list[list[torch.Tensor]]:
    """Autograd of Σ_j ℓ_j w.r.t. every φ_i in one graph."""
    state, total = x, 0.0
    for layer, target in zip(net, targets, strict=True):
        state = layer(state)
        total = total + per_example_loss(state, target)
    flat = torch.autograd.grad(total, list(net.parameters()))
    grads, k = [], 0
    for layer in net:
        n = len(list(layer.parameters()))
        grads.append(list(flat[k : k + n]))
        k += n
    return grads


def reference_sgd(net, x, targets, mode: str, steps: int, seed: int):
    """Momentum SGD written out by hand: v ← μ v + g, φ ← φ − lr·v, on the same minibatches."""
    net = copy.deepcopy(net)
    batches = minibatch_indices(SAMPLES, BATCH, steps, seed)
    velocity = [torch.zeros_like(p) for p in net.parameters()]
    for index in batches:
        reference = reference_local_gradients if mode == "local" else reference_global_gradients
        grads = [
            g for layer in reference(net, x[index], [t[index] for t in targets]) for g in layer
        ]
        with torch.no_grad():
            for p, v, g in zip(net.parameters(), velocity, grads, strict=True):
                v.mul_(MOMENTUM).add_(g)
                p.sub_(LR * v)
    return net


def trained(net, x, targets, mode: str, steps: int, seed: int = 3):
    net = copy_network(net)
    history = train(
        net, x, targets, mode, steps=steps, lr=LR, momentum=MOMENTUM, batch_size=BATCH,
        eval_every=1, seed=seed, measure_alignment=False,
    )  # fmt: skip
    return net, history


@pytest.mark.parametrize("mode", TRAIN_MODES)
@pytest.mark.parametrize("steps", [1, 3])
def test_training_steps_match_explicit_per_layer_autograd(mode, steps):
    net, x, targets = tiny_problem()
    got, _ = trained(net, x, targets, mode, steps)
    want = reference_sgd(net, x, targets, mode, steps, seed=3)
    for p_got, p_want, p_start in zip(
        got.parameters(), want.parameters(), net.parameters(), strict=True
    ):
        assert not torch.equal(p_got, p_start), "the step must move every parameter"
        torch.testing.assert_close(p_got, p_want, rtol=1e-10, atol=1e-12)


def test_local_and_global_steps_differ_below_the_last_layer():
    # The comparison above can only fail if the two modes really differ: they must disagree
    # on every layer with a distant loss, and agree on the last layer (no distant loss).
    net, x, targets = tiny_problem()
    local, _ = trained(net, x, targets, "local", 1)
    global_, _ = trained(net, x, targets, "global", 1)
    for i, (a, b) in enumerate(zip(local, global_, strict=True)):
        same = torch.allclose(a.linear.weight, b.linear.weight, rtol=1e-12, atol=0)
        assert same == (i == len(net) - 1), f"layer {i + 1}"


def test_local_gradient_is_per_layer_gradient_in_one_backward():
    net, x, targets = tiny_problem("relu")
    losses = layerwise_losses(net, x, targets, "local")
    losses.sum().backward()
    for layer, want in zip(net, reference_local_gradients(net, x, targets), strict=True):
        for p, g in zip(layer.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    # The loss values do not depend on the mode, only their gradient does.
    torch.testing.assert_close(losses, layerwise_losses(net, x, targets, "global"))


def test_both_modes_see_the_same_minibatches_in_the_same_order():
    net, x, targets = tiny_problem()
    seen: dict[str, list[torch.Tensor]] = {}
    for mode in TRAIN_MODES:
        copy_ = copy_network(net)
        rows: list[torch.Tensor] = []
        # Record every update's input (evaluations see all SAMPLES rows, updates BATCH rows).
        copy_[0].register_forward_hook(
            lambda _m, inputs, _o, rows=rows: (
                rows.append(inputs[0].detach().clone()) if inputs[0].shape[0] == BATCH else None
            )
        )
        train(
            copy_, x, targets, mode, steps=7, lr=LR, batch_size=BATCH, eval_every=100, seed=5,
            measure_alignment=False,
        )  # fmt: skip
        seen[mode] = rows
    assert len(seen["local"]) == 7
    for a, b in zip(seen["local"], seen["global"], strict=True):
        assert torch.equal(a, b)


def test_minibatch_indices_are_epochs_of_permutations_fixed_by_seed():
    batches = minibatch_indices(10, 3, 7, seed=1)
    assert batches.shape == (7, 3)
    # 10 // 3 = 3 batches per epoch: each epoch's 9 indices are distinct.
    for epoch in batches.split(3):
        assert len(set(epoch.flatten().tolist())) == epoch.numel()
    assert torch.equal(batches, minibatch_indices(10, 3, 7, seed=1))
    assert not torch.equal(batches, minibatch_indices(10, 3, 7, seed=2))


def test_history_records_checkpoints_losses_and_alignment():
    net, x, targets = tiny_problem()
    _, history = trained(net, x, targets, "global", 0)  # no steps: only the start is recorded
    assert history["step"] == [0]
    copy_ = copy_network(net)
    history = train(copy_, x, targets, "local", steps=10, lr=LR, batch_size=BATCH, eval_every=4)
    assert history["step"] == [0, 4, 8, 10] == checkpoint_steps(10, 4)
    with torch.no_grad():
        final = layerwise_losses(copy_, x, targets)
    torch.testing.assert_close(torch.tensor(history["layer_loss"][-1], dtype=final.dtype), final)
    assert history["total_loss"][-1] == pytest.approx(final.sum().item())
    cosines = torch.tensor(history["local_global_cosine"], dtype=torch.float64)
    assert cosines.shape == (4, len(net))
    # The last layer has no distant loss: its local gradient IS its global gradient.
    torch.testing.assert_close(cosines[:, -1], torch.ones(4, dtype=torch.float64))
    assert (cosines.abs() <= 1 + 1e-9).all()


def test_training_lowers_the_loss_in_both_modes_float32():
    net = make_mlp(3, 16, "centered_leaky_clip", gain=1.6, seed=0, dtype=torch.float32)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    targets = make_targets(net, x, "teacher", seed=0)
    for mode in TRAIN_MODES:
        history = train(
            copy_network(net), x, targets, mode, steps=60, lr=0.01, batch_size=16,
            eval_every=60, measure_alignment=False,
        )  # fmt: skip
        assert history["total_loss"][-1] < 0.8 * history["total_loss"][0], mode


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="both"), "mode must be one of local, global"),
        (dict(lr=0.0), "lr must be"),
        (dict(momentum=1.0), "momentum must be"),
        (dict(batch_size=99), "batch_size must be"),
        (dict(eval_every=0), "eval_every must be"),
        (dict(steps=-1), "steps must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    net, x, targets = tiny_problem()
    settings = dict(mode="local", steps=2, lr=LR, batch_size=BATCH, eval_every=1)
    settings.update(kwargs)
    mode = settings.pop("mode")
    with pytest.raises(ValueError, match=message):
        train(net, x, targets, mode, **settings)
    with pytest.raises(ValueError, match="mode must be one of"):
        layerwise_losses(net, x, targets, "distant")
