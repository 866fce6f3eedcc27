"""Layerwise targets ``s_i*`` for the alignment lab, and the losses ``ℓ_i = ‖s_i − s_i*‖²``.

Three ways to draw targets (:data:`TARGET_MODES`):

* ``iid`` — centred Gaussian states ``scale · N(0, I)``, independent of the network: the
  gist's "randomly generated points".
* ``uncentered`` — ``h(scale · N(0, I))`` with each layer's own activation ``h``: the same kind
  of marginals as real states (e.g. non-negative after relu), still unreachable.
* ``teacher`` — the states of a second, independently initialised network of the same
  architecture on the same inputs: targets that some setting of the weights reaches exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .networks import DenseLayer, forward_states, reinitialize

__all__ = ["TARGET_MODES", "layer_losses", "make_targets"]

TARGET_MODES = ("iid", "uncentered", "teacher")


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
        layers: the network (its shapes and, for ``uncentered``/``teacher``, its layer kinds).
        x: the inputs ``s_0``, shape ``(batch, in_features)``.
        mode: one of :data:`TARGET_MODES`.
        scale: standard deviation of the Gaussian draws for ``iid`` and ``uncentered``;
            ignored by ``teacher``.
        seed: seed of the draws (and of the teacher's weights).
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"target mode must be one of {', '.join(TARGET_MODES)}; got {mode!r}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"target scale must be a number > 0, got {scale!r}")
    states = forward_states(layers, x)
    if mode == "teacher":
        teacher = copy.deepcopy(nn.Sequential(*layers))
        if not any(isinstance(layer, DenseLayer) for layer in teacher):
            raise TypeError("teacher targets need layers with reset_parameters (DenseLayer)")
        # Offset the seed so the teacher is never the student itself when both use `seed`.
        reinitialize(teacher, seed + 1_000_003)
        return [s.detach() for s in forward_states(teacher, x)]
    generator = torch.Generator().manual_seed(int(seed))
    targets = []
    for layer, s in zip(layers, states, strict=True):
        draw = scale * torch.randn(s.shape, generator=generator, dtype=torch.float64)
        draw = draw.to(dtype=s.dtype, device=s.device)
        if mode == "uncentered":
            activation = getattr(layer, "activation", None)
            if activation is None:
                raise TypeError("uncentered targets need layers with an .activation (DenseLayer)")
            draw = activation(draw)
        targets.append(draw)
    return targets


def layer_losses(states: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[ℓ_1, …, ℓ_L]`` with ``ℓ_i = ‖s_i − s_i*‖²`` summed over batch and units."""
    if len(states) != len(targets):
        raise ValueError(f"got {len(states)} states but {len(targets)} targets")
    return torch.stack([(s - t).pow(2).sum() for s, t in zip(states, targets, strict=True)])
