"""The math behind :func:`gradkit.soft_topk`: the threshold solve and the closed-form Jacobian.

Everything here works on the last dimension of a tensor of shape ``(..., n)``; the public
wrapper moves the user's ``dim`` there.  Notation (per slice):

* ``z_i = (x_i − θ)/τ``, ``p_i = σ(z_i)``, ``v_i = σ'(z_i) = p_i (1 − p_i)``;
* ``F(θ) = Σ_i p_i``, strictly decreasing in ``θ`` with ``F'(θ) = −Σ_i v_i / τ``;
* the threshold ``θ*`` solves ``F(θ*) = k``.

Solve.  Each slice is solved in the dimensionless coordinates ``w_i = s·x_i·a`` with
``a = 1/τ`` (capped so that ``|w| ≤ max/16``: no later difference can overflow) and a sign
``s = −1`` for the slices with ``k > n/2``, which are solved as the complementary problem
``Σ_i σ(−x_i/τ − t) = n − k`` (so every solve has ``k ≤ n/2``).  No re-centring: near the root,
``w_i − t`` keeps the full resolution of the entries that matter, however far the others are.
The root lies in the bracket

    ``[w_min − logit(k/n),  w_max − logit(k/n)]``

(at the left end every ``p_i ≥ k/n``; at the right end every ``p_i ≤ k/n``).  The iteration
takes model-based Newton steps: with ``a = Σ p·v`` (slope of the
entries above ``t``) and ``b = Σ (1 − p)·v`` (below), it solves

    ``F(t + δ) ≈ F(t) − a·(eᵟ − 1) + b·(e⁻ᵟ − 1) = k``

exactly for ``δ`` (a quadratic in ``eᵟ``).  The model has ``F``'s value, slope and curvature
at ``δ = 0`` (``F'' = Σ v(1 − 2p) = b − a``), so near the root it converges cubically, like
Halley's method, and it is exact when every entry sits in an exponential tail
(``σ(z) ≈ eᶻ`` or ``1 − σ(z) ≈ e⁻ᶻ``), so the plateaus that saturated entries create cost one
step instead of dozens.  Each pass first forms the cheaper one-tail step (all of the slope on
one side, ``δ = ±log(1 + |F − k|/Σv)``, Newton's to second order, never overshooting) and pays
the extra moment ``a`` only for the slices that step does not finish.  The start is the
log-sum-exp bound ``t₀ = LSE(w) − log k`` (``σ(z) < eᶻ`` makes it a point right of the root;
it is exact in the lower tail, so small budgets often need a single evaluation).  When a
slice spans many units of ``τ`` (small temperatures) most entries saturate and that bound
lands many plateaus away from the root; there the start comes from order statistics instead
(a partial sort of ``⌊k⌋ + 1`` values: midway between the ``k``-th and ``(k+1)``-th largest
for an integer budget), which is nearly exact.

Two phases.  The *fast* phase steps every slice at once with one or two cheap host syncs per
pass; a slice is finished once its mass is within ``8·eps·max(k, 1)`` of ``k``, or once its
step is so small that the error left after it is below the resolution ``eps·max(|t|, 1)`` of
``t`` (``δ² ≤ eps·|t|`` for the one-tail step, whose error is ≲ δ²; ``|δ|³ ≤ 4·eps·|t|`` for
the two-tail step, whose error is ≲ |δ|³/4).  Every decision is per slice, so a slice's
threshold does not depend on what else is in the batch.  If a step is not finite (a
saturated slice), or after ``_FAST_STEPS`` passes, the *careful* phase takes over with
per-slice bookkeeping: every evaluation shrinks the bracket, a step that leaves it is
replaced by a bisection, which splits the bracket in half of its *floating-point ordering*
when it is wide (a bracket spanning 1e−30..1e30 is cut in ≤ 64 steps, not 200),
arithmetically otherwise, and after ``_NEWTON_STEPS`` passes only bisection is used — so the
solve ends after at most ``_NEWTON_STEPS + bits + 2`` passes (78 in float64, 46 in float32)
whatever the data.  Typical inputs take 1–3 passes at τ = 1 and 3–6 at τ = 0.1 … 0.001.  A
bracket that collapses onto a jump of ``F`` the dtype cannot resolve (entries tied at the
resolution limit straddle the root) is resolved by blending its two ends so that the budget
is met exactly.

Cost per pass: ``w − t``, ``σ``, ``Σp`` and ``‖p‖²`` (four memory passes, one reused buffer:
on CPU a fresh large allocation costs about as much as a pass), plus ``Σ p·v`` (two, in
place) for the slices the one-tail step leaves.

The fused CPU kernel (:mod:`gradkit.topk._native`) runs the same iteration one row at a
time in cache, for float32/float64 on CPU (any budgets; masked, ``+inf`` and NaN entries
included).  The rows it leaves (``|x/τ|`` beyond ``max/16``, brackets collapsed onto a jump
of ``F``, no memory), and every other case, are solved here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _native

__all__ = ["soft_topk_vjp", "solve_soft_topk"]

# Newton steps allowed before the solve switches to pure bisection (which cannot stall).
_NEWTON_STEPS = 12
# Passes of the fast phase (scalar bookkeeping) before the careful phase takes over.
_FAST_STEPS = 6
# Newton-type steps that use the one-tail model before the (one pass dearer) two-tail model.
_ONE_TAIL_STEPS = 2
# Slices spread over more than this many units of τ start from order statistics (a partial
# sort) instead of the log-sum-exp bound, which small temperatures make far from the root.
_SPREAD_FOR_ORDER_START = 16.0
#: Slices spanning more than this many τ are solved about a centre near the root (their ⌈k⌉-th
#: largest finite entry), slices reaching further from 0 about their largest entry: about 0,
#: w = x/τ keeps only eps·|x|/τ of the root's digits (2⁻¹⁷ in float32, 2⁻⁴⁶ in float64 here).
_CENTRE_SPAN = {torch.float32: 2.0**6, torch.float64: 2.0**6}
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


def _two_tail_step(excess: Tensor, slope: Tensor, upper_slope: Tensor) -> Tensor:
    """Shift δ solving the two-tail model ``F(t + δ) ≈ F − a(eᵟ − 1) + b(e⁻ᵟ − 1) = k``.

    ``a = Σ p·v`` and ``b = Σ (1 − p)·v`` split the slope ``Σ v = a + b`` between the entries
    above ``t`` (which leave the top exponentially in δ, ``1 − σ(z) ≈ e⁻ᶻ``) and those below it
    (which enter it exponentially, ``σ(z) ≈ eᶻ``).  The model has the exact value and slope at
    ``δ = 0``, so near the root the step is Newton's; when every entry sits in a tail it is
    exact, so plateaus of saturated entries cost one step, not dozens.
    """
    a = torch.clamp(upper_slope, min=0.0).clamp_(max=slope)
    b = slope - a
    # With y = eᵟ:  a·y² − c·y − b = 0,  c = F − k + a − b;  take the positive root stably:
    # y = (c + r)/(2a) for c ≥ 0 and y = 2b/(r − c) for c < 0, with r = √(c² + 4ab).
    c = (excess + a).sub_(b)
    root = torch.addcmul(c * c, a, b, value=4.0).sqrt_()
    upward = c >= 0
    numerator = torch.where(upward, c + root, 2 * b)
    denominator = torch.where(upward, 2 * a, root - c)
    return torch.log(numerator).sub_(torch.log(denominator))


def _log(value: Tensor | float) -> Tensor | float:
    return torch.log(value) if isinstance(value, Tensor) else math.log(value)


def _evaluate(w: Tensor, t: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """One solver pass: ``p ← σ(w − t)`` in place; returns ``F = Σ p`` and ``Σ v = Σ p(1 − p)``.

    ``Σ p(1 − p) = Σp − Σp²`` (one fused norm pass); after the flip ``k ≤ n/2``, so the
    cancellation only hurts saturated slices, where bisection takes over.
    """
    torch.sigmoid_(torch.sub(w, t, out=p))
    mass = p.sum(dim=-1, keepdim=True)
    slope = mass - torch.linalg.vector_norm(p, dim=-1, keepdim=True).square_()
    return mass, slope


def _one_tail_step(excess: Tensor, distance: Tensor, slope: Tensor) -> Tensor:
    """``δ = ±log(1 + |F − k|/Σv)``: the one-tail model (all of the slope on the side where the
    root lies) is exact when every entry sits in that tail, and it never overshoots the root."""
    return torch.log1p(distance / slope).copysign_(excess)


def _upper_slope(p: Tensor, reuse_p: bool) -> Tensor:
    """``a = Σ p·v``, the part of the slope that belongs to the entries above ``t``.

    ``reuse_p=True`` overwrites ``p`` (the caller no longer needs it) instead of filling a
    fresh buffer, which on CPU costs about as much as the pass itself.
    """
    if reuse_p:
        p_times_v = torch.ops.aten.sigmoid_backward.grad_input(p, p, grad_input=p)
    else:
        p_times_v = torch.ops.aten.sigmoid_backward(p, p)
    return p_times_v.sum(dim=-1, keepdim=True)


def _newton_step(iteration: int, excess: Tensor, distance: Tensor, slope: Tensor, p: Tensor):
    """The careful phase's model-based Newton step from ``t`` (see the module docstring)."""
    if iteration < _ONE_TAIL_STEPS:
        return _one_tail_step(excess, distance, slope)
    # Slow slices (staircases of saturated entries): pay one more pass for Σ p·v.
    return _two_tail_step(excess, slope, _upper_slope(p, reuse_p=False))


