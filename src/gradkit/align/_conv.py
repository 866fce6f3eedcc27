"""Convolution layers in the one-sweep measurement: ``N`` cotangents in two convolutions.

For ``z = conv(a, W) + b`` and a stack of ``N`` cotangents ``δ_n = ∂ℓ_n/∂z`` (each
``B × C_out × …``), everything the sweep needs is linear in ``δ_n``:

* ``∂ℓ_n/∂W`` is the correlation of ``a`` with ``δ_n`` summed over the batch. Stacking the
  ``N`` cotangents along the output channels (``B × N·C_out × …``) turns the ``N`` weight
  gradients into ONE weight-gradient convolution with ``N·C_out`` output channels;
* ``∂ℓ_n/∂a`` is the transposed convolution of ``δ_n``: folding ``N`` into the batch
  (``N·B × C_out × …``) makes it one call;
* ``∂ℓ_n/∂b`` sums ``δ_n`` over batch and positions.

The batched autograd of the generic path (``vmap`` over the convolution backward) gives the
same numbers. Only ``groups = 1``, numeric padding and ``padding_mode='zeros'``
take this path; any other convolution goes the generic way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["conv_input_cotangents", "conv_param_rows", "is_plain_conv"]

_GRAD = {
    nn.Conv1d: (torch.nn.grad.conv1d_weight, torch.nn.grad.conv1d_input),
    nn.Conv2d: (torch.nn.grad.conv2d_weight, torch.nn.grad.conv2d_input),
    nn.Conv3d: (torch.nn.grad.conv3d_weight, torch.nn.grad.conv3d_input),
}


def is_plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` with ``groups = 1``, numeric zero padding, all parameters
    trainable."""
    return (
        type(module) in _GRAD
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and all(p.requires_grad for p in module.parameters())
    )


def _geometry(conv: nn.Module) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def conv_param_rows(conv: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
    """The ``N`` parameter gradients as rows: ``(N, c, C_out)``, row ``o`` = ``[W[o], b[o]]``.

    ``a``: the input ``(B, C_in, …)``; ``delta``: the stacked cotangents ``(N, B, C_out, …)``.
    """
    n, batch, c_out = delta.shape[:3]
    weight = conv.weight
    stacked = delta.transpose(0, 1).reshape(batch, n * c_out, *delta.shape[3:])
    weight_grad, _ = _GRAD[type(conv)]
    grads = weight_grad(a, (n * c_out, *weight.shape[1:]), stacked, **_geometry(conv))
    rows = grads.reshape(n, c_out, -1)  # (N, C_out, C_in·k…)
    if conv.bias is not None:
        bias = delta.sum(dim=(1, *range(3, delta.ndim)))  # (N, C_out)
        rows = torch.cat([rows, bias.unsqueeze(2)], dim=2)
    return rows.transpose(1, 2)


def conv_input_cotangents(conv: nn.Module, in_shape: torch.Size, delta: Tensor) -> Tensor:
    """``∂ℓ_n/∂a`` for each cotangent: ``(N, *in_shape)``."""
    n = delta.shape[0]
    _, input_grad = _GRAD[type(conv)]
    folded = delta.reshape(n * in_shape[0], *delta.shape[2:])
    out = input_grad((n * in_shape[0], *in_shape[1:]), conv.weight, folded, **_geometry(conv))
    return out.reshape(n, *in_shape)
