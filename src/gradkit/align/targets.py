"""Layerwise targets ``s_i*`` for the alignment lab, and the losses ``ℓ_i = ‖s_i − s_i*‖²``.

Three ways to draw targets (:data:`TARGET_MODES`), for any stack of modules (grouped into
layers by :func:`~gradkit.align.networks.group_layers`):

* ``iid`` — centred Gaussian states ``scale · N(0, I)``, independent of the network: the
  gist's "randomly generated points".
* ``uncentered`` — ``h(scale · N(0, I))`` with each layer's own parameter-free tail ``h``
  (:func:`~gradkit.align.networks.layer_activation`: a ``DenseLayer``'s activation, or the
  ReLU/pooling/Flatten grouped after a ``Conv2d``), the draw shaped like the pre-activation:
  the same kind of marginals as real states (e.g. non-negative after relu), still unreachable.
* ``teacher`` — the states of a re-initialised copy of the network
  (:func:`~gradkit.align.networks.reinitialized_copy`: ``reset_parameters()`` on every
  submodule that has one, seeded) on the same inputs: targets that some setting of the
  weights reaches exactly.

Every draw comes from a seeded CPU generator and is then moved to the network's device, so
the targets are the same on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import _checks
from .networks import forward_states, group_layers, layer_activation, reinitialized_copy

__all__ = ["TARGET_MODES", "layer_losses", "make_targets"]

TARGET_MODES = ("iid", "uncentered", "teacher")

# Offset of the teacher's seed, so the teacher is never the student when both use `seed`.
_TEACHER_SEED_OFFSET = 1_000_003


def _draw(shape: torch.Size, scale: float, generator: torch.Generator, like: torch.Tensor):
    draw = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    return draw.to(dtype=like.dtype, device=like.device)


@torch.no_grad()
def _uncentered(layers: nn.Sequential, x: torch.Tensor, scale: float, seed: int) -> list:
    generator = torch.Generator().manual_seed(int(seed))
    targets, s = [], x
    for layer in layers:
        body, activation = layer_activation(layer)
        z = body(s)
        targets.append(activation(_draw(z.shape, scale, generator, z)))
        s = activation(z)
    return targets


@torch.no_grad()
def make_targets(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    mode: str = "iid",
    *,
    scale: float = 1.0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Targets ``[s_1*, …, s_L*]`` shaped like the states of ``layers`` on ``x``.

    Args:
        layers: the network, any stack of modules (grouped by
            :func:`~gradkit.align.networks.group_layers`: one target per group).
        x: the inputs ``s_0`` (on the network's device).
        mode: one of :data:`TARGET_MODES`.
        scale: standard deviation of the Gaussian draws for ``iid`` and ``uncentered``;
            ignored by ``teacher``.
        seed: seed of the draws (and of the teacher's weights).

    Returns:
        Detached tensors with the states' shapes, dtype and device; the same numbers on
        every device for the same seed.

    Raises:
        TypeError: ``teacher`` for a network with a trainable parameter that no module can
            re-initialise (no ``reset_parameters()``).
    """
    mode = _checks.choice("target mode", TARGET_MODES)(mode)
    scale = _checks.number("target scale", above=0)(scale)
    seed = _checks.integer("seed")(seed)
    layers = group_layers(layers)
    if mode == "teacher":
        teacher = reinitialized_copy(layers, seed + _TEACHER_SEED_OFFSET)
        return [s.detach() for s in forward_states(teacher, x)]
    if mode == "uncentered":
        return _uncentered(layers, x, scale, seed)
    generator = torch.Generator().manual_seed(int(seed))
    return [_draw(s.shape, scale, generator, s) for s in forward_states(layers, x)]


def layer_losses(states: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[ℓ_1, …, ℓ_L]`` with ``ℓ_i = ‖s_i − s_i*‖²`` summed over batch and units."""
    if len(states) != len(targets):
        raise ValueError(f"got {len(states)} states but {len(targets)} targets")
    return torch.stack([(s - t).pow(2).sum() for s, t in zip(states, targets, strict=True)])
