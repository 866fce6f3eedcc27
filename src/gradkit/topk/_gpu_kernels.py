"""Triton kernels for :func:`gradkit.soft_topk` (and, at the end, :func:`gradkit.sparse_topk`):
the threshold solve and the vjp.

Launched only through :mod:`gradkit.topk._gpu`, which loads this module once per mode (compiled
for CUDA tensors, interpreted for CPU tensors: Triton fixes the mode when ``@triton.jit`` runs,
so each mode needs its own copy of the module).  Math and symbols follow
:mod:`gradkit.topk._solve`: per row, ``w_i = s·a·(x_i − c)`` (``a = 1/τ`` capped so that
``|w| ≤ max/16``; ``s = −1`` for rows solved as the complement, ``k > n/2``; ``c`` a centre
near the root, below), ``z_i = w_i − t``, ``p_i = σ(z_i)``, ``v_i = p_i(1 − p_i)``,
``F(t) = Σp``, ``F' = −Σv``; the root of ``F(t) = k`` lies in
``[w_min − logit(k/n), w_max − logit(k/n)]``.

Layout: one program solves ``ROWS`` rows at once on a ``(ROWS, BLOCK)`` tile (``ROWS > 1``
only when a row fits in one block); a row longer than ``BLOCK`` is streamed block by block in
every pass.  Per-row state (``t``, the bracket, the convergence flags) is a ``(ROWS,)`` vector
in registers.

Passes over a row: one for min/max and the counts of ``±inf``/NaN; one for the log-sum-exp
start; for rows spanning more than ``WIDE_START`` units of τ (small temperatures, where that
start lies plateaus of saturated entries away from the root), up to ``SECTIONS``
multisection passes, each evaluating ``F`` at ``PROBES`` points of the bracket at once and
shrinking it ``PROBES + 1`` times; one per Newton iteration (``Σp``, ``Σv`` and ``Σp·v``
fused); one to write ``p`` (and one more only where a bracket collapsed onto a jump of ``F``).
The centre ``c`` is the row's maximum for narrow rows and, for wide ones, the start once
multisection has made the bracket narrow, and again any located root more than ``WIDE``
units from it (while ``w`` there resolves ``WIDE/8`` units): ``w − t`` then keeps the
resolution of the entries near the root whatever the offset of the scores.  The iteration
is the safeguarded model-based Newton of ``_solve.py``: two-tail steps while they stay
inside the bracket, bisection otherwise (in the float ordering while the bracket is wider
than 64 units), bisection only after ``NEWTON_STEPS`` (counted from the last move of the
centre), at most ``MAX_ITERS`` iterations; a bracket has collapsed when no float lies
inside it.  Each row stops on its own test, and the program
stops when all its rows have.  Nothing leaves the device.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Reductions through tl.reduce with the standard library's combine functions (not tl.sum /
# tl.max, which are @triton.jit functions fixed in the mode triton was imported in: the
# interpreted copy of this module must run whatever that mode was).
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def _sigmoid_pair(z):
    """``σ(z)`` and ``1 − σ(z)``, both to full relative accuracy (no ``1 − p`` cancellation)."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    er = e * r
    positive = z >= 0
    return tl.where(positive, r, er), tl.where(positive, er, r)


@triton.jit
def _load(ptr, row_base, row_ok, start, n, BLOCK: tl.constexpr, CDT: tl.constexpr):
    """One ``(ROWS, BLOCK)`` tile in the compute dtype; padding reads as ``−inf`` (dead)."""
    cols = start + tl.arange(0, BLOCK)
    inside = row_ok[:, None] & (cols < n)[None, :]
    x = tl.load(ptr + row_base[:, None] + cols[None, :], mask=inside, other=float("-inf"))
    return x.to(CDT), inside