def _solve_shift(
    w: Tensor,
    k: Tensor | float,
    n: Tensor | float,
    w_min: Tensor,
    w_max: Tensor,
    done: Tensor | None,
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, bool]:
    """Solve ``Σ_i σ(w_i − t) = k`` for ``t`` (shape ``(..., 1)``) on the slices not ``done``.

    ``w`` may hold ``−inf`` (entries that take no part); ``0 < k ≤ n/2`` on live slices and
    ``w_min ≤ w_i ≤ w_max``.  ``k``, ``n`` are numbers (one budget for every slice, the common
    case, solved with the fewest tensor ops) or ``(..., 1)`` tensors.  Returns ``t``, the final
    bracket ``lo ≤ t ≤ hi``, a mask of the slices whose bracket collapsed onto a jump of ``F``
    (ties at the resolution limit straddling the root; ``None`` when there are none), the
    work buffer, and whether that buffer holds ``σ(w − t)`` at the returned ``t``.
    ``start`` (shape ``(..., 1)``), when given, replaces the log-sum-exp starting point.
    """
    eps = torch.finfo(w.dtype).eps
    if done is not None:  # dead slices get a harmless k = 1 of n = 2
        one = torch.ones_like(k)
        k = torch.where(done, one, k)
        n = torch.where(done, 2 * one, n)
    log_k = _log(k)
    logit_k = log_k - _log(n - k)
    lo = w_min - logit_k
    hi = w_max - logit_k
    tol_mass = 8 * eps * (torch.clamp(k, min=1.0) if isinstance(k, Tensor) else max(k, 1.0))
    p = torch.empty_like(w)
    if start is None:
        # Start from the log-sum-exp bound: σ(z) < eᶻ, so F(t) < Σ e^{w − t} = k at
        # t = LSE(w) − log k, a point right of the root and exact in the lower tail.
        exp_sum = torch.sub(w, w_max, out=p).exp_().sum(dim=-1, keepdim=True)
        hi = torch.minimum(hi, w_max + torch.log(exp_sum) - log_k)
        t = hi
    else:
        t = torch.minimum(torch.maximum(start, lo), hi)

    # Fast phase: model steps for all slices at once, one or two cheap host syncs per pass,
    # no bracket bookkeeping beyond clamping t into the starting bracket.  Every decision is
    # per slice, so a slice's result does not depend on the rest of the batch.  A slice that
    # does not converge in a few passes sends the solve on to the careful phase.
    frozen = done
    passes = 0
    while passes < _FAST_STEPS:
        passes += 1
        mass, slope = _evaluate(w, t, p)
        excess = mass - k
        distance = excess.abs()
        solved = distance <= tol_mass
        if frozen is not None:
            solved |= frozen
        # The one-tail step first (no extra pass): it is Newton's to second order, so its
        # error after the step is ≲ δ²/2 (the model) + δ²/2 (Newton's, |F''/F'| ≤ 1), and a
        # step with δ² below the resolution eps·|t| of t finishes the slice.  Solved slices
        # stay put (a saturated one would divide 0 by 0).
        step = torch.where(solved, 0.0, _one_tail_step(excess, distance, slope))
        resolution = t.abs().clamp_(min=1.0).mul_(eps)
        finished = (step.square() <= resolution).logical_or_(solved)
        if bool(finished.all()):
            if bool(solved.all()):
                return t, lo, hi, None, p, True
            return torch.clamp(t + step, lo, hi), lo, hi, None, p, False
        # The other slices take the two-tail step: one more pass (Σ p·v, computed in p, no
        # longer needed), and the model then also has F's curvature, so its error after a
        # step is ≲ (Σv²/Σv)·|δ|³ ≤ |δ|³/4 (cubic convergence).
        two_tail_step = _two_tail_step(excess, slope, _upper_slope(p, reuse_p=True))
        step = torch.where(finished, step, two_tail_step)
        finished |= two_tail_step.abs().pow_(3) <= resolution.mul_(4.0)
        # (an infinite step is clamped to the bracket; NaN means a degenerate model)
        t = torch.clamp(t + step, lo, hi)
        all_finished, all_finite = torch.stack((finished.all(), t.isfinite().all())).tolist()
        if not all_finite:
            t = torch.where(t.isfinite(), t, hi)
            break  # the careful phase bisects the degenerate slices
        if all_finished:
            return t, lo, hi, None, p, False
        frozen = finished
    if frozen is None:
        frozen = torch.zeros_like(t, dtype=torch.bool)
    return _solve_shift_careful(w, k, lo, hi, t, frozen, tol_mass, p, passes)


