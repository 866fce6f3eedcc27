"""The soft top-k solve with PyTorch ops and no host synchronisation (CUDA-graph capturable).

:func:`solve_nosync` solves what :func:`gradkit.topk._solve.solve_soft_topk` solves, with the
same semantics and the same safeguarded model-based Newton iteration, but takes no decision on
the host: every per-slice choice is a ``torch.where`` mask, and the iteration runs a fixed
number of passes (``NEWTON_STEPS + bits + 2``: 46 in float32, 78 in float64), slices that
have converged simply keeping their threshold.  No ``.item()``, ``.tolist()``, ``bool(tensor)``
or data-dependent shape anywhere, so on a GPU the host never waits and a call can be captured
in a CUDA graph.  It is the PyTorch counterpart of the Triton kernel
(:mod:`gradkit.topk._gpu_kernels`), step for step, for the CUDA tensors that kernel does not
take; it is dearer than the host-synchronising path on a CPU (it never stops early).

Per slice (see :mod:`gradkit.topk._solve` for the math): the finite entries share
``k_live = clamp(k − m₊, 0, n_live)`` (``m₊`` entries at ``+inf`` take ``min(k/m₊, 1)`` each);
the slice is solved in ``w = s·a·(x − c)`` (``a = 1/τ`` capped so that ``|w| ≤ max/16``,
``s = −1`` for ``k_live > n_live/2``, solved as the complement, ``c`` a centre near the root)
for ``Σσ(w − t) = budget`` inside the bracket ``[w_min − logit, w_max − logit]``, from the
log-sum-exp start or, for slices spanning many units of τ, from the middle of a bracket
narrowed by multisection (``F`` at 8 points per pass, 4 passes); the kernel's module
docstring (:mod:`gradkit.topk._gpu_kernels`) has the details.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["solve_nosync"]

# Keep these equal to the kernel's (gradkit.topk._gpu).
NEWTON_STEPS = 12
_WIDE_BRACKET = 64.0
_WIDE_START = 16.0
_PROBES = 8
_SECTIONS = 4


def _iterations(dtype: torch.dtype) -> int:
    return NEWTON_STEPS + torch.finfo(dtype).bits + 2


def _per_slice(value, x: Tensor) -> Tensor:
    """A number or a tensor broadcastable to ``x.shape[:-1]``, as a ``(..., 1)`` tensor."""
    if isinstance(value, Tensor):
        value = value.detach().to(device=x.device, dtype=x.dtype)
        return value.expand(x.shape[:-1]).unsqueeze(-1)
    return torch.full((1,) * x.dim(), float(value), dtype=x.dtype, device=x.device)


def _sigmoid_pair(z: Tensor) -> tuple[Tensor, Tensor]:
    """``σ(z)`` and ``1 − σ(z)``, both to full relative accuracy."""
    e = torch.exp(-z.abs())
    r = 1.0 / (1.0 + e)
    positive = z >= 0
    return torch.where(positive, r, e * r), torch.where(positive, e * r, r)


def _ordered_midpoint(lo: Tensor, hi: Tensor) -> Tensor:
    """Midpoint of ``[lo, hi]`` in the floating-point ordering."""
    int_dtype = torch.int64 if lo.dtype == torch.float64 else torch.int32
    int_min = torch.iinfo(int_dtype).min

    def key(t: Tensor) -> Tensor:
        bits = t.contiguous().view(int_dtype)
        return torch.where(bits >= 0, bits, int_min - bits)

    key_lo, key_hi = key(lo), key(hi)
    mid = (key_lo >> 1) + (key_hi >> 1) + (key_lo & key_hi & 1)
    return torch.where(mid >= 0, mid, int_min - mid).view(lo.dtype)


def _adjacent(lo: Tensor, hi: Tensor) -> Tensor:
    """No float lies strictly between ``lo`` and ``hi``: the bracket cannot shrink further."""
    middle = 0.5 * lo + 0.5 * hi
    return (middle <= lo) | (middle >= hi)


def _two_tail_step(excess: Tensor, slope: Tensor, upper: Tensor) -> Tensor:
    """δ of the two-tail model (see ``_solve._two_tail_step``); NaN/±inf when degenerate."""
    a = torch.minimum(upper.clamp(min=0.0), slope)
    b = slope - a
    c = excess + a - b
    root = torch.sqrt(c * c + 4.0 * a * b)
    upward = c >= 0
    numerator = torch.where(upward, c + root, 2.0 * b)
    denominator = torch.where(upward, 2.0 * a, root - c)
    return torch.log(numerator) - torch.log(denominator)


class _Slices:
    """Per-slice quantities of the problem (every tensor ``(..., 1)``)."""

    def __init__(self, x: Tensor, k: Tensor, inv_tau: Tensor):
        eps_limit = torch.finfo(x.dtype).max / 16
        self.live = torch.isfinite(x)
        self.positive = x == math.inf
        self.nan = torch.isnan(x).any(dim=-1, keepdim=True)
        n_live = self.live.sum(dim=-1, keepdim=True).to(x.dtype)
        n_positive = self.positive.sum(dim=-1, keepdim=True).to(x.dtype)
        x_max = torch.where(self.live, x, -math.inf).amax(dim=-1, keepdim=True)
        x_min = torch.where(self.live, x, math.inf).amin(dim=-1, keepdim=True)
        self.k_live = torch.minimum((k - n_positive).clamp(min=0.0), n_live)
        self.n_live = n_live
        self.trivial = (self.k_live <= 0) | (self.k_live >= n_live)
        self.tied = (x_max == x_min) & ~self.trivial
        self.solving = ~self.nan & ~self.trivial & ~self.tied
        self.share = torch.clamp(k / n_positive.clamp(min=1.0), max=1.0)
        # a = 1/τ, capped so that |w| ≤ max/16 (every later difference stays finite).
        # w relative to a centre near the root (as the kernel): the slice's maximum for slices
        # spanning at most _WIDE_START units, else 0 until the bracket is that narrow.
        inv_tau = inv_tau.clamp(max=eps_limit)
        spread = torch.where(self.solving, x_max - x_min, 0.0)
        self.centred = self.solving & (spread * inv_tau <= _WIDE_START)
        self.center = torch.where(self.centred, x_max, 0.0)
        magnitude = torch.where(self.centred, spread, torch.maximum(x_max.abs(), x_min.abs()))
        capped = magnitude * inv_tau > eps_limit
        scale = torch.where(capped, eps_limit / torch.where(capped, magnitude, 1.0), inv_tau)
        self.flip = self.k_live > 0.5 * n_live
        self.factor = torch.where(self.solving, torch.where(self.flip, -scale, scale), 0.0)
        flipped_budget = torch.where(self.flip, n_live - self.k_live, self.k_live)
        self.budget = torch.where(self.solving, flipped_budget, 1.0)
        n_solve = torch.where(self.solving, n_live, 2.0)
        u_min = torch.where(self.solving, (x_min - self.center) * scale, 0.0)
        u_max = torch.where(self.solving, (x_max - self.center) * scale, 0.0)
        self.w_min = torch.where(self.flip, -u_max, u_min)
        self.w_max = torch.where(self.flip, -u_min, u_max)
        self.logit = torch.log(self.budget) - torch.log(n_solve - self.budget)


def _evaluate(w: Tensor, live: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Σp``, ``Σv`` and ``Σp·v`` at ``t`` over the finite entries."""
    p, q = _sigmoid_pair(w - t)
    p = torch.where(live, p, 0.0)
    v = p * q
    return p.sum(-1, keepdim=True), v.sum(-1, keepdim=True), (p * v).sum(-1, keepdim=True)


