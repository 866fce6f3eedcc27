"""The math behind :func:`gradkit.soft_topk`: the threshold solve and the closed-form Jacobian.

Everything here works on the last dimension of a tensor of shape ``(..., n)``; the public
wrapper moves the user's ``dim`` there.  Notation (per slice):

* ``z_i = (x_i − θ)/τ``, ``p_i = σ(z_i)``, ``v_i = σ'(z_i) = p_i (1 − p_i)``;
* ``F(θ) = Σ_i p_i``, strictly decreasing in ``θ`` with ``F'(θ) = −Σ_i v_i / τ``;
* the threshold ``θ*`` solves ``F(θ*) = k``.

Solve.  Each slice is first mapped to dimensionless, shift-free coordinates
``w_i = s·(x_i − c)·a``, with ``c = max_i x_i``, ``a = 1/τ`` (capped so that the slice's range
times ``a`` cannot overflow) and a sign ``s = −1`` for the slices with ``k > n/2``, which are
solved as the complementary problem ``Σσ(−u_i − t) = n − k`` (then every solve has
``k ≤ n/2``, where ``log F`` is well conditioned).  In those units the root ``t`` lies in the
bracket

    ``[w_min − logit(k/n),  w_max − logit(k/n)]``

(at the left end every ``p_i ≥ k/n``; at the right end every ``p_i ≤ k/n``).  The iteration is
Newton's method on ``g(t) = log F(t) − log k``, whose step ``log(F/k)·F/Σv`` is exact when all
entries are in the exponential tail (``σ(z) ≈ eᶻ``) and equals the plain Newton step near the
root, safeguarded by the bracket: a step that leaves the bracket is replaced by a bisection,
and every evaluation shrinks the bracket.  Bisection splits the bracket in half of its
*floating-point ordering* when it is wide (so a bracket spanning 1e−30..1e30 is cut in at most
64 steps, not 200), arithmetically otherwise.  After a few Newton steps only bisection is used,
so the loop stops after at most ``_NEWTON_STEPS + bits`` passes whatever the data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["soft_topk_vjp", "solve_soft_topk"]

# Newton steps allowed before the solve switches to pure bisection (which cannot stall).
_NEWTON_STEPS = 12
# A bracket wider than this (in units of τ) is bisected in its floating-point ordering.
_WIDE_BRACKET = 64.0


def _ordered_bits(t: Tensor) -> Tensor:
    """Map floats to integers with the same order (an involution on the integer side)."""
    int_dtype = torch.int64 if t.dtype == torch.float64 else torch.int32
    bits = t.view(int_dtype)
    int_min = torch.iinfo(int_dtype).min
    return torch.where(bits >= 0, bits, int_min - bits)


def _bits_to_float(key: Tensor, dtype: torch.dtype) -> Tensor:
    int_min = torch.iinfo(key.dtype).min
    return torch.where(key >= 0, key, int_min - key).view(dtype)


def _midpoint(lo: Tensor, hi: Tensor) -> Tensor:
    """Arithmetic midpoint for narrow brackets, midpoint in float ordering for wide ones."""
    arithmetic = 0.5 * lo + 0.5 * hi
    key_lo, key_hi = _ordered_bits(lo), _ordered_bits(hi)
    key_mid = (key_lo >> 1) + (key_hi >> 1) + (key_lo & key_hi & 1)
    ordered = _bits_to_float(key_mid, lo.dtype)
    return torch.where(hi - lo > _WIDE_BRACKET, ordered, arithmetic)


def _solve_shift(
    w: Tensor, k: Tensor, n: Tensor, w_min: Tensor, w_max: Tensor, done: Tensor
) -> Tensor:
    """Return ``t`` (shape ``(..., 1)``) with ``Σ_i σ(w_i − t) = k`` for slices not ``done``.

    ``w`` may contain ``−inf`` (entries that take no part); ``0 < k ≤ n/2`` on live slices.
    """
    dtype = w.dtype
    eps = torch.finfo(dtype).eps
    k_safe = torch.where(done, torch.ones_like(k), k)
    n_safe = torch.where(done, 2 * torch.ones_like(n), n)
    logit_k = torch.log(k_safe) - torch.log(n_safe - k_safe)
    lo = torch.where(done, 0.0, w_min - logit_k)
    hi = torch.where(done, 0.0, w_max - logit_k)
    log_k = torch.log(k_safe)
    tol_f = 32 * eps * torch.clamp(k_safe, min=1.0)
    t = hi.clone()
    # A zero-width bracket (all entries tied) is solved exactly by its midpoint.
    tied = hi - lo <= 4 * eps * torch.clamp(hi.abs(), min=1.0)
    t = torch.where(tied, 0.5 * lo + 0.5 * hi, t)
    done = done | tied
    collapsed = torch.zeros_like(done)
    max_iters = _NEWTON_STEPS + 8 * w.element_size() + 2
    buffer = torch.empty_like(w)
    for iteration in range(max_iters):
        p = torch.sigmoid(torch.sub(w, t, out=buffer), out=buffer)
        mass = p.sum(dim=-1, keepdim=True)
        # Σ p(1 − p) = Σp − Σp²; after the flip k ≤ n/2, so cancellation only hits
        # saturated slices, where Newton is replaced by bisection anyway.
        slope = mass - torch.linalg.vecdot(p, p).unsqueeze(-1)
        excess = mass - k
        lo = torch.where(excess > 0, t, lo)
        hi = torch.where(excess < 0, t, hi)
        step = (torch.log(mass) - log_k) * mass / slope
        t_newton = t + step
        newton_ok = (t_newton > lo) & (t_newton < hi) & (slope > 0)
        if iteration >= _NEWTON_STEPS:
            newton_ok = torch.zeros_like(newton_ok)
        width_tol = 4 * eps * torch.clamp(t.abs(), min=1.0)
        # Newton's error contracts as err_next ≲ step² (|g''/g'| ≤ 2 for sums of
        # sigmoids), so a step below √tol lands within tol of the root.
        resolved = (excess.abs() <= tol_f) | (newton_ok & (step * step <= width_tol))
        # A bracket that shrinks to rounding without meeting the budget straddles a jump.
        collapsed = collapsed | (~done & ~resolved & (hi - lo <= width_tol))
        converged = resolved | (hi - lo <= width_tol)
        t_next = torch.where(newton_ok, t_newton, _midpoint(lo, hi))
        keep = done | (converged & ~newton_ok)
        t = torch.where(keep, t, t_next)
        done = done | converged
        if bool(done.all()):
            break
    return t, lo, hi, collapsed


@torch.no_grad()
def solve_soft_topk(x: Tensor, k: Tensor | float, temperature: float) -> Tensor:
    """Forward value ``p = σ((x − θ)/τ)`` with ``Σ p = k`` along the last dimension.

    Args:
        x: ``(..., n)`` floating tensor; solved in float32 (half inputs) or its own dtype.
        k: number, or tensor broadcastable to ``x.shape[:-1]``, with ``0 ≤ k ≤ n``.
        temperature: ``τ > 0``.

    Returns ``p`` with ``x``'s shape and dtype.  ``−inf`` entries get 0, ``+inf`` entries 1
    (or ``k/m`` each when the ``m`` of them exceed the budget), a slice with a NaN is NaN.
    When ``k`` exceeds the number of entries above ``−inf`` they all get 1.
    """
    out_dtype = x.dtype
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    n_total = x.shape[-1]
    if x.numel() == 0:
        return torch.zeros_like(x, dtype=out_dtype)
    if isinstance(k, Tensor):
        k = k.to(dtype).unsqueeze(-1)
    else:
        k = torch.full((1,) * x.dim(), float(k), dtype=dtype, device=x.device)
    k = k.expand(*x.shape[:-1], 1)

    x_min, x_max = torch.aminmax(x, dim=-1, keepdim=True)
    all_finite = bool(torch.isfinite(x_min).all() & torch.isfinite(x_max).all())
    if all_finite:
        finite = None
        n = torch.full_like(k, float(n_total))
        k_finite = k
    else:
        finite = torch.isfinite(x)
        positive = x == math.inf
        nan_slice = torch.isnan(x).any(dim=-1, keepdim=True)
        n = finite.sum(dim=-1, keepdim=True).to(dtype)
        n_positive = positive.sum(dim=-1, keepdim=True).to(dtype)
        k_finite = torch.minimum(torch.clamp(k - n_positive, min=0.0), n)
        x = torch.where(finite, x, 0.0)
        x_min = torch.where(finite, x, math.inf).amin(dim=-1, keepdim=True)
        x_max = torch.where(finite, x, -math.inf).amax(dim=-1, keepdim=True)
        x_min = torch.where(n > 0, x_min, 0.0)
        x_max = torch.where(n > 0, x_max, 0.0)

    finfo = torch.finfo(dtype)
    # Work in u = x/τ without re-centring: near the root, u_i − t then keeps the full
    # resolution of the entries that matter, however far away the others are.  1/τ is capped
    # so that |u| ≤ max/16 and every later difference stays finite; the cap only binds when
    # τ < |x|·2⁻¹²⁴ (float32) — a selection that is hard anyway.
    magnitude = torch.maximum(x_max.abs(), x_min.abs())
    scale = torch.clamp((finfo.max / 16) / magnitude, max=min(1.0 / temperature, finfo.max / 16))
    flip = k_finite > 0.5 * n
    sign = torch.where(flip, -1.0, 1.0).to(dtype)
    k_solve = torch.where(flip, n - k_finite, k_finite)
    w = x * (sign * scale)
    if finite is not None:
        w = torch.where(finite, w, -math.inf)
    u_min, u_max = x_min * scale, x_max * scale
    w_min = torch.where(flip, -u_max, u_min)
    w_max = torch.where(flip, -u_min, u_max)
    trivial = k_solve <= 0
    t, lo, hi, unresolved = _solve_shift(w, k_solve, n, w_min, w_max, trivial)
    # Trivial slices: nothing (or everything) is selected.
    t = torch.where(trivial, math.inf, t)
    flipped = bool(flip.any())

    def membership(shift: Tensor) -> Tensor:
        z = torch.sub(w, shift)
        p = torch.sigmoid(z.mul_(sign) if flipped else z)
        return p if finite is None else torch.where(finite, p, 0.0)

    p = membership(t)
    if bool(unresolved.any()):
        # The root sits on a jump of F that the dtype cannot resolve (entries tied at the
        # resolution limit straddle θ): blend the two bracket ends so the budget is met,
        # which shares the remainder equally among those ties.
        p_lo, p_hi = membership(lo), membership(hi)
        mass_lo = p_lo.sum(dim=-1, keepdim=True)
        mass_hi = p_hi.sum(dim=-1, keepdim=True)
        gap = mass_lo - mass_hi
        weight = torch.clamp((k_finite - mass_hi) / torch.where(gap != 0, gap, 1.0), 0.0, 1.0)
        p = torch.where(unresolved, weight * p_lo + (1 - weight) * p_hi, p)
    if finite is not None:
        share = torch.clamp(k / torch.clamp(n_positive, min=1.0), max=1.0)
        p = torch.where(finite, p, torch.where(positive, share, 0.0))
        p = torch.where(nan_slice, math.nan, p)
    return p.to(out_dtype)


def soft_topk_vjp(grad: Tensor, p: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Vector–Jacobian product of the soft top-k, and the gradient with respect to ``k``.

    With ``v = p(1 − p)`` and ``S = Σ v`` (per slice, last dimension)::

        ∂L/∂x = (g⊙v − v·Σ(g⊙v)/S) / τ,        ∂L/∂k = Σ(g⊙v) / S.

    Written with differentiable tensor ops on the *output* ``p``, so autograd differentiates
    it again (double backward).  Saturated slices (``S = 0``) get an exact zero, not 0/0.
    """
    v = p - p * p
    total = v.sum(dim=-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    gv = grad * v
    grad_k = gv.sum(dim=-1, keepdim=True) / total
    grad_x = (gv - v * grad_k) / temperature
    return grad_x, grad_k.squeeze(-1)