def _solve_shift_careful(
    w: Tensor,
    k: Tensor | float,
    lo: Tensor,
    hi: Tensor,
    t: Tensor,
    done: Tensor,
    tol_mass: Tensor | float,
    p: Tensor,
    first_iteration: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, bool]:
    """The careful phase of :func:`_solve_shift`: per-slice bookkeeping, bisection fallback."""
    eps = torch.finfo(w.dtype).eps
    started = done
    # A zero-width bracket (all entries tied) is solved exactly by either end.
    done = done | (hi - lo <= (4 * eps) * torch.clamp(hi.abs(), min=1.0))
    excess = torch.zeros_like(t)
    move = done
    last = _NEWTON_STEPS + 8 * w.element_size() + 2
    for iteration in range(first_iteration, max(last, first_iteration + 1)):
        mass, slope = _evaluate(w, t, p)
        excess = mass - k
        distance = excess.abs()
        lo = torch.where(excess > 0, t, lo)
        hi = torch.where(excess < 0, t, hi)
        step = _newton_step(iteration, excess, distance, slope, p)
        t_newton = t + step
        newton_ok = (t_newton > lo) & (t_newton < hi)
        if iteration >= _NEWTON_STEPS:
            newton_ok.zero_()
        width_tol = t.abs().clamp_(min=1.0).mul_(4 * eps)
        stepped = newton_ok & (step.square_() <= width_tol)
        # Slices whose mass already meets the budget keep t, so p stays reusable.
        keep = (
            done
            | (distance <= tol_mass)
            | (t_newton == t)  # below the resolution of t: solved (see the fast phase)
            | ((hi - lo <= width_tol) & ~newton_ok)
        )
        done = keep | stepped
        move = ~keep
        if bool((move & ~newton_ok).any()):
            t_newton = torch.where(newton_ok, t_newton, _midpoint(lo, hi))
        t = torch.where(move, t_newton, t)
        if bool(done.all()):
            break
    moved = bool(move.any())
    width_tol = (4 * eps) * torch.clamp(t.abs(), min=1.0)
    collapsed = ~started & (hi - lo <= width_tol) & (excess.abs() > tol_mass)
    return t, lo, hi, collapsed, p, not moved