def _section(w: Tensor, s: _Slices, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """One multisection pass on the slices whose bracket is wider than ``_WIDE_START``: ``F``
    at ``_PROBES`` evenly spaced points, the bracket shrunk to the two around the root."""
    wide = s.solving & (hi - lo > _WIDE_START)
    new_lo, new_hi = lo, hi
    for j in range(1, _PROBES + 1):
        probe = lo + (hi - lo) * (j / (_PROBES + 1))
        mass = torch.where(s.live, _sigmoid_pair(w - probe)[0], 0.0).sum(-1, keepdim=True)
        new_lo = torch.where(mass > s.budget, torch.maximum(new_lo, probe), new_lo)
        new_hi = torch.where(mass < s.budget, torch.minimum(new_hi, probe), new_hi)
    return torch.where(wide, new_lo, lo), torch.where(wide, new_hi, hi)


def _start(w: Tensor, s: _Slices) -> tuple[Tensor, Tensor, Tensor]:
    """The starting point ``t`` and bracket ``[lo, hi]`` of every slice."""
    exp_sum = torch.where(s.live, torch.exp(w - s.w_max), 0.0).sum(-1, keepdim=True)
    lo = s.w_min - s.logit
    log_start = s.w_max + torch.log(exp_sum.clamp(min=1.0)) - torch.log(s.budget)
    hi = torch.minimum(s.w_max - s.logit, log_start)
    # Slices spread over many units (small τ): narrow the bracket by multisection, start
    # midway (the log-sum-exp start lies plateaus of saturated entries from the root).
    sectioned = s.solving & (hi - lo > _WIDE_START)
    for _ in range(_SECTIONS):
        lo, hi = _section(w, s, lo, hi)
    return torch.where(sectioned, 0.5 * lo + 0.5 * hi, hi), lo, hi


def _recentre(x: Tensor, s: _Slices, t: Tensor, lo: Tensor, hi: Tensor, move: Tensor):
    """Move the centre of the ``move`` slices to ``t``; returns the new ``w``, the shifted
    ``t`` and bracket (widened by the rounding of the shift) and which centres moved."""
    center = torch.where(move, s.center + t / torch.where(move, s.factor, 1.0), s.center)
    moved = center != s.center
    shift = (center - s.center) * s.factor
    slack = 8 * torch.finfo(x.dtype).eps * shift.abs()
    s.center = center
    w = (torch.where(s.live, x, center) - center) * s.factor
    return w, t - shift, lo - shift - slack, hi - shift + slack, moved


def _iterate(x: Tensor, w: Tensor, s: _Slices, t: Tensor, lo: Tensor, hi: Tensor):
    """The fixed-count safeguarded Newton iteration; returns ``w``, ``t``, the bracket and
    ``F − k``.  A slice whose next ``t`` lies more than ``_WIDE_BRACKET`` units from its
    centre moves the centre there (as the kernel's ``_iterate``), its Newton steps counted
    afresh."""
    eps = torch.finfo(w.dtype).eps
    tol_mass = 8 * eps * s.budget.clamp(min=1.0)
    active = s.solving
    excess = torch.zeros_like(t)
    newton_from = torch.zeros_like(t)
    for iteration in range(_iterations(w.dtype)):
        mass, slope, upper = _evaluate(w, s.live, t)
        excess = torch.where(active, mass - s.budget, excess)
        met = excess.abs() <= tol_mass
        lo = torch.where(active & (excess > 0), t, lo)
        hi = torch.where(active & (excess < 0), t, hi)
        step = _two_tail_step(excess, slope, upper)
        t_newton = t + step
        newton_ok = (t_newton > lo) & (t_newton < hi) & (iteration - newton_from < NEWTON_STEPS)
        resolution = eps * t.abs().clamp(min=1.0)
        small = newton_ok & ((step.abs() * step * step <= 4 * resolution) | (t_newton == t))
        arithmetic = 0.5 * lo + 0.5 * hi
        collapsed = ~newton_ok & _adjacent(lo, hi)
        midpoint = torch.where(hi - lo > _WIDE_BRACKET, _ordered_midpoint(lo, hi), arithmetic)
        t_next = torch.where(newton_ok, t_newton, torch.where(collapsed, t, midpoint))
        t_next = torch.where(met, t, t_next)
        located = (hi - lo <= _WIDE_BRACKET) | met | small | collapsed
        far = t_next.abs() > _WIDE_BRACKET
        far = active & located & far & (8 * eps * t_next.abs() <= _WIDE_BRACKET)
        w, t_next, lo, hi, moved = _recentre(x, s, t_next, lo, hi, far)
        newton_from = torch.where(moved, iteration + 1.0, newton_from)
        t = torch.where(active, t_next, t)
        active = active & ((~met & ~small & ~collapsed) | moved)
    return w, t, lo, hi, excess


def _membership(w: Tensor, t: Tensor, flip: Tensor) -> Tensor:
    p, q = _sigmoid_pair(w - t)
    return torch.where(flip, q, p)


def _blend_weight(w: Tensor, s: _Slices, t_lo: Tensor, t_hi: Tensor) -> Tensor:
    """Weight of the ``lo`` end so that the blend of the two ends meets the budget."""
    mass_lo = torch.where(s.live, _sigmoid_pair(w - t_lo)[0], 0.0).sum(-1, keepdim=True)
    mass_hi = torch.where(s.live, _sigmoid_pair(w - t_hi)[0], 0.0).sum(-1, keepdim=True)
    gap = mass_lo - mass_hi
    return ((s.budget - mass_hi) / torch.where(gap != 0, gap, 1.0)).clamp(0.0, 1.0)


@torch.no_grad()
def solve_nosync(x: Tensor, k: float | Tensor, inv_tau: float | Tensor) -> Tensor:
    """``p = σ((x − θ)/τ)`` with ``Σ p = k`` along the last dimension, without host syncs.

    Same interface and semantics as :func:`gradkit.topk._gpu.solve`: ``x`` floating
    ``(..., n)`` (float16/bfloat16 solved in float32, returned in ``x``'s dtype); ``k`` in
    ``[0, n]`` and ``inv_tau = 1/τ > 0`` numbers or tensors broadcastable to
    ``x.shape[:-1]`` (not validated here: that would need a host read).  ``−inf`` entries get
    0, ``+inf`` entries 1 (``k/m`` each when ``m > k`` of them), a slice with a NaN is NaN,
    exact ties ``k/n``, ``k = 0`` zeros, ``k = n`` ones.

    Example::

        >>> x = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
        >>> solve_nosync(x, 2, 2.0)
        tensor([[0.9566, 0.2874, 0.7487, 0.0073]])
    """
    out_dtype = x.dtype
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    if x.numel() == 0:
        return torch.zeros_like(x, dtype=out_dtype)
    s = _Slices(x, _per_slice(k, x), _per_slice(inv_tau, x))
    w = (torch.where(s.live, x, s.center) - s.center) * s.factor
    t, lo, hi = _start(w, s)
    narrow = s.solving & ~s.centred & (hi - lo <= _WIDE_START)
    w, t, lo, hi, _ = _recentre(x, s, t, lo, hi, narrow)
    w, t, lo, hi, excess = _iterate(x, w, s, t, lo, hi)
    eps = torch.finfo(dtype).eps
    tol_mass = 8 * eps * s.budget.clamp(min=1.0)
    # A bracket collapsed onto a jump of F the dtype cannot resolve: blend its two ends.
    collapsed = s.solving & _adjacent(lo, hi) & (excess.abs() > tol_mass)
    t_lo = torch.where(collapsed, lo, t)
    t_hi = torch.where(collapsed, hi, t)
    weight = torch.where(collapsed, _blend_weight(w, s, t_lo, t_hi), 1.0)
    value = weight * _membership(w, t_lo, s.flip) + (1.0 - weight) * _membership(w, t_hi, s.flip)
    fixed = torch.where(s.k_live > 0, 1.0, 0.0)
    fixed = torch.where(s.tied, s.k_live / s.n_live.clamp(min=1.0), fixed).to(dtype)
    value = torch.where(s.solving, value, fixed)
    value = torch.where(s.live, value, torch.where(s.positive, s.share, 0.0))
    value = torch.where(s.nan, math.nan, value)
    return value.to(out_dtype)
