"""The math behind :func:`gradkit.sparse_topk`: an exact threshold solve and the closed-form
Jacobian, on the last dimension of a tensor of shape ``(..., n)``.

Notation (per slice): ``w_i = (x_i − x_max)/τ`` (the finite entries, shifted by their maximum
so that a large common offset keeps full precision), ``p_i = clip(w_i − t, 0, 1)``, and

    ``F(t) = Σ_i clip(w_i − t, 0, 1)``,

continuous, non-increasing and piecewise linear, with kinks at ``w_i`` and ``w_i − 1``.  The
threshold ``t*`` solves ``F(t*) = k``, so ``p`` is the Euclidean projection of ``w`` onto
``{0 ≤ p ≤ 1, Σp = k}``.  With ``U = {w − t ≥ 1}`` (``p = 1``) and the free set
``F = {0 < w − t < 1}`` fixed, ``F`` is linear and its root is exact:

    ``t = (Σ_F w_i + |U| − k) / |F|``.

Solve.  Newton on the piecewise-linear ``F`` is exactly that active-set solve: from ``t`` it
jumps to the root of the linear piece at ``t``.  The iteration stops when the active set is
stable (the next step is ``t`` itself, to rounding); then ``t`` solves its own active set,
which is the exact answer.  It starts from the all-free root ``(Σw − k)/L`` (``L`` finite
entries), keeps the bracket ``[lo, hi]`` with ``F(lo) ≥ k ≥ F(hi)`` (from
``[min w − 1, max w]``), replaces a step that leaves it (or a flat piece, ``|F| = 0``) by the
bracket's midpoint, and hands the rows not finished after ``_NEWTON_STEPS`` steps to a
sort-based exact solve (``O(n log n)``: ``F`` at every kink by prefix sums, then the active
set of the piece that holds the root).

Jacobian (``F`` = the free set of the result, ``τ`` the temperature)::

    ∂p/∂x = (I_F − 1_F 1_Fᵀ/|F|)/τ,   ∂p/∂k = 1_F/|F|,   ∂p_i/∂τ = 1_F (mean_F p − p_i)/τ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _native

__all__ = [
    "fused_vjp",
    "solve_sparse_nosync",
    "solve_sparse_topk",
    "sparse_topk_jvp",
    "sparse_topk_vjp",
]

#: Newton steps before a row is handed to the sort-based solve.
_NEWTON_STEPS = 48
#: Rows spanning more than this (in units of τ) start from order statistics.
_SPREAD_LIMIT = 2.0
#: Rows spanning more than this many τ are solved about a pivot near the root (in float64, w
#: about the top keeps about 2⁻³² of the root's digits at this span).
_PIVOT_SPAN = 2.0**20
#: float32 rows spanning more than this many τ are solved in float64 (2⁻¹² of the root's
#: digits kept in float32).
_FLOAT32_SPAN = 2.0**12


def _per_row(value: Tensor | float, rows: int, like: Tensor) -> Tensor:
    """A number or a tensor of per-slice values as a float64 ``(rows, 1)`` tensor on ``like``'s
    device (float64: a τ below float32's range stays positive)."""
    if isinstance(value, Tensor):
        return value.detach().to(device=like.device, dtype=torch.float64).reshape(rows, 1)
    return torch.full((rows, 1), float(value), dtype=torch.float64, device=like.device)


def _active_set(w: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(|U|, |F|, Σ_F w)`` at the threshold ``t`` (shape ``(rows, 1)`` each)."""
    z = w - t
    free = (z > 0) & (z < 1)
    upper = (z >= 1).sum(-1, keepdim=True).to(w.dtype)
    count = free.sum(-1, keepdim=True).to(w.dtype)
    total = torch.where(free, w, 0.0).sum(-1, keepdim=True)
    return upper, count, total


def _order_bracket(w: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``[w_(⌊k⌋+1) − 1, w_(⌈k⌉)]`` (``w_(j)`` the ``j``-th largest), which holds the root:
    ``F ≥ ⌊k⌋ + 1 > k`` at its left end, ``F ≤ ⌈k⌉ − 1 < k`` at its right end.  Width ≤ 1."""
    n = w.shape[-1]
    upper_rank = k.floor().long() + 1
    lower_rank = k.ceil().long().clamp_min(1)
    largest = int(upper_rank.max())
    if largest <= n // 2 + 1:
        top = w.topk(largest, -1).values  # descending
        return top.gather(-1, upper_rank - 1) - 1, top.gather(-1, lower_rank - 1)
    bottom = w.topk(n - int(lower_rank.min()) + 1, -1, largest=False).values  # ascending
    return bottom.gather(-1, n - upper_rank) - 1, bottom.gather(-1, n - lower_rank)


def _secant(lo: Tensor, hi: Tensor, mass_lo: Tensor, mass_hi: Tensor, k: Tensor) -> Tensor:
    """The bracket's secant point (regula falsi), kept off its ends by a quarter of the width."""
    share = ((mass_lo - k) / (mass_lo - mass_hi).clamp_min(1e-30)).clamp(0.25, 0.75)
    return lo + share * (hi - lo)


def _newton(w: Tensor, k: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Active-set Newton on ``F(t) = k`` for every row; returns ``(t, done)``."""
    eps = torch.finfo(w.dtype).eps
    live = torch.isfinite(w).sum(-1, keepdim=True).to(w.dtype)
    t = ((torch.where(torch.isfinite(w), w, 0.0).sum(-1, keepdim=True) - k) / live).clamp(lo, hi)
    wide = lo < -_SPREAD_LIMIT
    if bool(wide.any()):
        order_lo, order_hi = _order_bracket(w, k)
        lo, hi = torch.maximum(lo, order_lo), torch.minimum(hi, order_hi)
        t = torch.where(wide, lo / 2 + hi / 2, t.clamp(lo, hi))
    done = torch.zeros_like(k, dtype=torch.bool)
    mass_lo, mass_hi = live, torch.zeros_like(live)
    for _ in range(_NEWTON_STEPS):
        upper, count, total = _active_set(w, t)
        mass = upper + total - count * t
        lo, mass_lo = torch.where(mass >= k, t, lo), torch.where(mass >= k, mass, mass_lo)
        hi, mass_hi = torch.where(mass <= k, t, hi), torch.where(mass <= k, mass, mass_hi)
        step = (total + upper - k) / count.clamp_min(1)
        stable = (count > 0) & ((step - t).abs() <= 2 * eps * (t.abs() + 1))
        solved = stable | (mass == k)
        t_new = torch.where(stable, step, t)
        inside = (count > 0) & (step > lo) & (step < hi)
        t_new = torch.where(
            solved, t_new, torch.where(inside, step, _secant(lo, hi, mass_lo, mass_hi, k))
        )
        t = torch.where(done, t, t_new)
        done = done | solved
        if bool(done.all()):
            break
    return t, done


def _sorted_solve(w: Tensor, k: Tensor, lo: Tensor) -> Tensor:
    """The exact threshold by sorting: ``F`` at every kink, then the root's linear piece."""
    n = w.shape[-1]
    ascending = torch.where(torch.isfinite(w), w, lo).sort(-1).values
    prefix = torch.nn.functional.pad(ascending.cumsum(-1), (1, 0))
    kinks = torch.cat([ascending, ascending - 1], -1).sort(-1).values

    def mass_at(t: Tensor) -> Tensor:
        start = torch.searchsorted(ascending, t, right=True)  # first index with w > t
        stop = torch.searchsorted(ascending, t + 1, right=False)  # first index with w ≥ t + 1
        inner = prefix.gather(-1, stop) - prefix.gather(-1, start)
        return (n - stop) + inner - (stop - start) * t

    mass = mass_at(kinks)  # non-increasing along the kinks
    index = ((mass >= k).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)
    left, right = kinks.gather(-1, index), kinks.gather(-1, index + 1)
    upper, count, total = _active_set(torch.where(torch.isfinite(w), w, lo), left / 2 + right / 2)
    t = (total + upper - k) / count.clamp_min(1)
    return torch.where(count > 0, t, left)


def _finite_range(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The finiteness mask of ``x`` and each row's largest and smallest finite entries
    (``−inf`` and ``inf`` for a row with none)."""
    finite = torch.isfinite(x)
    top = torch.where(finite, x, -math.inf).amax(-1, keepdim=True)
    bottom = torch.where(finite, x, math.inf).amin(-1, keepdim=True)
    return finite, top, bottom


def _needs_float64(top: Tensor, bottom: Tensor, tau: Tensor) -> bool:
    """Whether float32 rows (finite extremes ``top`` and ``bottom``, per-row float64 ``tau``)
    need float64: a row spanning more than ``_FLOAT32_SPAN`` τ (w about its top would lose the
    root's digits in float32), or a τ below float32's smallest normal number (host reads: the
    synchronising path only)."""
    top, bottom = top.double(), bottom.double()
    span = torch.where(top > bottom, (top - bottom) / tau, 0.0)
    tiny = torch.finfo(torch.float32).tiny
    return bool((span > _FLOAT32_SPAN).any()) or bool((tau < tiny).any())


def _reference(
    x: Tensor,
    finite: Tensor,
    top: Tensor,
    bottom: Tensor,
    budget: Tensor,
    general: Tensor,
    tau: Tensor,
    sync: bool,
) -> Tensor:
    """The point each row's ``w = (x − ref)/τ`` is taken about: its largest finite entry, or
    for rows spanning more than ``_PIVOT_SPAN`` τ (where ``w`` about the top would lose the
    root's digits) the ``⌈budget⌉``-th largest finite entry, which lies within ``τ`` (plus a
    gap the root does not depend on) of the threshold.  ``sync=False``: no host read."""
    wide = general & ((top - bottom) / tau > _PIVOT_SPAN)
    if sync and not bool(wide.any()):
        return top
    rows = wide.squeeze(-1).nonzero().squeeze(-1) if sync else slice(None)
    ranked = torch.where(finite[rows], x[rows], -math.inf).sort(-1, descending=True).values
    index = (budget[rows].ceil().long() - 1).clamp(0, x.shape[-1] - 1)
    ref = top.clone()
    ref[rows] = torch.where(wide[rows], ranked.gather(-1, index), top[rows])
    return ref


def _scaled(x: Tensor, finite: Tensor, ref: Tensor, tau: Tensor) -> Tensor:
    """``w = (x − ref)/τ`` on the finite entries, within ``±2·_PIVOT_SPAN`` (beyond it:
    saturated either way); ``−inf`` elsewhere."""
    limit = 2 * _PIVOT_SPAN
    return torch.where(finite, ((x - ref) / tau).clamp(-limit, limit), -math.inf)


def _polish(
    x: Tensor, finite: Tensor, ref: Tensor, tau: Tensor, t: Tensor, budget: Tensor
) -> tuple[Tensor, Tensor]:
    """``w`` and ``t`` again about ``x₀ = ref + t·τ`` (θ, rounded), ``t`` the exact solve of
    the active set there: ``x − x₀`` is exact near the root, where ``w`` about ``ref`` held it
    to only ``eps·|t|`` (the fused kernel's ``sparse_polish``)."""
    centre = ref + t * tau
    shift = t - (centre - ref) / tau
    w = _scaled(x, finite, centre, tau)
    upper, count, total = _active_set(w, shift)
    solved = (total + upper - budget) / count.clamp(min=1)
    return w, torch.where(count > 0, solved, shift)


def _solve_rows(x: Tensor, k: Tensor, tau: Tensor, sync: bool = True) -> Tensor:
    """``p`` for rows ``x`` (shape ``(rows, n)``), per-row ``k`` and ``τ`` (``(rows, 1)``).

    ``sync=False``: no host read (for CUDA tensors without the Triton kernel): every row takes
    the sort-based exact solve, no data-dependent branch.  float32 rows are solved in float64
    (as the fused kernel solves them) when any spans more than ``_FLOAT32_SPAN`` τ or has a τ
    below float32's range, and always with ``sync=False``."""
    if x.dtype != torch.float64 and not sync:
        return _solve_rows(x.double(), k, tau, sync).to(x.dtype)
    finite, top, bottom = _finite_range(x)
    if x.dtype != torch.float64 and _needs_float64(top, bottom, tau):
        return _solve_rows(x.double(), k, tau, sync).to(x.dtype)
    k, tau = k.to(x.dtype), tau.to(x.dtype)
    n = x.shape[-1]
    live = finite.sum(-1, keepdim=True).to(x.dtype)
    positive = x == math.inf
    plus = positive.sum(-1, keepdim=True).to(x.dtype)
    top = torch.where(live > 0, top, 0.0)
    budget = k - plus  # what the finite entries share
    general = (budget > 0) & (budget < live)
    ref = _reference(x, finite, top, bottom, budget, general, tau, sync)
    w = _scaled(x, finite, ref, tau)
    lo = torch.where(finite, w, math.inf).amin(-1, keepdim=True) - 1
    lo = torch.where(general, lo, -1.0)
    hi = torch.where(general, w.amax(-1, keepdim=True), 0.0)
    safe_budget = torch.where(general, budget, 0.5 * torch.ones_like(budget))
    if not sync:
        t = _sorted_solve(torch.where(general, w, 0.0), safe_budget, lo) if n > 0 else hi
    elif n > 0 and bool(general.any()):
        t, done = _newton(torch.where(general, w, 0.0), safe_budget, lo, hi)
        if not bool(done[general].all()):
            todo = (~done & general).squeeze(-1)
            t[todo] = _sorted_solve(w[todo], safe_budget[todo], lo[todo])
    else:
        t = hi
    w, t = _polish(x, finite, ref, tau, t, safe_budget)
    p = (w - t).clamp(0, 1)
    p = torch.where(budget >= live, finite.to(x.dtype), p)
    p = torch.where(budget <= 0, 0.0, p)
    share = torch.where(plus > k, k / plus.clamp_min(1), 1.0)
    p = torch.where(positive, share, p)
    return torch.where(torch.isnan(x).any(-1, keepdim=True), math.nan, p)


def solve_sparse_topk(x: Tensor, k: Tensor | float, tau: Tensor | float) -> Tensor:
    """``p = clip((x − θ)/τ, 0, 1)`` with ``Σp = k`` along the last dimension of ``x``.

    ``x`` is float32 or float64; ``k`` and ``τ`` are numbers or tensors of shape
    ``x.shape[:-1]``.  Rows the fused kernel (when in use) hands back are solved here.
    """
    n = x.shape[-1]
    if x.numel() == 0:
        return torch.empty_like(x)
    rows = x.numel() // n
    if x.is_cuda:
        return _solve_cuda(x, k, tau)
    solved = _native.sparse_solve(x, k, tau)
    if solved is not None:
        p, status, unsolved = solved
        if not unsolved:
            return p
        todo = status != 0
        p = p.reshape(rows, n)
        x_rows = x.reshape(rows, n)
        p[todo] = _solve_rows(
            x_rows[todo], _per_row(k, rows, x)[todo], _per_row(tau, rows, x)[todo]
        )
        return p.reshape(x.shape)
    x_rows = x.reshape(rows, n)
    p = _solve_rows(x_rows, _per_row(k, rows, x), _per_row(tau, rows, x))
    return p.reshape(x.shape)


def _gpu_kernels():
    """:mod:`gradkit.topk._gpu` when Triton is usable (else ``None``)."""
    from . import _ops

    module = _ops._gpu_module()
    return module if module is not None and hasattr(module, "sparse_solve") else None


def _solve_cuda(x: Tensor, k: Tensor | float, tau: Tensor | float) -> Tensor:
    """The solve of a CUDA tensor without host synchronisation: the Triton kernel, else the
    sort-based exact solve in PyTorch ops for every row."""
    gpu = _gpu_kernels()
    if gpu is not None and gpu.supports(x):
        return gpu.sparse_solve(x, k, tau)
    return solve_sparse_nosync(x, k, tau)


def solve_sparse_nosync(x: Tensor, k: Tensor | float, tau: Tensor | float) -> Tensor:
    """:func:`solve_sparse_topk` in PyTorch ops with no host read on any device (every row by
    the sort-based exact solve): the CUDA fallback when Triton is absent.  float16/bfloat16
    are solved in float32."""
    n = x.shape[-1]
    if x.numel() == 0:
        return torch.empty_like(x)
    rows = x.numel() // n
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
    k, tau = _per_row(k, rows, wide), _per_row(tau, rows, wide)
    p = _solve_rows(wide.reshape(rows, n), k, tau, sync=False)
    return p.reshape(x.shape).to(x.dtype)


def fused_vjp(grad: Tensor, p: Tensor, tau: Tensor | float) -> tuple[Tensor, Tensor] | None:
    """The vjp by a fused kernel (the C kernel on the CPU, Triton on CUDA), or ``None``."""
    if p.is_cuda:
        gpu = _gpu_kernels()
        if gpu is not None and gpu.supports(p) and grad.shape == p.shape:
            return gpu.sparse_vjp(grad, p, tau)
        return None
    return _native.sparse_vjp(grad, p, tau)


def _free(p: Tensor) -> Tensor:
    return (p > 0) & (p < 1)


def _inverse(tau: Tensor | float, dtype: torch.dtype) -> Tensor | float:
    """``1/τ`` per slice (a column), capped at ``dtype``'s max/16 as the kernels cap it: a τ
    below the dtype's range gives large finite gradients on F, not inf or NaN."""
    cap = torch.finfo(dtype).max / 16
    if isinstance(tau, Tensor):
        return torch.reciprocal(tau.unsqueeze(-1)).clamp(max=cap).to(dtype)
    return min(1.0 / tau, cap)


def sparse_topk_vjp(grad: Tensor, p: Tensor, tau: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(∂L/∂x, ∂L/∂k)`` from ``g = ∂L/∂p``: ``1_F (g − mean_F g)/τ`` and ``mean_F g``.

    ``τ`` is a number or a tensor of shape ``p.shape[:-1]``.  Out of place, so differentiable
    (double backward).  A NaN slice gets a NaN gradient.
    """
    free = _free(p)
    count = free.sum(-1, keepdim=True).clamp_min(1).to(p.dtype)
    mean = torch.where(free, grad, 0.0).sum(-1, keepdim=True) / count
    grad_x = torch.where(free, (grad - mean) * _inverse(tau, p.dtype), 0.0)
    grad_x = torch.where(torch.isnan(p), p, grad_x)
    return grad_x, mean.squeeze(-1)


def temperature_grad(grad_x: Tensor, p: Tensor) -> Tensor:
    """``∂L/∂τ`` per slice, ``Σ_F g_i (mean_F p − p_i)/τ``, which equals ``−Σ_i (∂L/∂x_i) p_i``."""
    return -(grad_x * torch.nan_to_num(p)).sum(-1)


def sparse_topk_jvp(
    p: Tensor,
    tau: Tensor | float,
    x_tangent: Tensor | None,
    k_tangent: Tensor | None,
    tau_tangent: Tensor | None,
) -> Tensor:
    """The forward-mode derivative: ``ṗ = J ẋ + 1_F/|F| k̇ + 1_F (mean_F p − p)/τ τ̇``."""
    free = _free(p)
    count = free.sum(-1, keepdim=True).clamp_min(1).to(p.dtype)
    tangent = torch.zeros_like(p)
    if x_tangent is not None:
        tangent = tangent + sparse_topk_vjp(x_tangent.to(p.dtype), p, tau)[0]
    if k_tangent is not None:
        tangent = tangent + torch.where(free, k_tangent.to(p.dtype).unsqueeze(-1) / count, 0.0)
    if tau_tangent is not None and isinstance(tau, Tensor):
        mean_p = torch.where(free, p, 0.0).sum(-1, keepdim=True) / count
        rate = torch.where(free, mean_p - p, 0.0) / tau.unsqueeze(-1)
        tangent = tangent + rate * tau_tangent.to(p.dtype).unsqueeze(-1)
    return tangent