def _blend_collapsed(membership, lo, hi, k, collapsed: Tensor | None, p: Tensor) -> Tensor:
    """Where the root sits on a jump of ``F`` that the dtype cannot resolve (entries tied at
    the resolution limit straddle θ), blend the two bracket ends so the budget is met: that
    shares the remainder equally among those ties."""
    if collapsed is None or not bool(collapsed.any()):
        return p
    p_lo, p_hi = membership(lo), membership(hi)
    mass_lo = p_lo.sum(dim=-1, keepdim=True)
    mass_hi = p_hi.sum(dim=-1, keepdim=True)
    gap = mass_lo - mass_hi
    weight = torch.clamp((k - mass_hi) / torch.where(gap != 0, gap, 1.0), 0.0, 1.0)
    return torch.where(collapsed, weight * p_lo + (1 - weight) * p_hi, p)


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
    if torch.is_grad_enabled():  # (an autograd.Function's forward runs without: no block)
        with torch.no_grad():
            return solve_soft_topk(x, k, temperature)
    out_dtype = x.dtype
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    x = x if out_dtype == dtype else x.to(dtype)
    if x.numel() == 0:
        return torch.zeros_like(x, dtype=out_dtype)
    # Work in w = x/τ without re-centring: near the root, w_i − t keeps the full resolution
    # of the entries that matter, however far away the others are.  1/τ is capped so that
    # |w| ≤ max/16 and every later difference stays finite; the cap only binds when
    # τ < |x|·2⁻¹²⁴ (float32), a selection that is hard anyway.
    inv_tau = min(1.0 / temperature, torch.finfo(dtype).max / 16)
    shared = not isinstance(k, Tensor)
    if not shared or 0 < float(k) < x.shape[-1]:
        # The fused CPU kernel, when built and applicable (see _native.py); the rows it
        # leaves (status ≠ 0: |x/τ| beyond max/16, a collapsed bracket, no memory) are
        # solved below, as are all other cases.
        native = _native.solve(x, float(k) if shared else k.expand(x.shape[:-1]), inv_tau)
        if native is not None:
            p, row_status, unsolved = native
            if unsolved == row_status.numel():  # (e.g. a small τ everywhere): no gather/scatter
                return _solve_torch(x, k, inv_tau).to(out_dtype)
            if unsolved:
                left = (row_status != 0).view(x.shape[:-1])
                k_left = k if shared else k.expand(x.shape[:-1])[left]
                p[left] = _solve_torch(x[left], k_left, inv_tau)
            return p if p.dtype == out_dtype else p.to(out_dtype)
    return _solve_torch(x, k, inv_tau).to(out_dtype)


