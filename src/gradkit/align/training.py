"""Training with layerwise targets: follow the global gradient, or only the local ones.

A network ``s_i = h(s_{i-1}, φ_i)`` (``s_0 = x``) is given targets ``s_1*, …, s_L*`` and
trained on the layerwise losses ``ℓ_i``. Two training modes (:data:`TRAIN_MODES`):

* ``global`` — every parameter follows ``∂(Σ_j ℓ_j)/∂φ_i = ∂ℓ_i/∂φ_i + Σ_{j>i} ∂ℓ_j/∂φ_i``:
  ordinary backprop of the summed loss.
* ``local`` — layer ``i`` follows only its own ``∂ℓ_i/∂φ_i``. This is computed in ONE backward
  pass: layer ``i`` is fed ``s_{i-1}`` *detached*, so no gradient crosses a layer boundary and the
  backward of ``Σ_j ℓ_j`` delivers exactly ``∂ℓ_i/∂φ_i`` to ``φ_i``. The forward values are the
  same as in ``global`` mode; only the gradient differs.

Loss convention of training (and of every loss this module reports)::

    ℓ_i = (1/B) Σ_b ‖s_{i,b} − s*_{i,b}‖²        (sum over units, mean over the B examples)

i.e. the gist's ``‖s_i − s_i*‖²`` per example, averaged over the minibatch. The gist's
batch-summed loss is ``B·ℓ_i``: the same gradient directions (so every cosine is unchanged) but a
step that grows with the batch. Measured on the ``achievable``/``unachievable`` presets (depth 8,
width 200, momentum SGD 0.9, minibatch 100, seed 0):

* batch-summed loss, lr 0.01 (a 100× larger step): global training is NaN by step 30; local
  crawls (533 → 483 in 300 steps);
* this per-example mean, lr 0.01: local trains steadily (achievable: 533 → 0.004 in 10k steps)
  while global is past its stability edge (achievable: noisy plateau near 100; unachievable:
  the total loss grows); lr 0.001 trains both;
* a mean over units as well (``F.mse_loss``), lr 0.01: another 200× smaller step; the
  achievable local loss only goes from 533 to 472 in 2000 steps.

Everything else is held equal between the modes: :func:`train` takes the initial weights as
given (so callers copy one network for both), draws the minibatch order from ``seed`` alone
(:func:`minibatch_indices`) and uses the same optimizer — the gradient is the only difference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import _checks
from .networks import group_layers
from .targets import layer_losses

__all__ = [
    "TRAIN_MODES",
    "check_mode",
    "checkpoint_steps",
    "copy_network",
    "evaluate_losses",
    "layerwise_losses",
    "minibatch_indices",
    "train",
    "train_step",
]

TRAIN_MODES = ("local", "global")


def check_mode(mode: str) -> None:
    """A ``ValueError`` naming :data:`TRAIN_MODES` unless ``mode`` is one of them."""
    _checks.choice("mode", TRAIN_MODES)(mode)


def layerwise_losses(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    targets: Sequence[torch.Tensor],
    mode: str = "global",
) -> torch.Tensor:
    """``[ℓ_1, …, ℓ_L]``, ``ℓ_i = (1/B) Σ_b ‖s_{i,b} − s*_{i,b}‖²``, wired for ``mode``'s gradient.

    In ``local`` mode layer ``i`` sees ``s_{i-1}.detach()``, so ``backward(Σ ℓ_i)`` gives each
    ``φ_i`` exactly ``∂ℓ_i/∂φ_i``; in ``global`` mode the states stay connected and it gives
    ``∂(Σ_j ℓ_j)/∂φ_i``. The returned values are the same in both modes.
    """
    check_mode(mode)
    layers = group_layers(layers)
    if len(layers) != len(targets):
        raise ValueError(
            f"got {len(layers)} layers but {len(targets)} targets (parameter-free modules "
            "join the layer before them: see gradkit.align.group_layers)"
        )
    states, state = [], x
    for layer in layers:
        state = layer(state.detach() if mode == "local" else state)
        states.append(state)
    # The lab's ‖s_i − s_i*‖² (summed over batch and units), averaged over the examples.
    return layer_losses(states, targets) / x.shape[0]


@torch.no_grad()
def evaluate_losses(
    layers: Sequence[nn.Module], x: torch.Tensor, targets: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The layerwise losses ``[ℓ_1, …, ℓ_L]`` on ``(x, targets)`` without building a graph."""
    return layerwise_losses(layers, x, targets, "global")


def train_step(
    layers: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    targets: Sequence[torch.Tensor],
    mode: str,
) -> torch.Tensor:
    """One update on the minibatch ``(x, targets)``: one forward, one backward, one step.

    Returns the minibatch's layerwise losses before the update (detached).
    """
    losses = layerwise_losses(layers, x, targets, mode)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


