"""Layerwise targets from real data: a teacher MLP trained on scikit-learn's digits.

The experiment (:func:`digits_run`):

1. ``load_digits`` (8×8 images, 10 classes; bundled with scikit-learn, no download) is split
   into train/test by a permutation fixed by ``seed``; inputs are standardised with the train
   split's per-pixel mean and standard deviation.
2. A teacher MLP ``64 → width → … → 10`` is trained by ordinary backprop on the labels
   (cross-entropy, Adam).
3. The teacher's hidden states and logits on the train split become the layerwise targets
   ``s_1*, …, s_L*``; fresh students (same architecture, new initial weights) are trained on
   ``ℓ_i = (1/B) Σ_b ‖s_{i,b} − s*_{i,b}‖²`` with the ``local`` and the ``global`` gradient
   (:func:`gradkit.align.training.train`), from the same initial weights and minibatches.
4. Test accuracy of the teacher and of each student (argmax of the last layer).

scikit-learn is an optional extra: ``pip install "gradkit[digits]"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .. import _checks
from .networks import ACTIVATIONS, DenseLayer, default_gain, forward_states, reinitialize
from .training import (
    TRAIN_MODES,
    check_mode,
    copy_network,
    evaluate_losses,
    minibatch_indices,
    train,
)

__all__ = [
    "accuracy",
    "digits_run",
    "load_digits_split",
    "make_classifier",
    "train_teacher",
]

# Offset between the teacher's and the students' weight seeds, so a student never starts as
# the teacher.
_STUDENT_SEED_OFFSET = 7_919


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.25, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` from scikit-learn's bundled digits.

    The split is a random permutation drawn from ``seed``; ``x`` is standardised per pixel with
    the train split's statistics (pixels constant on the train split are only centred).
    """
    if not (isinstance(test_fraction, float) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # optional extra
        raise ImportError(
            'the digits preset needs scikit-learn: pip install "gradkit[digits]"'
        ) from error
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float64)
    y = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    n_test = round(test_fraction * x.shape[0])
    test, train_ = order[:n_test], order[n_test:]
    mean = x[train_].mean(0)
    std = x[train_].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = ((x - mean) / std).to(dtype)
    return x[train_], y[train_], x[test], y[test]


def make_classifier(
    in_features: int,
    width: int,
    classes: int,
    activation: str = "relu",
    *,
    depth: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """An MLP of ``depth`` :class:`DenseLayer` s with biases: ``depth − 1`` hidden layers of
    ``width`` units with ``activation`` and a linear logits layer of ``classes`` units.

    Hidden weights ``~ N(0, gain²/fan_in)`` with the activation's :func:`default_gain`, logits
    weights ``~ N(0, 1/fan_in)``; biases start at zero.
    """
    _checks.choice("activation", ACTIVATIONS)(activation)
    if not (isinstance(depth, int) and depth >= 2):
        raise ValueError(f"depth must be an integer ≥ 2 (hidden layers + logits), got {depth!r}")
    sizes = [in_features] + [width] * (depth - 1)
    gain = default_gain(activation)
    hidden = [
        DenseLayer(sizes[i], sizes[i + 1], activation, gain=gain, bias=True, dtype=dtype)
        for i in range(depth - 1)
    ]
    logits = DenseLayer(width, classes, "linear", gain=1.0, bias=True, dtype=dtype)
    net = nn.Sequential(*hidden, logits)
    reinitialize(net, seed)
    return net


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose argmax logit equals the label."""
    return (net(x).argmax(-1) == y).double().mean().item()


def train_teacher(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 100,
    seed: int = 0,
    label_smoothing: float = 0.1,
) -> nn.Module:
    """Train ``net`` in place by backprop on the cross-entropy of ``(x, y)`` (Adam).

    Label smoothing keeps the logits — the last layer's targets — moderate: without it they
    grow throughout training, and so does the stiffness of the students' regression.
    """
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for index in minibatch_indices(x.shape[0], batch_size, steps, seed):
        loss = nn.functional.cross_entropy(net(x[index]), y[index], label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net


def _checkpoint(net, x_test, y_test, on_checkpoint) -> dict:
    extra = {"checkpoint_test_accuracy": accuracy(net, x_test, y_test)}
    if on_checkpoint is not None:
        extra.update(on_checkpoint(net) or {})
    return extra


def digits_run(
    *,
    activation: str = "relu",
    modes: tuple[str, ...] = TRAIN_MODES,
    seed: int = 0,
    depth: int = 3,
    width: int = 128,
    test_fraction: float = 0.25,
    teacher_steps: int = 1500,
    teacher_lr: float = 1e-3,
    steps: int = 2000,
    lr: float = 0.001,
    momentum: float = 0.9,
    batch_size: int = 100,
    eval_every: int = 250,
    measure_alignment: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    on_checkpoint: Callable[[nn.Module], dict] | None = None,
) -> dict:
    """One seed of the digits experiment for one activation.

    Data and networks are made on the CPU and moved to ``device``; ``on_checkpoint(net)``
    (e.g. a progress line) is called at every checkpoint of every student and may return
    extra metrics to record.

    Returns ``{"teacher": {"test_accuracy", "train_accuracy"}, "history": {mode: history},
    "final": {mode: {"test_accuracy", "train_accuracy", "layer_loss", "total_loss",
    "test_layer_loss"}}}``; each history also records ``checkpoint_test_accuracy``.
    """
    for mode in modes:  # before the teacher's training, not after
        check_mode(mode)
    device = torch.device(device)
    x_train, y_train, x_test, y_test = (
        t.to(device) for t in load_digits_split(seed, test_fraction, dtype)
    )
    classes = int(y_train.max().item()) + 1
    teacher = make_classifier(
        x_train.shape[1], width, classes, activation, depth=depth, seed=seed, dtype=dtype
    ).to(device)
    train_teacher(
        teacher,
        x_train,
        y_train,
        steps=teacher_steps,
        lr=teacher_lr,
        batch_size=batch_size,
        seed=seed,
    )
    with torch.no_grad():
        targets = forward_states(teacher, x_train)
        test_targets = forward_states(teacher, x_test)
    student = make_classifier(
        x_train.shape[1],
        width,
        classes,
        activation,
        depth=depth,
        seed=seed + _STUDENT_SEED_OFFSET,
        dtype=dtype,
    ).to(device)
    result: dict = {
        "teacher": {
            "test_accuracy": accuracy(teacher, x_test, y_test),
            "train_accuracy": accuracy(teacher, x_train, y_train),
        },
        "history": {},
        "final": {},
    }
    for mode in modes:
        net = copy_network(student)  # identical initial weights for every mode
        history = train(
            net,
            x_train,
            targets,
            mode,
            steps=steps,
            lr=lr,
            momentum=momentum,
            batch_size=batch_size,
            eval_every=eval_every,
            seed=seed,
            measure_alignment=measure_alignment,
            metrics=lambda n: _checkpoint(n, x_test, y_test, on_checkpoint),
        )
        test_losses = evaluate_losses(net, x_test, test_targets)
        result["history"][mode] = history
        result["final"][mode] = {
            "test_accuracy": accuracy(net, x_test, y_test),
            "train_accuracy": accuracy(net, x_train, y_train),
            "layer_loss": history["layer_loss"][-1],
            "total_loss": history["total_loss"][-1],
            "test_layer_loss": test_losses.tolist(),
        }
        if not math.isfinite(history["total_loss"][-1]):
            result["final"][mode]["diverged"] = True
    return result