def _solve_torch(x: Tensor, k: Tensor | float, inv_tau: float) -> Tensor:
    """:func:`solve_soft_topk` with PyTorch ops only (``x`` float32 or float64, not empty;
    ``inv_tau`` = 1/τ capped at ``max/16``), in ``x``'s dtype."""
    n_total = x.shape[-1]
    limit = torch.finfo(x.dtype).max / 16
    # (amin + amax is several times faster than aminmax on CPU)
    x_min = x.amin(dim=-1, keepdim=True)
    x_max = x.amax(dim=-1, keepdim=True)
    if _needs_centre(x_min, x_max, inv_tau):
        x = _centred(x, k, inv_tau)
        x_min = x.amin(dim=-1, keepdim=True)
        x_max = x.amax(dim=-1, keepdim=True)
    if not isinstance(k, Tensor):
        # One host sync for every check of the common path.  The spread x_max − x_min is
        # finite exactly when the slice is (NaN and ±inf propagate into it; max reductions
        # propagate NaN); x_max = x_min implies a zero spread (the converse is checked below).
        spread = x_max - x_min
        spread_max, spread_min, top, bottom = torch.stack(
            (spread.amax(), spread.amin(), x_max.amax(), x_min.amin())
        ).tolist()
        if math.isfinite(spread_max):
            k = float(k)
            if k in (0.0, float(n_total)):
                return torch.full_like(x, 0.0 if k == 0 else 1.0)
            if max(abs(top), abs(bottom)) * inv_tau <= limit:
                maybe_tied = spread_min == 0
                return _solve_shared_budget(
                    x, k, inv_tau, x_min, x_max, maybe_tied, spread_max * inv_tau
                )
    return _solve_general(x, k, inv_tau, x_min, x_max)