def minibatch_indices(samples: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """Example indices of every minibatch, shape ``(steps, batch_size)``; a function of ``seed``.

    Epochs are fresh permutations of ``range(samples)`` cut into ``samples // batch_size``
    minibatches (a remainder smaller than a batch is skipped that epoch), so every example is
    seen once per epoch. Both training modes call this with the same seed, hence see the same
    minibatches in the same order.
    """
    _checks.integer("batch_size", 1, samples)(batch_size)
    _checks.integer("steps", 0)(steps)
    per_epoch = samples // batch_size
    epochs = -(-steps // per_epoch) if steps else 0
    generator = torch.Generator().manual_seed(int(seed))
    order = [torch.randperm(samples, generator=generator) for _ in range(epochs)]
    if not order:
        return torch.empty(0, batch_size, dtype=torch.long)
    batches = torch.stack(order)[:, : per_epoch * batch_size].reshape(-1, batch_size)
    return batches[:steps]


def checkpoint_steps(steps: int, eval_every: int) -> list[int]:
    """Steps at which training is evaluated: ``0, eval_every, 2·eval_every, …`` and ``steps``."""
    _checks.integer("eval_every", 1)(eval_every)
    marks = list(range(0, steps + 1, eval_every))
    if marks[-1] != steps:
        marks.append(steps)
    return marks


def _alignment(layers: Sequence[nn.Module], x: torch.Tensor, targets: Sequence[torch.Tensor]):
    from . import measure  # the lab's one implementation of the cosines

    report = measure.alignment_report(layers, x, targets)
    return {key: report[key].tolist() for key in ("local_global_cosine", "local_distant_cosine")}


def train(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    targets: Sequence[torch.Tensor],
    mode: str,
    *,
    steps: int,
    lr: float,
    momentum: float = 0.9,
    batch_size: int = 100,
    eval_every: int = 100,
    seed: int = 0,
    measure_alignment: bool = True,
    metrics: Callable[[nn.Sequential], dict[str, float]] | None = None,
) -> dict[str, list]:
    """Train ``layers`` in place on layerwise targets with momentum SGD; return the history.

    Args:
        layers: the network, any stack of modules (grouped into layers by
            :func:`~gradkit.align.networks.group_layers`); it is updated in place (only its
            trainable parameters). Copy it first to train both modes from the same initial
            weights (as :mod:`.train_experiment` does).
        x: all inputs ``s_0``, ``samples`` rows, on the network's device.
        targets: ``[s_1*, …, s_L*]``, each with ``samples`` rows.
        mode: ``"local"`` or ``"global"`` (:data:`TRAIN_MODES`).
        steps: number of updates.
        lr, momentum: ``torch.optim.SGD`` settings (``v ← μ v + g``, ``φ ← φ − lr·v``).
        batch_size: examples per update, drawn by :func:`minibatch_indices` from ``seed``.
        eval_every: checkpoint spacing in steps; checkpoints (:func:`checkpoint_steps`) evaluate
            the full data set without updating.
        seed: seed of the minibatch order only (weights are whatever ``layers`` holds).
        measure_alignment: also record ``cos(∂ℓ_i/∂φ_i, ∂L/∂φ_i)`` per layer at each checkpoint
            (via :func:`gradkit.align.measure.alignment_report`, full batch).
        metrics: optional ``metrics(layers) -> {name: value}`` recorded at each checkpoint
            (e.g. test accuracy), called with ``layers`` as given.

    Returns:
        ``{"step": [..], "layer_loss": [[ℓ_1..ℓ_L], ..], "total_loss": [..]}`` with one entry
        per checkpoint, plus ``"local_global_cosine"``/``"local_distant_cosine"`` (one list of
        ``L`` per checkpoint) when measured, and one list per ``metrics`` key.
    """
    check_mode(mode)
    lr = _checks.number("lr", above=0)(lr)
    momentum = _checks.number("momentum", at_least=0, below=1)(momentum)
    network, layers = layers, group_layers(layers)
    if len(layers) != len(targets):
        raise ValueError(f"got {len(layers)} layers but {len(targets)} targets")
    samples = x.shape[0]
    if any(t.shape[0] != samples for t in targets):
        raise ValueError("every target must have as many rows as x")
    batches = minibatch_indices(samples, batch_size, steps, seed).to(x.device)
    checkpoints = set(checkpoint_steps(steps, eval_every))
    trainable = [p for p in layers.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=momentum)
    history: dict[str, list] = {"step": [], "layer_loss": [], "total_loss": []}

    def record(step: int) -> None:
        losses = evaluate_losses(layers, x, targets)
        history["step"].append(step)
        history["layer_loss"].append(losses.tolist())
        history["total_loss"].append(losses.sum().item())
        extra = _alignment(layers, x, targets) if measure_alignment else {}
        extra.update(metrics(network) if metrics is not None else {})
        for key, value in extra.items():
            history.setdefault(key, []).append(value)

    record(0)
    for step in range(1, steps + 1):
        index = batches[step - 1]
        train_step(layers, optimizer, x[index], [t[index] for t in targets], mode)
        if step in checkpoints:
            record(step)
    return history


def copy_network(layers: nn.Sequential) -> nn.Sequential:
    """An independent copy of ``layers`` (same weights), so two modes start identically."""
    return copy.deepcopy(layers)