@triton.jit
def _program_rows(rows, n, ROWS: tl.constexpr):
    """This program's ``ROWS`` rows: their indices, which of them exist, their offsets."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < rows
    return row, row_ok, row.to(tl.int64) * n


@triton.jit
def _row_values(ptr, row, stride, row_ok, CDT: tl.constexpr):
    """A per-row argument (``stride`` 0: one value for every row) in the compute dtype."""
    return tl.load(ptr + row * stride, mask=row_ok, other=1.0).to(CDT)


@triton.jit
def _load_grad_p(g_ptr, p_ptr, row_base, row_ok, start, n, BLOCK: tl.constexpr,
                 CDT: tl.constexpr):  # fmt: skip
    """One tile of the cotangent ``g`` and the output ``p`` (padding 0), its mask and offsets."""
    cols = start + tl.arange(0, BLOCK)
    inside = row_ok[:, None] & (cols < n)[None, :]
    offsets = row_base[:, None] + cols[None, :]
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(CDT)
    p = tl.load(p_ptr + offsets, mask=inside, other=0.0).to(CDT)
    return g, p, inside, offsets


@triton.jit
def _store_values(out_ptr, row_base, start, inside, value, x, live, solving, fixed, share,
                  has_nan, BLOCK: tl.constexpr):  # fmt: skip
    """Write one tile of ``p``: the solved ``value`` on solved rows, else the row's ``fixed``
    value; ``+inf`` entries ``share``, ``−inf`` entries 0, a row with a NaN NaN."""
    value = tl.where(solving[:, None], value, fixed[:, None])
    value = tl.where(live, value, tl.where(x == float("inf"), share[:, None], 0.0))
    value = tl.where(has_nan[:, None], float("nan"), value)
    cols = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + row_base[:, None] + cols[None, :],
             value.to(out_ptr.dtype.element_ty), mask=inside)  # fmt: skip


@triton.jit
def _row_stats(x_ptr, row_base, row_ok, n, ROWS: tl.constexpr, BLOCK: tl.constexpr,
               CDT: tl.constexpr):  # fmt: skip
    """Per row: max and min of the finite entries, and how many are finite, +inf, NaN."""
    x_max = tl.full([ROWS], float("-inf"), CDT)
    x_min = tl.full([ROWS], float("inf"), CDT)
    live_count = tl.full([ROWS], 0, tl.int32)
    pos_count = tl.full([ROWS], 0, tl.int32)
    nan_count = tl.full([ROWS], 0, tl.int32)
    for start in range(0, n, BLOCK):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        live = (x > float("-inf")) & (x < float("inf"))
        x_max = tl.maximum(x_max, _max(tl.where(live, x, float("-inf")), axis=1))
        x_min = tl.minimum(x_min, _min(tl.where(live, x, float("inf")), axis=1))
        live_count += _sum(live.to(tl.int32), axis=1)
        pos_count += _sum((x == float("inf")).to(tl.int32), axis=1)
        nan_count += _sum((x != x).to(tl.int32), axis=1)
    return x_max, x_min, live_count, pos_count, nan_count


@triton.jit
def _tile_w(x, center, factor):
    """``w = s·a·(x − c)`` on the finite entries (0 elsewhere) and the finiteness mask."""
    live = (x > float("-inf")) & (x < float("inf"))
    return (tl.where(live, x, center[:, None]) - center[:, None]) * factor[:, None], live


@triton.jit
def _lse(x_ptr, row_base, row_ok, n, center, factor, w_max, ROWS: tl.constexpr, BLOCK: tl.constexpr,
         CDT: tl.constexpr):  # fmt: skip
    """``Σ e^{w − w_max}`` over the finite entries (≥ 1 on a row with any)."""
    total = tl.full([ROWS], 0, CDT)
    for start in range(0, n, BLOCK):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        w, live = _tile_w(x, center, factor)
        total += _sum(tl.where(live, tl.exp(w - w_max[:, None]), 0.0), axis=1)
    return total


@triton.jit
def _evaluate(x_ptr, row_base, row_ok, n, center, factor, t, ROWS: tl.constexpr,
              BLOCK: tl.constexpr, CDT: tl.constexpr):  # fmt: skip
    """One solver pass: ``F = Σp``, ``Σv`` and ``Σp·v`` at ``t`` (finite entries only)."""
    mass = tl.full([ROWS], 0, CDT)
    slope = tl.full([ROWS], 0, CDT)
    upper = tl.full([ROWS], 0, CDT)
    for start in range(0, n, BLOCK):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        w, live = _tile_w(x, center, factor)
        p, q = _sigmoid_pair(w - t[:, None])
        p = tl.where(live, p, 0.0)
        v = p * q
        mass += _sum(p, axis=1)
        slope += _sum(v, axis=1)
        upper += _sum(p * v, axis=1)
    return mass, slope, upper


@triton.jit
def _masses_at(x_ptr, row_base, row_ok, n, center, factor, t_a, t_b, ROWS: tl.constexpr,
               BLOCK: tl.constexpr, CDT: tl.constexpr):  # fmt: skip
    """``F(t_a)`` and ``F(t_b)`` in one pass (the two ends of a collapsed bracket)."""
    mass_a = tl.full([ROWS], 0, CDT)
    mass_b = tl.full([ROWS], 0, CDT)
    for start in range(0, n, BLOCK):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        w, live = _tile_w(x, center, factor)
        p_a, _ = _sigmoid_pair(w - t_a[:, None])
        p_b, _ = _sigmoid_pair(w - t_b[:, None])
        mass_a += _sum(tl.where(live, p_a, 0.0), axis=1)
        mass_b += _sum(tl.where(live, p_b, 0.0), axis=1)
    return mass_a, mass_b


@triton.jit
def _section(x_ptr, row_base, row_ok, n, center, factor, budget, lo, hi, wide, ROWS: tl.constexpr,
             PROBES: tl.constexpr, SUB: tl.constexpr, CDT: tl.constexpr):  # fmt: skip
    """One multisection pass on the ``wide`` rows: ``F`` at ``PROBES`` points evenly spaced in
    ``(lo, hi)`` (one read of the row, ``(ROWS, PROBES, SUB)`` tiles), and the bracket shrunk
    to the two probes around the root: ``PROBES + 1`` times narrower."""
    fraction = (tl.arange(0, PROBES) + 1).to(CDT) / (PROBES + 1)
    probes = lo[:, None] + (hi - lo)[:, None] * fraction[None, :]
    masses = tl.full([ROWS, PROBES], 0, CDT)
    for start in range(0, n, SUB):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, SUB, CDT)
        w, live = _tile_w(x, center, factor)
        p, _ = _sigmoid_pair(w[:, None, :] - probes[:, :, None])
        masses += _sum(tl.where(live[:, None, :], p, 0.0), 2)
    left = _max(tl.where(masses > budget[:, None], probes, float("-inf")), 1)
    right = _min(tl.where(masses < budget[:, None], probes, float("inf")), 1)
    lo = tl.where(wide, tl.maximum(lo, left), lo)
    hi = tl.where(wide, tl.minimum(hi, right), hi)
    return lo, hi


@triton.jit
def _two_tail_step(excess, slope, upper):
    """δ solving ``F(t + δ) ≈ F − a(eᵟ − 1) + b(e⁻ᵟ − 1) = k`` (see ``_solve._two_tail_step``);
    NaN or ±inf when the model is degenerate (the caller then bisects)."""
    a = tl.minimum(tl.maximum(upper, 0.0), slope)
    b = slope - a
    c = excess + a - b
    root = tl.sqrt(c * c + 4.0 * a * b)
    upward = c >= 0
    numerator = tl.where(upward, c + root, 2.0 * b)
    denominator = tl.where(upward, 2.0 * a, root - c)
    return tl.log(numerator) - tl.log(denominator)


@triton.jit
def _ordered_midpoint(lo, hi, IS_F64: tl.constexpr):
    """Midpoint of ``[lo, hi]`` in the floating-point ordering (halves the number of floats)."""
    if IS_F64:
        int_min = -9223372036854775808
        key_lo = lo.to(tl.int64, bitcast=True)
        key_hi = hi.to(tl.int64, bitcast=True)
    else:
        int_min = -2147483648
        key_lo = lo.to(tl.int32, bitcast=True)
        key_hi = hi.to(tl.int32, bitcast=True)
    key_lo = tl.where(key_lo >= 0, key_lo, int_min - key_lo)
    key_hi = tl.where(key_hi >= 0, key_hi, int_min - key_hi)
    key = (key_lo >> 1) + (key_hi >> 1) + (key_lo & key_hi & 1)
    key = tl.where(key >= 0, key, int_min - key)
    return key.to(lo.dtype, bitcast=True)


@triton.jit
def _adjacent(lo, hi):
    """No float lies strictly between ``lo`` and ``hi``: the bracket cannot shrink further."""
    middle = 0.5 * lo + 0.5 * hi
    return (middle <= lo) | (middle >= hi)


@triton.jit
def _newton_or_bisect(t, lo, hi, excess, slope, upper, newton_allowed, EPS: tl.constexpr,
                      WIDE: tl.constexpr, IS_F64: tl.constexpr):  # fmt: skip
    """The next ``t`` and whether the row is finished after it (bracket already updated)."""
    step = _two_tail_step(excess, slope, upper)
    t_newton = t + step
    newton_ok = (t_newton > lo) & (t_newton < hi) & newton_allowed
    resolution = EPS * tl.maximum(tl.abs(t), 1.0)
    # The error after a two-tail step is ≲ |δ|³/4: below the resolution of t, the row is done.
    small = newton_ok & ((tl.abs(step) * step * step <= 4.0 * resolution) | (t_newton == t))
    collapsed = ~newton_ok & _adjacent(lo, hi)
    midpoint = tl.where(hi - lo > WIDE, _ordered_midpoint(lo, hi, IS_F64), 0.5 * lo + 0.5 * hi)
    t_next = tl.where(newton_ok, t_newton, tl.where(collapsed, t, midpoint))
    return t_next, small | collapsed


@triton.jit
def _recentre(t, lo, hi, center, factor, move, EPS: tl.constexpr):
    """Move the centre of the ``move`` rows to the point ``t`` (in ``x`` units: ``c + t/(sa)``)
    and shift ``t`` and the bracket with it; the bracket is widened by the rounding of the
    shift, so that it still holds the root."""
    new_center = tl.where(move, center + t / tl.where(move, factor, 1.0), center)
    shift = (new_center - center) * factor
    slack = 8.0 * EPS * tl.abs(shift)
    return t - shift, lo - shift - slack, hi - shift + slack, new_center


@triton.jit
def _budgets(k, row_ok, x_max, x_min, live_count, pos_count, nan_count, CDT: tl.constexpr):
    """The budget left to the finite entries (``+inf`` entries take theirs first), and which
    rows need no solve: ``k = 0`` or every live entry selected (trivial), all tied, or NaN."""
    n_live = live_count.to(CDT)
    n_pos = pos_count.to(CDT)
    k_live = tl.minimum(tl.maximum(k - n_pos, 0.0), n_live)
    trivial = (k_live <= 0.0) | (k_live >= n_live)
    tied = (x_max == x_min) & ~trivial
    solving = row_ok & (nan_count == 0) & ~trivial & ~tied
    return k_live, n_live, n_pos, tied, solving


@triton.jit
def _coordinates(inv_tau, x_max, x_min, k_live, n_live, solving, LIMIT: tl.constexpr,
                 WIDE_START: tl.constexpr):  # fmt: skip
    """``w = s·a·(x − c)``: the centre ``c``, the factor ``s·a``, the flip ``s = −1``, the
    budget of the solved problem and its bracket ``[lo, hi]`` (before the start).

    ``c`` is the row's maximum for rows spanning at most ``WIDE_START`` units (``w − t`` then
    keeps the resolution of the entries near the root whatever the offset of the scores); 0 for
    wider ones until the bracket is that narrow.  ``a = 1/τ`` is capped so that
    ``|w| ≤ max/16`` (every difference stays finite)."""
    inv_tau = tl.minimum(inv_tau, LIMIT)
    spread = tl.where(solving, x_max - x_min, 0.0)
    centred = solving & (spread * inv_tau <= WIDE_START)
    center = tl.where(centred, x_max, 0.0)
    magnitude = tl.where(centred, spread, tl.maximum(tl.abs(x_max), tl.abs(x_min)))
    capped = magnitude * inv_tau > LIMIT
    scale = tl.where(capped, LIMIT / tl.where(capped, magnitude, 1.0), inv_tau)
    flip = k_live > 0.5 * n_live
    factor = tl.where(solving, tl.where(flip, -scale, scale), 0.0)
    budget = tl.where(solving, tl.where(flip, n_live - k_live, k_live), 1.0)
    n_solve = tl.where(solving, n_live, 2.0)
    u_min = tl.where(solving, (x_min - center) * scale, 0.0)
    u_max = tl.where(solving, (x_max - center) * scale, 0.0)
    w_max = tl.where(flip, -u_min, u_max)
    logit = tl.log(budget) - tl.log(n_solve - budget)
    lo = tl.where(flip, -u_max, u_min) - logit
    return centred, center, flip, factor, budget, lo, w_max - logit, w_max


@triton.jit
def _start(x_ptr, row_base, row_ok, n, centred, center, factor, budget, lo, hi, w_max, solving,
           ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr, EPS: tl.constexpr,
           WIDE_START: tl.constexpr, PROBES: tl.constexpr, SECTIONS: tl.constexpr):  # fmt: skip
    """The start ``t``: the log-sum-exp bound (right of the root, exact in the lower tail); for
    rows spanning many units (small τ), where that bound lies plateaus of saturated entries
    from the root, the middle of a bracket narrowed by multisection, re-centred there."""
    exp_sum = _lse(x_ptr, row_base, row_ok, n, center, factor, w_max, ROWS, BLOCK, CDT)
    hi = tl.minimum(hi, w_max + tl.log(tl.maximum(exp_sum, 1.0)) - tl.log(budget))
    wide = solving & (hi - lo > WIDE_START)
    sectioned = wide
    section = 0
    while (section < SECTIONS) & (_max(wide.to(tl.int32), 0) > 0):
        lo, hi = _section(x_ptr, row_base, row_ok, n, center, factor, budget, lo, hi, wide, ROWS,
                          PROBES, BLOCK // PROBES, CDT)  # fmt: skip
        wide = wide & (hi - lo > WIDE_START)
        section += 1
    t = tl.where(sectioned, 0.5 * lo + 0.5 * hi, hi)
    narrow = solving & ~centred & (hi - lo <= WIDE_START)
    return _recentre(t, lo, hi, center, factor, narrow, EPS)


@triton.jit
def _iterate(x_ptr, row_base, row_ok, n, center, factor, budget, t, lo, hi, solving,
             ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr, IS_F64: tl.constexpr,
             EPS: tl.constexpr, NEWTON_STEPS: tl.constexpr, MAX_ITERS: tl.constexpr,
             WIDE: tl.constexpr):  # fmt: skip
    """The safeguarded Newton iteration; returns ``t``, the bracket, the centre, ``F − k`` at
    the last evaluation and the number of iterations of each row.

    A row whose next ``t`` lies more than ``WIDE`` units from its centre (a wide row, centred
    at 0) moves its centre there and takes another pass: ``w − t`` about a far centre has only
    ``eps·|t|`` resolution.  Its Newton steps count afresh from the move."""
    tol_mass = 8.0 * EPS * tl.maximum(budget, 1.0)
    active = solving
    excess = tl.full([ROWS], 0, CDT)
    iters = tl.full([ROWS], 0, tl.int32)
    newton_from = tl.full([ROWS], 0, tl.int32)
    it = 0
    while (it < MAX_ITERS) & (_max(active.to(tl.int32), axis=0) > 0):
        mass, slope, upper = _evaluate(
            x_ptr, row_base, row_ok, n, center, factor, t, ROWS, BLOCK, CDT
        )
        excess = tl.where(active, mass - budget, excess)
        met = tl.abs(excess) <= tol_mass
        lo = tl.where(active & (excess > 0), t, lo)
        hi = tl.where(active & (excess < 0), t, hi)
        t_next, finished = _newton_or_bisect(
            t, lo, hi, excess, slope, upper, it - newton_from < NEWTON_STEPS, EPS, WIDE, IS_F64
        )
        t_next = tl.where(met, t, t_next)
        located = (hi - lo <= WIDE) | met | finished
        far = active & located & (tl.abs(t_next) > WIDE) & (8.0 * EPS * tl.abs(t_next) <= WIDE)
        t_next, lo, hi, moved_to = _recentre(t_next, lo, hi, center, factor, far, EPS)
        moved = moved_to != center
        center = moved_to
        newton_from = tl.where(moved, it + 1, newton_from)
        t = tl.where(active, t_next, t)
        iters += active.to(tl.int32)
        active = active & ((~met & ~finished) | moved)
        it += 1
    return t, lo, hi, center, excess, iters


@triton.jit
def _blend(x_ptr, row_base, row_ok, n, center, factor, budget, t, lo, hi, excess, solving,
           ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
           EPS: tl.constexpr):  # fmt: skip
    """Where a bracket collapsed onto a jump of ``F`` the dtype cannot resolve (ties at the
    resolution limit straddling the root), the two ends and the weight of the first that
    meets the budget exactly; elsewhere ``(t, t, 1)``.  Also whether any row collapsed."""
    tol_mass = 8.0 * EPS * tl.maximum(budget, 1.0)
    collapsed = solving & _adjacent(lo, hi) & (tl.abs(excess) > tol_mass)
    t_a = tl.where(collapsed, lo, t)
    t_b = tl.where(collapsed, hi, t)
    weight = tl.full([ROWS], 1.0, CDT)
    any_collapsed = _max(collapsed.to(tl.int32), axis=0) > 0
    if any_collapsed:
        mass_lo, mass_hi = _masses_at(x_ptr, row_base, row_ok, n, center, factor, t_a, t_b, ROWS,
                                      BLOCK, CDT)  # fmt: skip
        gap = mass_lo - mass_hi
        blend = tl.minimum(tl.maximum((budget - mass_hi) / tl.where(gap != 0, gap, 1.0), 0.0), 1.0)
        weight = tl.where(collapsed, blend, weight)
    return t_a, t_b, weight, any_collapsed


@triton.jit
def _solve_kernel(x_ptr, out_ptr, k_ptr, k_stride, tau_ptr, tau_stride, iters_ptr, rows, n,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
                  IS_F64: tl.constexpr, EPS: tl.constexpr, LIMIT: tl.constexpr,
                  NEWTON_STEPS: tl.constexpr, MAX_ITERS: tl.constexpr, WIDE: tl.constexpr,
                  WIDE_START: tl.constexpr, PROBES: tl.constexpr, SECTIONS: tl.constexpr,
                  COUNT: tl.constexpr):  # fmt: skip
    row, row_ok, row_base = _program_rows(rows, n, ROWS)
    k = _row_values(k_ptr, row, k_stride, row_ok, CDT)
    inv_tau = _row_values(tau_ptr, row, tau_stride, row_ok, CDT)
    x_max, x_min, live_count, pos_count, nan_count = _row_stats(
        x_ptr, row_base, row_ok, n, ROWS, BLOCK, CDT
    )
    k_live, n_live, n_pos, tied, solving = _budgets(
        k, row_ok, x_max, x_min, live_count, pos_count, nan_count, CDT
    )
    centred, center, flip, factor, budget, lo, hi, w_max = _coordinates(
        inv_tau, x_max, x_min, k_live, n_live, solving, LIMIT, WIDE_START
    )
    t, lo, hi, center = _start(x_ptr, row_base, row_ok, n, centred, center, factor, budget, lo,
                               hi, w_max, solving, ROWS, BLOCK, CDT, EPS, WIDE_START, PROBES,
                               SECTIONS)  # fmt: skip
    t, lo, hi, center, excess, iters = _iterate(x_ptr, row_base, row_ok, n, center, factor,
                                                budget, t, lo, hi, solving, ROWS, BLOCK, CDT,
                                                IS_F64, EPS, NEWTON_STEPS, MAX_ITERS,
                                                WIDE)  # fmt: skip
    if COUNT:
        tl.store(iters_ptr + row, iters, mask=row_ok)
    t_a, t_b, weight, any_collapsed = _blend(x_ptr, row_base, row_ok, n, center, factor,
                                             budget, t, lo, hi, excess, solving, ROWS, BLOCK,
                                             CDT, EPS)  # fmt: skip
    # Values that need no solve: 0 or 1 (trivial), k/n (tied), min(k/m, 1) for +inf, NaN.
    fixed = tl.where(k_live > 0.0, 1.0, 0.0)
    fixed = tl.where(tied, k_live / tl.maximum(n_live, 1.0), fixed)
    share = tl.minimum(k / tl.maximum(n_pos, 1.0), 1.0)
    has_nan = nan_count > 0
    for start in range(0, n, BLOCK):
        x, inside = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        w, live = _tile_w(x, center, factor)
        p, q = _sigmoid_pair(w - t_a[:, None])
        value = tl.where(flip[:, None], q, p)
        if any_collapsed:
            p_b, q_b = _sigmoid_pair(w - t_b[:, None])
            value_b = tl.where(flip[:, None], q_b, p_b)
            value = weight[:, None] * value + (1.0 - weight[:, None]) * value_b
        _store_values(out_ptr, row_base, start, inside, value, x, live, solving, fixed, share,
                      has_nan, BLOCK)  # fmt: skip


@triton.jit
def _vjp_kernel(g_ptr, p_ptr, gx_ptr, gk_ptr, tau_ptr, tau_stride, rows, n,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
                SATURATE: tl.constexpr, OUT_MAX: tl.constexpr):  # fmt: skip
    """``c = Σ g·v / Σ v`` (0 where ``Σ v = 0``) and ``grad_x = v⊙(g − c)/τ``: two passes."""
    row, row_ok, row_base = _program_rows(rows, n, ROWS)
    inv_tau = _row_values(tau_ptr, row, tau_stride, row_ok, CDT)
    sum_v = tl.full([ROWS], 0, CDT)
    sum_gv = tl.full([ROWS], 0, CDT)
    for start in range(0, n, BLOCK):
        g, p, inside, offsets = _load_grad_p(g_ptr, p_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        v = (1.0 - p) * p
        sum_v += _sum(v, axis=1)
        sum_gv += _sum(g * v, axis=1)
    c = tl.where(sum_v > 0, sum_gv / tl.where(sum_v > 0, sum_v, 1.0), 0.0)
    for start in range(0, n, BLOCK):
        g, p, inside, offsets = _load_grad_p(g_ptr, p_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        grad = (1.0 - p) * p * (g - c[:, None]) * inv_tau[:, None]
        if SATURATE:  # half precision: the largest finite value instead of ±inf (NaN stays)
            grad = tl.where(grad > OUT_MAX, OUT_MAX, tl.where(grad < -OUT_MAX, -OUT_MAX, grad))
        tl.store(gx_ptr + offsets, grad.to(gx_ptr.dtype.element_ty), mask=inside)
    if SATURATE:
        c = tl.where(c > OUT_MAX, OUT_MAX, tl.where(c < -OUT_MAX, -OUT_MAX, c))
    tl.store(gk_ptr + row, c.to(gk_ptr.dtype.element_ty), mask=row_ok)


# ------------------------------------------------------------------------------ sparse_topk
# Math and symbols follow :mod:`gradkit.topk._sparse`: per row, ``w_i = (x_i − c)/τ`` on the
# finite entries (within ``±LIMIT``; ``c = x_max`` until the root is located, then near it),
# ``F(t) = Σ clip(w − t, 0, 1)``, ``U = {w − t ≥ 1}``, the free set ``F = {0 < w − t < 1}``;
# the root of ``F(t) = k'`` (``k'`` the budget left to the finite entries) lies in
# ``[w_min − 1, w_max]`` (``[w_min − 1, 0]`` about ``x_max``).  Active-set Newton (the root of the
# linear piece at ``t``, ``(Σ_F w + |U| − k')/|F|``), safeguarded by the bracket (regula falsi
# kept off its ends, after ``NEWTON_STEPS`` bisection in the float ordering), at most
# ``MAX_ITERS`` passes; a row stops when the step is ``t`` itself to rounding (``t`` then
# solves its own active set: the exact threshold), when ``F(t) = k'`` exactly, or when its
# bracket has collapsed (then ``t`` is the exact solve of the last active set, clamped to it;
# for a bracket collapsed wider than a unit, p blends its ends).


@triton.jit
def _sparse_w(x, center, tau, LIMIT: tl.constexpr):
    """``w = (x − c)/τ`` on the finite entries (0 elsewhere, within ``±LIMIT``) and the
    finiteness mask."""
    live = (x > float("-inf")) & (x < float("inf"))
    w = (tl.where(live, x, center[:, None]) - center[:, None]) / tau[:, None]
    return tl.minimum(tl.maximum(w, -LIMIT), LIMIT), live


@triton.jit
def _sparse_sum_w(x_ptr, row_base, row_ok, n, center, tau, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                  CDT: tl.constexpr, LIMIT: tl.constexpr):  # fmt: skip
    """``Σ w`` over the finite entries (for the all-free start)."""
    total = tl.full([ROWS], 0, CDT)
    for start in range(0, n, BLOCK):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        w, live = _sparse_w(x, center, tau, LIMIT)
        total += _sum(tl.where(live, w, 0.0), axis=1)
    return total


@triton.jit
def _sparse_active(x_ptr, row_base, row_ok, n, center, tau, t, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr, CDT: tl.constexpr, LIMIT: tl.constexpr):  # fmt: skip
    """One pass: ``|U|``, ``|F|`` and ``Σ_F w`` at ``t``."""
    upper = tl.full([ROWS], 0, CDT)
    count = tl.full([ROWS], 0, CDT)
    total = tl.full([ROWS], 0, CDT)
    for start in range(0, n, BLOCK):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        w, live = _sparse_w(x, center, tau, LIMIT)
        z = w - t[:, None]
        free = live & (z > 0) & (z < 1)
        upper += _sum((live & (z >= 1)).to(CDT), axis=1)
        count += _sum(free.to(CDT), axis=1)
        total += _sum(tl.where(free, w, 0.0), axis=1)
    return upper, count, total


@triton.jit
def _sparse_section(x_ptr, row_base, row_ok, n, center, tau, budget, lo, hi, mass_lo, mass_hi, wide,
                    ROWS: tl.constexpr, PROBES: tl.constexpr, SUB: tl.constexpr,
                    CDT: tl.constexpr, LIMIT: tl.constexpr):  # fmt: skip
    """One multisection pass on the ``wide`` rows: ``F`` at ``PROBES`` points evenly spaced in
    ``(lo, hi)`` (one read of the row), and the bracket (with ``F`` at its ends) shrunk to the
    two probes around the root: ``PROBES + 1`` times narrower."""
    fraction = (tl.arange(0, PROBES) + 1).to(CDT) / (PROBES + 1)
    probes = lo[:, None] + (hi - lo)[:, None] * fraction[None, :]
    masses = tl.full([ROWS, PROBES], 0, CDT)
    for start in range(0, n, SUB):
        x, _ = _load(x_ptr, row_base, row_ok, start, n, SUB, CDT)
        w, live = _sparse_w(x, center, tau, LIMIT)
        p = tl.minimum(tl.maximum(w[:, None, :] - probes[:, :, None], 0.0), 1.0)
        masses += _sum(tl.where(live[:, None, :], p, 0.0), 2)
    above = masses >= budget[:, None]
    below = masses <= budget[:, None]
    left = _max(tl.where(above, probes, float("-inf")), 1)
    right = _min(tl.where(below, probes, float("inf")), 1)
    # F is non-increasing: the mass at the left (right) end is the smallest (largest) above
    # (below) the budget.
    left_mass = _min(tl.where(above, masses, float("inf")), 1)
    right_mass = _max(tl.where(below, masses, float("-inf")), 1)
    move_lo = wide & (left > lo)
    move_hi = wide & (right < hi)
    lo = tl.where(move_lo, left, lo)
    mass_lo = tl.where(move_lo, left_mass, mass_lo)
    hi = tl.where(move_hi, right, hi)
    mass_hi = tl.where(move_hi, right_mass, mass_hi)
    return lo, hi, mass_lo, mass_hi


@triton.jit
def _sparse_start(x_ptr, row_base, row_ok, n, center, tau, budget, lo, hi, n_live, solving,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
                  LIMIT: tl.constexpr, WIDE_START: tl.constexpr, PROBES: tl.constexpr,
                  SECTIONS: tl.constexpr):  # fmt: skip
    """The start ``t`` and the bracket with ``F`` at its ends: the all-free root (exact when
    nothing saturates); for rows spanning more than ``WIDE_START`` units (small τ), where that
    root lies far from the answer, the regula-falsi point of a bracket narrowed by up to
    ``SECTIONS`` multisection passes."""
    total = _sparse_sum_w(x_ptr, row_base, row_ok, n, center, tau, ROWS, BLOCK, CDT, LIMIT)
    t = tl.minimum(tl.maximum((total - budget) / tl.maximum(n_live, 1.0), lo), hi)
    mass_lo = n_live
    mass_hi = tl.full([ROWS], 0, CDT)
    wide = solving & (hi - lo > WIDE_START)
    sectioned = wide
    section = 0
    while (section < SECTIONS) & (_max(wide.to(tl.int32), 0) > 0):
        lo, hi, mass_lo, mass_hi = _sparse_section(x_ptr, row_base, row_ok, n, center, tau, budget,
                                                   lo, hi, mass_lo, mass_hi, wide, ROWS, PROBES,
                                                   BLOCK // PROBES, CDT, LIMIT)  # fmt: skip
        wide = wide & (hi - lo > WIDE_START)
        section += 1
    gap = tl.maximum(mass_lo - mass_hi, 1e-30)
    share = tl.minimum(tl.maximum((mass_lo - budget) / gap, 0.0), 1.0)
    t = tl.where(sectioned, lo + share * (hi - lo), t)
    return t, lo, hi, mass_lo, mass_hi


@triton.jit
def _sparse_step(t, lo, hi, mass_lo, mass_hi, budget, upper, count, total, it,
                 EPS: tl.constexpr, NEWTON_STEPS: tl.constexpr, WIDE: tl.constexpr,
                 IS_F64: tl.constexpr):  # fmt: skip
    """The next ``t`` and whether the row is finished (bracket already updated at ``t``)."""
    mass = upper + total - count * t
    step = (total + upper - budget) / tl.maximum(count, 1.0)
    stable = (count > 0) & (tl.abs(step - t) <= 2.0 * EPS * (tl.abs(t) + 1.0))
    solved = stable | (mass == budget)
    collapsed = _adjacent(lo, hi)
    newton = it < NEWTON_STEPS
    inside = (count > 0) & (step > lo) & (step < hi)
    gap = tl.maximum(mass_lo - mass_hi, 1e-30)
    share = tl.minimum(tl.maximum((mass_lo - budget) / gap, 0.25), 0.75)
    secant = lo + share * (hi - lo)
    midpoint = tl.where(hi - lo > WIDE, _ordered_midpoint(lo, hi, IS_F64), 0.5 * lo + 0.5 * hi)
    t_next = tl.where(inside, step, tl.where(newton, secant, midpoint))
    last = tl.where(count > 0, tl.minimum(tl.maximum(step, lo), hi), t)
    t_next = tl.where(collapsed & ~solved, last, t_next)
    t_next = tl.where(stable, step, tl.where(solved, t, t_next))
    return t_next, solved | collapsed


@triton.jit
def _sparse_iterate(x_ptr, row_base, row_ok, n, center, tau, budget, t, lo, hi, mass_lo, mass_hi,
                    solving,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
                    LIMIT: tl.constexpr, EPS: tl.constexpr, NEWTON_STEPS: tl.constexpr,
                    MAX_ITERS: tl.constexpr, WIDE: tl.constexpr,
                    IS_F64: tl.constexpr):  # fmt: skip
    """The safeguarded active-set Newton; returns ``t``, the centre, the bracket with ``F`` at
    its ends and each row's number of passes.  A row whose root is located more than ``WIDE``
    units from its centre moves the centre there (as the soft solve's ``_iterate``) while
    ``w`` there still resolves ``WIDE/8`` units; past that (tiny τ) the bracket collapses."""
    active = solving
    iters = tl.full([ROWS], 0, tl.int32)
    newton_from = tl.full([ROWS], 0, tl.int32)
    it = 0
    while (it < MAX_ITERS) & (_max(active.to(tl.int32), axis=0) > 0):
        upper, count, total = _sparse_active(x_ptr, row_base, row_ok, n, center, tau, t, ROWS,
                                             BLOCK, CDT, LIMIT)  # fmt: skip
        mass = upper + total - count * t
        above = active & (mass >= budget)
        below = active & (mass <= budget)
        lo = tl.where(above, t, lo)
        mass_lo = tl.where(above, mass, mass_lo)
        hi = tl.where(below, t, hi)
        mass_hi = tl.where(below, mass, mass_hi)
        t_next, finished = _sparse_step(t, lo, hi, mass_lo, mass_hi, budget, upper, count, total,
                                        it - newton_from, EPS, NEWTON_STEPS, WIDE,
                                        IS_F64)  # fmt: skip
        located = finished | (hi - lo <= WIDE)
        far = active & located & (tl.abs(t_next) > WIDE) & (8.0 * EPS * tl.abs(t_next) <= WIDE)
        moved_to = tl.where(far, center + t_next * tau, center)
        moved = moved_to != center
        shift = tl.where(moved, (moved_to - center) / tau, 0.0)
        slack = 8.0 * EPS * tl.abs(shift)
        t_next, lo, hi, center = t_next - shift, lo - shift - slack, hi - shift + slack, moved_to
        newton_from = tl.where(moved, it + 1, newton_from)
        t = tl.where(active, t_next, t)
        iters += active.to(tl.int32)
        active = active & (~finished | moved)
        it += 1
    return t, center, lo, hi, mass_lo, mass_hi, iters


@triton.jit
def _sparse_solve_kernel(x_ptr, out_ptr, k_ptr, k_stride, tau_ptr, tau_stride, iters_ptr, rows,
                         n, ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
                         IS_F64: tl.constexpr, EPS: tl.constexpr, LIMIT: tl.constexpr,
                         NEWTON_STEPS: tl.constexpr, MAX_ITERS: tl.constexpr,
                         WIDE: tl.constexpr, WIDE_START: tl.constexpr, PROBES: tl.constexpr,
                         SECTIONS: tl.constexpr, COUNT: tl.constexpr):  # fmt: skip
    row, row_ok, row_base = _program_rows(rows, n, ROWS)
    k = _row_values(k_ptr, row, k_stride, row_ok, CDT)
    tau = _row_values(tau_ptr, row, tau_stride, row_ok, CDT)
    x_max, x_min, live_count, pos_count, nan_count = _row_stats(
        x_ptr, row_base, row_ok, n, ROWS, BLOCK, CDT
    )
    n_live = live_count.to(CDT)
    n_pos = pos_count.to(CDT)
    budget = k - n_pos
    solving = row_ok & (nan_count == 0) & (budget > 0) & (budget < n_live)
    center = tl.where(live_count > 0, x_max, 0.0)
    # τ at least span/LIMIT: every |w| stays finite and ordered (a smaller τ only separates
    # gaps that already saturate).
    tau = tl.where(solving, tl.maximum(tau, (x_max - x_min) / LIMIT), tau)
    budget = tl.where(solving, budget, 0.5)
    lo = tl.where(solving, tl.maximum((x_min - center) / tau, -LIMIT) - 1.0, -1.0)
    hi = tl.full([ROWS], 0, CDT)
    t, lo, hi, mass_lo, mass_hi = _sparse_start(x_ptr, row_base, row_ok, n, center, tau, budget,
                                                lo, hi, n_live, solving, ROWS, BLOCK, CDT, LIMIT,
                                                WIDE_START, PROBES, SECTIONS)  # fmt: skip
    t, center, lo, hi, mass_lo, mass_hi, iters = _sparse_iterate(
        x_ptr, row_base, row_ok, n, center, tau, budget, t, lo, hi, mass_lo, mass_hi, solving,
        ROWS, BLOCK, CDT, LIMIT, EPS, NEWTON_STEPS, MAX_ITERS, WIDE, IS_F64
    )  # fmt: skip
    if COUNT:
        tl.store(iters_ptr + row, iters, mask=row_ok)
    # A bracket that collapsed more than a unit wide (τ below the resolution of w): p is the
    # blend of its ends that meets k' (a lone fractional entry gets the fraction exactly).
    blend = solving & _adjacent(lo, hi) & (hi - lo > 1.0)
    gap = mass_lo - mass_hi
    weight = tl.minimum(tl.maximum((budget - mass_hi) / tl.where(gap > 0, gap, 1.0), 0.0), 1.0)
    weight = tl.where(blend, weight, 1.0)
    any_blend = _max(blend.to(tl.int32), axis=0) > 0
    # Rows without a solve: every finite entry 0 (k' ≤ 0) or 1 (k' ≥ live); +inf entries
    # min(k/m, 1); a slice with a NaN is NaN.
    fixed = tl.where(k - n_pos > 0.0, 1.0, 0.0)
    share = tl.minimum(k / tl.maximum(n_pos, 1.0), 1.0)
    has_nan = nan_count > 0
    for start in range(0, n, BLOCK):
        x, inside = _load(x_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        w, live = _sparse_w(x, center, tau, LIMIT)
        value = tl.minimum(tl.maximum(w - t[:, None], 0.0), 1.0)
        if any_blend:
            at_lo = tl.minimum(tl.maximum(w - lo[:, None], 0.0), 1.0)
            at_hi = tl.minimum(tl.maximum(w - hi[:, None], 0.0), 1.0)
            blended = weight[:, None] * at_lo + (1.0 - weight[:, None]) * at_hi
            value = tl.where(blend[:, None], blended, value)
        _store_values(out_ptr, row_base, start, inside, value, x, live, solving, fixed, share,
                      has_nan, BLOCK)  # fmt: skip


@triton.jit
def _sparse_vjp_kernel(g_ptr, p_ptr, gx_ptr, gk_ptr, tau_ptr, tau_stride, rows, n,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr):  # fmt: skip
    """``m = mean_F g`` (0 where ``F`` is empty) and ``grad_x = 1_F (g − m)/τ`` (NaN where ``p``
    is NaN): two passes."""
    row, row_ok, row_base = _program_rows(rows, n, ROWS)
    tau = _row_values(tau_ptr, row, tau_stride, row_ok, CDT)
    count = tl.full([ROWS], 0, CDT)
    total = tl.full([ROWS], 0, CDT)
    for start in range(0, n, BLOCK):
        g, p, inside, offsets = _load_grad_p(g_ptr, p_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        free = (p > 0) & (p < 1)
        count += _sum(free.to(CDT), axis=1)
        total += _sum(tl.where(free, g, 0.0), axis=1)
    mean = total / tl.maximum(count, 1.0)
    for start in range(0, n, BLOCK):
        g, p, inside, offsets = _load_grad_p(g_ptr, p_ptr, row_base, row_ok, start, n, BLOCK, CDT)
        free = (p > 0) & (p < 1)
        grad = tl.where(free, g - mean[:, None], 0.0) / tau[:, None]
        grad = tl.where(p != p, p, grad)
        tl.store(gx_ptr + offsets, grad.to(gx_ptr.dtype.element_ty), mask=inside)
    tl.store(gk_ptr + row, mean.to(gk_ptr.dtype.element_ty), mask=row_ok)