def _needs_centre(x_min: Tensor, x_max: Tensor, inv_tau: float) -> bool:
    """Whether some slice may reach beyond ``_CENTRE_SPAN`` τ from 0 (a non-finite bound, from
    ±inf or NaN entries, may: :func:`_centred` then looks at the finite entries)."""
    reach = torch.maximum(x_max.abs(), x_min.abs()) * inv_tau
    return bool((reach > _CENTRE_SPAN[x_min.dtype]).any() | (reach != reach).any())


def _centred(x: Tensor, k: Tensor | float, inv_tau: float) -> Tensor:
    """``x − c`` per slice (``p`` depends on ``x`` only through such differences): ``c`` is the
    ``⌈k′⌉``-th largest finite entry (``k′`` the budget left to the finite entries) for slices
    spanning more than ``_CENTRE_SPAN`` τ, the largest for the others.  The root lies within a
    few τ (or a gap it does not depend on) of ``c``, or within ``_CENTRE_SPAN`` τ of the
    largest, so ``x − c`` is exact for the entries near it and ``w − t`` keeps their digits
    however small τ is and whatever the scores' common offset."""
    finite = torch.isfinite(x)
    top = torch.where(finite, x, -math.inf).amax(dim=-1, keepdim=True)
    bottom = torch.where(finite, x, math.inf).amin(dim=-1, keepdim=True)
    wide = (top - bottom) * inv_tau > _CENTRE_SPAN[x.dtype]  # (no finite entry: NaN, False)
    centre = torch.where(top > -math.inf, top, 0.0)
    if bool(wide.any()):
        budget = k.expand(x.shape[:-1]).unsqueeze(-1) if isinstance(k, Tensor) else k
        live = finite.sum(dim=-1, keepdim=True)
        rank = (budget - (x == math.inf).sum(dim=-1, keepdim=True)).ceil().long()
        rank = torch.minimum(rank.clamp(min=1), live.clamp(min=1))
        ranked = torch.where(finite, x, -math.inf).sort(dim=-1, descending=True).values
        centre = torch.where(wide, ranked.gather(-1, rank - 1), centre)
    return x - centre


def _order_statistics_start(w: Tensor, k: Tensor | float) -> Tensor:
    """A start for ``t`` from the ``⌊k⌋+1`` largest ``w``: nearly exact when ``w`` is spread out.

    When the entries are many units of ``τ`` apart every ``σ(w_i − t)`` is close to 0 or 1
    except near ``t``, so with ``m = ⌊k⌋`` and ``f = k − m``: for an integer budget the root
    sits midway between the ``m``-th and ``(m+1)``-th largest entries, and for a fractional
    one at ``w_(m+1) − logit(f)`` (that entry carries the fraction ``f``).  The log-sum-exp
    start is exact only in the lower tail and, at small ``τ``, lands many plateaus of
    saturated entries away from the root; this one costs a partial sort of ``m + 1`` values.
    ``k`` is one number or a ``(..., 1)`` tensor of per-slice budgets; the result may lie
    outside the bracket (e.g. ``−inf`` past a slice's finite entries) and is clamped by the
    caller.
    """
    if not isinstance(k, Tensor):
        m = math.floor(k)
        fraction = k - m
        top = torch.topk(w, m + 1, dim=-1, sorted=True).values
        if fraction == 0.0:
            return 0.5 * (top[..., m - 1 : m] + top[..., m : m + 1])
        return top[..., m : m + 1] - math.log(fraction / (1.0 - fraction))
    m = k.floor()
    fraction = k - m
    count = min(int(m.max()) + 1, w.shape[-1])
    top = torch.topk(w, count, dim=-1, sorted=True).values
    index = m.long().clamp(0, count - 1)
    at_m = top.gather(-1, index)  # the (m+1)-th largest
    before_m = top.gather(-1, (index - 1).clamp(min=0))  # the m-th largest
    integer = fraction == 0
    # (the unused branch of each where may be ±inf or NaN; it is discarded)
    fractional_start = at_m - torch.log(fraction / (1.0 - fraction))
    return torch.where(integer, 0.5 * (before_m + at_m), fractional_start)


