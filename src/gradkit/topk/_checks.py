"""Argument checks shared by the top-k operators, each error prefixed with the operator's name.

Every message names the argument, the value and the allowed range.  ``op`` is the public
name (``"soft_topk"``, ``"sparse_topk"``) that starts every message.

Tensor *values* (a per-slice ``k`` or ``τ``) are read on the host only when they can be: not
while tracing or under ``torch.func`` (the solver entry checks them then, :func:`check_values`),
and with ``cpu_only=True`` not on a GPU either, where reading them would be a host
synchronisation.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "DimError",
    "check_k",
    "check_k_values",
    "check_temperature",
    "check_temperature_type",
    "check_temperature_values",
    "check_values",
    "check_x",
    "normalize_dim",
]


#: Types accepted as numbers without the (slower) ``numbers`` ABC checks; ``bool`` is not one.
_PLAIN_NUMBERS = (int, float)


class DimError(ValueError, IndexError):
    """Bad ``dim`` argument: a :class:`ValueError`, and an :class:`IndexError` like torch's."""


def check_x(x, op: str) -> None:
    """``x`` must be a dense floating-point tensor holding data (not on the meta device)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(
            f"{op}: x must be a dense (strided) tensor, got layout {x.layout}; "
            "call x.to_dense() first"
        )
    if x.is_meta:
        raise ValueError(
            f"{op}: x is on the meta device (shapes only, no values); the threshold "
            "solve needs data: move x to cpu or cuda"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")


def normalize_dim(dim, ndim: int, op: str) -> int:
    """``dim`` as a non-negative index into an ``ndim``-d tensor (errors like torch's)."""
    # (a plain int skips the slower ABC check; a bool is never one)
    if type(dim) is not int and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral)):
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


def _value_range(values: Tensor, cpu_only: bool) -> tuple[float, float] | None:
    """``(min, max)`` of a tensor read on the host; ``None`` for an empty one, or, with
    ``cpu_only``, one that is not on the CPU."""
    if values.numel() == 0 or (cpu_only and values.device.type != "cpu"):
        return None
    low, high = torch.aminmax(values.detach().to(torch.float64))
    return float(low), float(high)


def check_values(k, tau, n: int, op: str, *, cpu_only: bool = False) -> None:
    """The value checks of a tensor ``k`` and ``τ``, for the solver entry (concrete tensors)."""
    if isinstance(k, Tensor):
        check_k_values(k, n, op, cpu_only=cpu_only)
    if isinstance(tau, Tensor):
        check_temperature_values(tau, op, cpu_only=cpu_only)


def check_temperature_values(tau: Tensor, op: str, *, cpu_only: bool = False) -> None:
    """Every ``τ`` finite and positive."""
    seen = _value_range(tau, cpu_only)
    if seen is not None and not (seen[0] > 0 and math.isfinite(seen[1])):
        raise ValueError(
            f"{op}: temperature must be finite and > 0, got a temperature tensor with "
            f"values in [{seen[0]}, {seen[1]}]"
        )


def check_k_values(k: Tensor, n: int, op: str, *, cpu_only: bool = False) -> None:
    """Every ``k`` finite and in ``[0, n]``."""
    seen = _value_range(k, cpu_only)
    if seen is None:
        return
    low, high = seen
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{op}: k must be finite, got a k tensor containing {low}/{high}")
    if low < 0 or high > n:
        raise ValueError(
            f"{op}: k must lie in [0, n] = [0, {n}] (n = size of dim), "
            f"got k values in [{low}, {high}]"
        )


def check_k(
    k,
    n: int,
    batch_shape: torch.Size,
    x_dtype: torch.dtype,
    hard: bool,
    op: str,
    *,
    cpu_only: bool = False,
):
    """``k`` as a float, or a floating tensor of shape ``batch_shape`` (values checked where
    they can be read, see the module docstring)."""
    if isinstance(k, Tensor):
        return _check_k_tensor(k, n, batch_shape, x_dtype, hard, op, cpu_only)
    if type(k) not in _PLAIN_NUMBERS and (isinstance(k, bool) or not isinstance(k, numbers.Real)):
        raise TypeError(f"{op}: k must be a number or a tensor, got {k!r}")
    k_arg = float(k)
    if not 0 <= k_arg <= n:  # (NaN fails it; no math.isfinite, as for the temperature)
        raise ValueError(f"{op}: k must lie in [0, n] = [0, {n}], got k={k!r}")
    if hard and k_arg != round(k_arg):
        raise ValueError(f"{op}: hard=True needs an integer k, got k={k!r}")
    return k_arg


def _check_k_tensor(
    k: Tensor,
    n: int,
    batch_shape: torch.Size,
    x_dtype: torch.dtype,
    hard: bool,
    op: str,
    cpu_only: bool,
) -> Tensor:
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
    readable = _concrete() and not (cpu_only and k_arg.device.type != "cpu")
    if readable:
        check_k_values(k_arg, n, op)
        if hard and k_arg.numel() and not bool(torch.all(k_arg == torch.round(k_arg))):
            raise ValueError(f"{op}: hard=True needs an integer-valued k, got a fractional k")
    return k_arg


def check_temperature_type(temperature, op: str) -> float | Tensor:
    """A positive finite number as a float; a real tensor is returned as is (its shape and
    values are checked by :func:`check_temperature`)."""
    if isinstance(temperature, Tensor):
        if temperature.dtype.is_complex or temperature.dtype == torch.bool:
            raise TypeError(
                f"{op}: temperature must be a real number or tensor, got {temperature.dtype}"
            )
        return temperature
    if type(temperature) not in _PLAIN_NUMBERS and (
        isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
    ):
        raise TypeError(f"{op}: temperature must be a positive number, got {temperature!r}")
    value = float(temperature)
    # (comparisons only, no math.isfinite: torch.compile can guard on them once it has made a
    # float argument dynamic)
    if not 0 < value < math.inf:
        raise ValueError(f"{op}: temperature must be finite and > 0, got temperature={value!r}")
    return value


def check_temperature(temperature, batch_shape: torch.Size, op: str, *, cpu_only: bool = False):
    """A positive finite float, or a real tensor broadcast to ``batch_shape`` (one ``τ`` per
    slice; it may require grad), its values checked where they can be read."""
    temperature = check_temperature_type(temperature, op)
    if not isinstance(temperature, Tensor):
        return temperature
    try:
        tau = temperature.broadcast_to(batch_shape)
    except RuntimeError as error:
        raise ValueError(
            f"{op}: a tensor temperature must be a scalar or broadcast to x's shape "
            f"without dim {tuple(batch_shape)}, got temperature of shape "
            f"{tuple(temperature.shape)}"
        ) from error
    if _concrete():
        check_temperature_values(tau, op, cpu_only=cpu_only)
    return tau
