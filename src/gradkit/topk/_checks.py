"""Argument checks shared by the top-k operators, each error prefixed with the operator's name.

The messages follow :func:`gradkit.soft_topk`'s: the argument, the value and the allowed range.
``op`` is the public name (``"sparse_topk"``, ...) that starts every message.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .soft_topk import DimError

__all__ = [
    "check_k",
    "check_k_values",
    "check_temperature",
    "check_temperature_values",
    "check_values",
    "check_x",
    "normalize_dim",
]


def check_x(x, op: str) -> None:
    """``x`` must be a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")


def normalize_dim(dim, ndim: int, op: str) -> int:
    """``dim`` as a non-negative index into an ``ndim``-d tensor (errors like torch's)."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    if ndim == 0:
        raise DimError(f"{op}: x must have at least one dimension, got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise DimError(
            f"{op}: dim={dim} is out of range for a {ndim}-d x "
            f"(allowed: {-ndim} ≤ dim ≤ {ndim - 1})"
        )
    return int(dim) % ndim


def _concrete() -> bool:
    """Whether tensor values can be read now: not while tracing or under ``torch.func``
    (the solver entry checks them then, see :func:`check_values`)."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def check_values(k, tau, n: int, op: str) -> None:
    """The value checks of a tensor ``k`` and ``τ``, for the solver entry (concrete tensors)."""
    if isinstance(k, Tensor):
        check_k_values(k, n, op)
    if isinstance(tau, Tensor):
        check_temperature_values(tau, op)


def check_temperature_values(tau: Tensor, op: str) -> None:
    """Every ``τ`` finite and positive."""
    if tau.numel() == 0:
        return
    low, high = torch.aminmax(tau.detach().to(torch.float64))
    if not (math.isfinite(low) and math.isfinite(high) and low > 0):
        raise ValueError(
            f"{op}: temperature must be finite and > 0, "
            f"got temperature values in [{float(low)}, {float(high)}]"
        )


def check_k_values(k: Tensor, n: int, op: str) -> None:
    if k.numel() == 0:
        return
    k_min, k_max = torch.aminmax(k.detach().to(torch.float64))
    if not (math.isfinite(k_min) and math.isfinite(k_max)):
        raise ValueError(f"{op}: k must be finite, got a k tensor containing {k_min}/{k_max}")
    if k_min < 0 or k_max > n:
        raise ValueError(
            f"{op}: k must lie in [0, n] = [0, {n}] (n = size of dim), "
            f"got k values in [{float(k_min)}, {float(k_max)}]"
        )


def check_k(k, n: int, batch_shape: torch.Size, x_dtype: torch.dtype, hard: bool, op: str):
    """``k`` as a float, or a floating tensor of shape ``batch_shape`` (values checked)."""
    if isinstance(k, Tensor):
        if k.dtype.is_complex or k.dtype == torch.bool:
            raise TypeError(f"{op}: k must be a real number or real tensor, got {k.dtype}")
        try:
            k_arg = k.broadcast_to(batch_shape)
        except RuntimeError as error:
            raise ValueError(
                f"{op}: a tensor k must broadcast to x's shape without dim "
                f"{tuple(batch_shape)}, got k of shape {tuple(k.shape)}"
            ) from error
        if not k_arg.dtype.is_floating_point:
            k_arg = k_arg.to(x_dtype if x_dtype == torch.float64 else torch.float32)
        if _concrete():
            check_k_values(k_arg, n, op)
            if hard and k_arg.numel() and not bool(torch.all(k_arg == torch.round(k_arg))):
                raise ValueError(f"{op}: hard=True needs an integer-valued k, got a fractional k")
        return k_arg
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"{op}: k must be a number or a tensor, got {k!r}")
    k_arg = float(k)
    if not math.isfinite(k_arg) or not 0 <= k_arg <= n:
        raise ValueError(f"{op}: k must lie in [0, n] = [0, {n}], got k={k!r}")
    if hard and k_arg != round(k_arg):
        raise ValueError(f"{op}: hard=True needs an integer k, got k={k!r}")
    return k_arg


def check_temperature(temperature, batch_shape: torch.Size, op: str):
    """A positive finite float, or a floating tensor broadcast to ``batch_shape`` (one τ per
    slice; it may require grad)."""
    if isinstance(temperature, Tensor):
        if not temperature.dtype.is_floating_point:
            raise TypeError(
                f"{op}: a tensor temperature must be floating-point, got {temperature.dtype}"
            )
        try:
            tau = temperature.broadcast_to(batch_shape)
        except RuntimeError as error:
            raise ValueError(
                f"{op}: a tensor temperature must broadcast to x's shape without dim "
                f"{tuple(batch_shape)}, got temperature of shape {tuple(temperature.shape)}"
            ) from error
        if _concrete():
            check_temperature_values(tau, op)
        return tau
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{op}: temperature must be a positive number, got {temperature!r}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: temperature must be finite and > 0, got temperature={value!r}")
    return value