def _solve_shared_budget(
    x: Tensor,
    k: float,
    inv_tau: float,
    x_min: Tensor,
    x_max: Tensor,
    maybe_tied: bool = True,
    spread: float = 0.0,
) -> Tensor:
    """The common case — finite input, one budget ``0 < k < n`` — with scalar bookkeeping.

    ``maybe_tied=False`` promises that no slice has ``x_max = x_min`` (skips that check).
    ``spread`` is the largest ``(x_max − x_min)/τ`` over slices: above
    :data:`_SPREAD_FOR_ORDER_START` the solve starts from order statistics.
    """
    n = float(x.shape[-1])
    flipped = k > 0.5 * n
    sign = -1.0 if flipped else 1.0
    factor = sign * inv_tau
    w = x if factor == 1.0 else x * factor  # τ = 1 and no flip: no copy
    if flipped:
        w_min, w_max = x_max * factor, x_min * factor
    else:
        w_min, w_max = (x_min, x_max) if factor == 1.0 else (x_min * factor, x_max * factor)
    budget = n - k if flipped else k
    start = _order_statistics_start(w, budget) if spread > _SPREAD_FOR_ORDER_START else None
    t, lo, hi, collapsed, buffer, current = _solve_shift(w, budget, n, w_min, w_max, None, start)

    def membership(shift: Tensor, out: Tensor | None = None) -> Tensor:
        z = torch.sub(w, shift, out=out) if out is not None else torch.sub(w, shift)
        return torch.sigmoid_(z.neg_() if flipped else z)

    p = buffer if (current and not flipped) else membership(t, out=buffer)
    p = _blend_collapsed(membership, lo, hi, k, collapsed, p)
    if not maybe_tied:
        return p
    tied = x_max == x_min
    if bool(tied.any()):
        # Exactly tied slices: p = k/n exactly, without the rounding of t (which is off by an
        # ulp of x/τ when τ ≪ |x|).
        p = torch.where(tied, k / n, p)
    return p


def _solve_general(
    x: Tensor, k: Tensor | float, inv_tau: float, x_min: Tensor, x_max: Tensor
) -> Tensor:
    """Per-slice budgets, ±inf and NaN entries, and capped temperatures."""
    dtype = x.dtype
    n_total = x.shape[-1]
    if isinstance(k, Tensor):
        k = k.to(dtype).unsqueeze(-1)
    else:
        k = torch.full((1,) * x.dim(), float(k), dtype=dtype, device=x.device)
    k = k.expand(*x.shape[:-1], 1)
    if bool(torch.isfinite(x_max - x_min).all()):
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

    limit = torch.finfo(dtype).max / 16
    magnitude = torch.maximum(x_max.abs(), x_min.abs())
    scale = torch.clamp(limit / magnitude, max=inv_tau)
    flip = k_finite > 0.5 * n
    flipped = bool(flip.any())
    sign = torch.where(flip, -1.0, 1.0).to(dtype)
    k_solve = torch.where(flip, n - k_finite, k_finite)
    w = x * (sign * scale)
    if finite is not None:
        w = torch.where(finite, w, -math.inf)
    u_min, u_max = x_min * scale, x_max * scale
    w_min = torch.where(flip, -u_max, u_min)
    w_max = torch.where(flip, -u_min, u_max)
    trivial = k_solve <= 0
    spread = float((u_max - u_min).max())
    start = _order_statistics_start(w, k_solve) if spread > _SPREAD_FOR_ORDER_START else None
    t, lo, hi, collapsed, buffer, current = _solve_shift(
        w, k_solve, n, w_min, w_max, trivial, start
    )
    # Trivial slices: nothing (or everything) is selected.
    any_trivial = bool(trivial.any())
    if any_trivial:
        t = torch.where(trivial, math.inf, t)

    def membership(shift: Tensor, out: Tensor | None = None) -> Tensor:
        z = torch.sub(w, shift, out=out) if out is not None else torch.sub(w, shift)
        p = torch.sigmoid_(z.mul_(sign) if flipped else z)
        return p if finite is None else torch.where(finite, p, 0.0)

    if current and not flipped and not any_trivial:
        p = buffer if finite is None else torch.where(finite, buffer, 0.0)
    else:
        p = membership(t, out=buffer)
    p = _blend_collapsed(membership, lo, hi, k_finite, collapsed, p)
    tied = (x_max == x_min) & ~trivial
    if bool(tied.any()):
        p = torch.where(tied, k_finite / torch.clamp(n, min=1.0), p)
    if finite is not None:
        share = torch.clamp(k / torch.clamp(n_positive, min=1.0), max=1.0)
        p = torch.where(finite, p, torch.where(positive, share, 0.0))
        p = torch.where(nan_slice, math.nan, p)
    return p


