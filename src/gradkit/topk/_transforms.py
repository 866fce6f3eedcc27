"""What ``soft_topk`` and ``sparse_topk`` share in their registered ops' autograd kernels.

Each op's ``Autograd`` kernel picks one of three things: its ``autograd.Function`` (a graph to
record), the kernel below autograd (nothing to record: a compiled graph's forward runs with
grad off), or, under ``torch.func`` transforms (where a ``Function`` cannot be called from an
operator, and a traced one loses its tangents), a composite of differentiable ops around the
solve at detached inputs (:func:`composite`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

__all__ = ["composite", "needs_derivative", "nothing_to_record", "runge_kutta_step"]


def needs_derivative(*tensors) -> bool:
    """Whether a tensor (``None`` and numbers are skipped) at the current autograd level
    requires grad or carries a tangent (``True`` when that cannot be told, e.g. a tangent of a
    vmapped tensor: the composite is right either way)."""
    for t in tensors:
        if not isinstance(t, Tensor):
            continue
        if t.requires_grad:
            return True
        try:
            if forward_ad.unpack_dual(t).tangent is not None:
                return True
        except RuntimeError:
            return True
    return False


def nothing_to_record(*tensors) -> bool:
    """No forward-AD level open, and grad mode off or no tensor (``None`` and numbers are
    skipped) requiring grad: an autograd kernel may call the kernel below autograd directly
    instead of building a ``Function`` (a compiled graph's forward, an exported program run
    for inference)."""
    if forward_ad._current_level >= 0:
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def runge_kutta_step(p0: Tensor, slope: Callable[[Tensor, float], Tensor]) -> Tensor:
    """One classical Runge–Kutta step of ``dp/ds = slope(p, s)`` from ``p(0) = p0`` to ``s = 1``.

    With ``slope`` the Jacobian map applied to the (zero-valued) differences between the
    inputs and their detached copies, the result has the value ``p0`` exactly and the exact
    derivatives of every order up to four in those inputs (its error is ``O(|Δ|⁵)``).
    """
    k1 = slope(p0, 0.0)
    k2 = slope(p0 + 0.5 * k1, 0.5)
    k3 = slope(p0 + 0.5 * k2, 0.5)
    k4 = slope(p0 + k3, 1.0)
    return p0 + (k1 + 2 * k2 + 2 * k3 + k4) / 6


def _detach(value):
    return value.detach() if isinstance(value, Tensor) else value


def _difference(value, base):
    return value - base if isinstance(value, Tensor) else None


def composite(solve, tangent, x: Tensor, k, tau, dtype: torch.dtype) -> Tensor:
    """An operator as differentiable ops around a solve that is not differentiated.

    ``solve(x₀, k₀, τ₀)`` is the operator at the detached inputs (``k`` and ``τ`` numbers or
    tensors), ``tangent(p, τ, ẋ, k̇, τ̇)`` its Jacobian map (``None`` for an absent tangent).
    With ``Δ`` the (zero-valued) differences between the inputs and their detached copies,
    ``p(s) = p(x₀ + sΔ)`` follows ``dp/ds = tangent(p, τ(s), Δ)``; one step of
    :func:`runge_kutta_step` from ``s = 0`` to ``1`` has the value ``p₀`` exactly and the
    exact derivatives up to fourth order.  ``p₀`` and ``Δx`` are taken in ``dtype``.
    """
    x0, k0, tau0 = x.detach(), _detach(k), _detach(tau)
    p0 = solve(x0, k0, tau0).to(dtype)
    # (±inf entries: their difference inf − inf must not reach the tangent)
    dx = torch.where(torch.isfinite(x0), x - x0, torch.zeros_like(x)).to(dtype)
    dk, dtau = _difference(k, k0), _difference(tau, tau0)

    def slope(p: Tensor, s: float) -> Tensor:
        tau_s = tau0 + s * dtau if dtau is not None else tau
        return tangent(p, tau_s, dx, dk, dtau)

    return runge_kutta_step(p0, slope)