def soft_topk_vjp(grad: Tensor, p: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    """Vector–Jacobian product of the soft top-k, and the gradient with respect to ``k``.

    With ``v = p(1 − p)`` and ``S = Σ v`` (per slice, last dimension)::

        ∂L/∂x = (g⊙v − v·Σ(g⊙v)/S) / τ = v⊙(g − c)/τ,    ∂L/∂k = c = Σ(g⊙v) / S.

    ``temperature`` is a number or a tensor of shape ``p.shape[:-1]`` (one ``τ`` per slice).
    Saturated slices (``S = 0``) get an exact zero, not 0/0.  When the backward itself is
    differentiated (``create_graph=True``, ``torch.func`` transforms, ``torch.compile``) this
    is written with differentiable out-of-place ops on the *output* ``p`` (and ``τ``), so
    double backward works; otherwise it runs in place in the one buffer it returns
    (:func:`_vjp_in_place`).
    """
    per_slice = isinstance(temperature, Tensor)
    # 1/τ capped at max/16 as the forward caps it (a τ below the dtype's range: large finite
    # gradients, not 0·inf = NaN on the saturated entries)
    cap = torch.finfo(p.dtype).max / 16
    if not per_slice:
        temperature = max(temperature, 1.0 / cap)
    if not torch.is_grad_enabled() and grad.shape == p.shape and _native.plain_tensors(grad, p):
        scalar = 1.0 if per_slice else temperature
        fused = _native.vjp(grad, p, scalar)
        grad_x, grad_k = fused if fused is not None else _vjp_in_place(grad, p, scalar)
        if per_slice:
            inverse = torch.reciprocal(temperature).clamp(max=cap).unsqueeze(-1)
            grad_x.mul_(inverse.to(grad_x.dtype))
        return grad_x, grad_k
    # v/τ in one fused, twice-differentiable pass (the scale cancels in grad_k);
    # v = (1 − p)·p is accurate to rounding even where p ≈ 1 (unlike Σp − Σp²).
    if per_slice:
        scale = torch.reciprocal(temperature).clamp(max=cap).to(p.dtype).unsqueeze(-1)
        scale = scale.expand_as(p)
    else:
        scale = p.new_full((), 1.0 / temperature)
    v = torch.ops.aten.sigmoid_backward(scale, p)
    total = v.sum(dim=-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    gv = grad * v
    grad_k = gv.sum(dim=-1, keepdim=True) / total
    grad_x = torch.addcmul(gv, v, grad_k, value=-1.0)
    return grad_x, grad_k.squeeze(-1)


def _vjp_in_place(grad: Tensor, p: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """:func:`soft_topk_vjp` for a backward that is not itself differentiated.

    Allocates only the result, no temporaries: on CPU every fresh full-size buffer costs a
    round of page faults (about as much as two passes over it), more than the extra pass
    this spends (six passes, each ``σ'``-type op fused: ``g·v``, ``Σ``, ``v``, ``Σ``, ``g − c``,
    ``(g − c)·v``).
    """
    out = torch.ops.aten.sigmoid_backward(grad, p)  # g⊙v
    weighted = out.sum(dim=-1, keepdim=True)
    torch.ops.aten.sigmoid_backward.grad_input(p.new_ones(()), p, grad_input=out)  # v
    total = out.sum(dim=-1, keepdim=True)
    grad_k = weighted.div_(torch.where(total > 0, total, 1.0))
    torch.sub(grad, grad_k, out=out)
    torch.ops.aten.sigmoid_backward.grad_input(out, p, grad_input=out)  # v⊙(g − c)
    if temperature != 1.0:
        out.mul_(1.0 / temperature)
    return out, grad_k.squeeze(-1)
