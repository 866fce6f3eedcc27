"""The fused kernel's short-row path (rows of n ≤ 128, solved 8 at a time, one per lane).

Only calls with at least 8 rows reach it, so these tests use 8–19 rows (whole tiles plus a
remainder that takes the per-row path) for every n in 1..130, per-row budgets at the edges,
rows of different spreads in one tile (some of them left to the per-row path), −inf masks,
and NaN / +inf / tied rows inside a tile.  References: bisection in float64 (masked entries
excluded) and the PyTorch path.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import kernel_counts, seeded_randn

from gradkit import soft_topk
from gradkit.topk import _native, _solve
from gradkit.topk.reference import sparse_topk_reference

needs_kernel = pytest.mark.skipif(
    not _native.available(), reason=f"fused CPU kernel {_native.status()}"
)

ROWS = 19  # two tiles of 8 rows and 3 rows on the per-row path
SPREADS = [0.1, 1.0, 3.0, 6.0, 10.0, 0.5, 2.0, 30.0]  # row scales (30: wide rows too)


def _masked_reference(x: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float64 bisection on θ (200 steps) over the live (> −inf) entries of each row.

    Rows with at least one live entry; ``k`` per row, in [0, live count].
    """
    x = x.double()
    live = x > -math.inf
    k = k.double().unsqueeze(-1)
    lo = torch.where(live, x, math.inf).amin(-1, keepdim=True) - 50 * temperature
    hi = torch.where(live, x, -math.inf).amax(-1, keepdim=True) + 50 * temperature
    for _ in range(200):
        mid = lo / 2 + hi / 2
        mass = torch.sigmoid((x - mid) / temperature).sum(-1, keepdim=True)
        lo = torch.where(mass > k, mid, lo)
        hi = torch.where(mass > k, hi, mid)
    return torch.sigmoid((x - (lo / 2 + hi / 2)) / temperature)


def _edge_budgets(n: int, rows: int) -> torch.Tensor:
    """Per-row budgets cycling through the edges of [0, n] and a few interior values."""
    edges = [0.0, 0.25, 1.0, 2.0, n / 10, n / 2, n - 1.0, n - 0.25, float(n), 1.5, n / 3]
    return torch.tensor(
        [min(max(edges[r % len(edges)], 0.0), n) for r in range(rows)],
        dtype=torch.float64,
    )


def _tolerance(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """θ to an ulp of the row's scale |x|/τ moves p by ≤ Δθ/(4τ); plus n-term rounding."""
    eps = torch.finfo(x.dtype).eps
    scale = torch.where(x > -math.inf, x, 0.0).abs().amax(-1, keepdim=True).double()
    return 64 * eps + 4 * eps * scale / temperature


def _check_against_reference(x, k, temperature):
    p, status, _ = _native.solve(x, k, 1.0 / temperature)
    assert status.tolist() == [0] * x.shape[0], status.tolist()
    expected = _masked_reference(x, k, temperature)
    difference = (p.double() - expected).abs()
    tolerance = _tolerance(x, temperature)
    assert bool((difference <= tolerance).all()), (difference - tolerance).max().item()
    live = (x > -math.inf).sum(-1)
    mass_error = (p.double().sum(-1) - k.clamp(max=live)).abs()
    eps = torch.finfo(x.dtype).eps
    assert bool((mass_error <= 64 * eps * k.clamp(min=1)).all()), mass_error.max().item()
    assert bool((p[x == -math.inf] == 0).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", range(1, 131))
def test_short_rows_match_the_reference_for_every_n(n, dtype):
    x = seeded_randn(ROWS, n, seed=n) * torch.tensor(SPREADS * 3)[:ROWS, None]
    x = x.to(dtype)
    _check_against_reference(x, _edge_budgets(n, ROWS), temperature=1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 7, 16, 33, 64, 100, 128])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_short_rows_with_masks_match_the_reference(n, temperature, dtype):
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(ROWS, n, generator=generator, dtype=torch.float64) * 3
    density = torch.tensor([1.0, 0.9, 0.5, 0.2] * 5)[:ROWS, None]
    keep = torch.rand(ROWS, n, generator=generator) < density
    keep[:, 0] = True  # at least one live entry per row
    x = torch.where(keep, x, -math.inf).to(dtype)
    live = keep.sum(-1).double()
    share = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 1.3, 0.3] * 3)[:ROWS]
    k = (live * share).floor() + torch.tensor([0.0, 0.5] * 10)[:ROWS]
    _check_against_reference(x, k.clamp(max=live), temperature)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [8, 16, 64, 128])
def test_short_rows_with_one_budget_for_all_match_the_reference(n, dtype):
    x = (seeded_randn(16, n, seed=3 * n) * 3).to(dtype)
    for k in [0.5, 1.0, 2.0, n / 10, n / 2, n - 1.0, n - 0.5]:
        if not 0 < k < n:
            continue
        p, status, _ = _native.solve(x, k, 1.0)
        assert bool((status == 0).all())
        expected = _masked_reference(x, torch.full((16,), k, dtype=torch.float64), 1.0)
        difference = (p.double() - expected).abs()
        assert bool((difference <= _tolerance(x, 1.0)).all()), (k, difference.max().item())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [5, 16, 64, 128])
def test_special_rows_inside_a_tile_are_solved_like_the_torch_path(n, dtype):
    x = seeded_randn(16, n, seed=n).to(dtype)
    x[1, 3] = math.nan  # the whole slice is NaN
    x[2, 1] = math.inf  # takes the budget's share k/m, the finite entries the rest
    x[3, :] = -math.inf  # every entry masked: zeros
    x[4] *= 1000.0  # spread ≫ 40·τ: the per-row (order statistics) path
    x[5] = 0.25  # exact ties: p = k/n
    x[6, 2] = -math.inf
    x[9] += 1e4  # a large common offset
    k = 0.5 * n
    _, status, _ = _native.solve(x, k, 1.0)
    assert status.tolist() == [0] * 16
    p = _native.solve(x, k, 1.0)[0]
    with _native.disabled():
        expected = _solve.solve_soft_topk(x, k, 1.0)
    tolerance = _tolerance(x, 1.0)
    difference = torch.where(p.isnan() & expected.isnan(), 0.0, (p - expected).abs()).double()
    assert bool((difference <= tolerance).all()), (difference - tolerance).max().item()
    assert torch.equal(p.isnan(), expected.isnan())
    assert bool((p[3] == 0).all())
    assert torch.equal(p[5], torch.full((n,), 0.5, dtype=dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 16, 41, 64])
def test_short_rows_match_the_reference_for_every_budget(n, dtype):
    # Every integer budget (and one off-integer) with one budget for all rows, on rows whose
    # spreads cover both starts of a tile (log-sum-exp below TILE_SOFT·τ, counts above it in
    # tiles with a row wider than SPREAD_LIMIT·τ) and rows too wide for a tile (the per-row
    # path).
    scales = torch.tensor([0.1, 1.0, 2.0, 4.0, 10.0, 20.0, 40.0, 3.0] * 3, dtype=torch.float64)
    x = (seeded_randn(ROWS, n, seed=7 * n) * scales[:ROWS, None]).to(dtype)
    for k in [*range(1, n), n - 0.5]:
        _check_against_reference(x, torch.full((ROWS,), float(k), dtype=torch.float64), 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 16, 64, 128])
def test_tiles_of_rows_between_the_two_starts_match_the_reference(n, dtype):
    # Every row spans 7–15 τ: wider than TILE_SOFT, but no row of the tile spans more than
    # SPREAD_LIMIT, so the whole tile takes the log-sum-exp start (no counts); every budget.
    x = seeded_randn(ROWS, n, seed=9 * n + 2)
    span = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).clamp(min=1e-3)
    widths = 7.0 + 8.0 * torch.arange(ROWS, dtype=torch.float64).unsqueeze(-1) / ROWS
    x = ((x - x.amin(-1, keepdim=True)) * widths / span).to(dtype)
    for k in [*range(1, n), n / 2 + 0.25, 0.5]:
        _check_against_reference(x, torch.full((ROWS,), float(k), dtype=torch.float64), 1.0)


def _shaped_rows(n: int, width: float, seed: int) -> torch.Tensor:
    """ROWS rows of n entries spanning ``width`` τ, of shapes far from a Gaussian: two
    clusters at the ends, one entry above a tight cluster, one below, evenly spaced, and
    skewed (exponential); some rows with −inf masks."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(ROWS, n, generator=generator, dtype=torch.float64)
    shapes = [
        (torch.arange(n) % 2).double() + 0.01 * noise[0],
        torch.cat([torch.ones(1), 0.02 * noise[1, 1:]]),
        torch.cat([torch.zeros(1), 1 - 0.02 * noise[2, 1:]]),
        torch.linspace(0, 1, n, dtype=torch.float64),
        -torch.log1p(-0.999 * noise[4]),
    ]
    x = torch.stack([shapes[r % len(shapes)] for r in range(ROWS)])
    span = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).clamp(min=1e-6)
    x = (x - x.amin(-1, keepdim=True)) * (width / span)
    x[2::6, 1] = -math.inf
    x[3::6, : n // 2] = -math.inf
    return x


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [2.5, 5.0, 12.0])
@pytest.mark.parametrize("n", [4, 16, 64, 128])
def test_tiles_of_skewed_rows_from_the_moment_start_match_the_reference(n, width, dtype):
    # Rows of a few τ with budgets off the tails move their log-sum-exp start up to the root
    # of a Gaussian row of their moments: on rows nothing like a Gaussian that start can lie
    # far from the root, on either side; the bracketed steps must still find it.
    x = _shaped_rows(n, width, seed=n + int(width)).to(dtype)
    live = (x > -math.inf).sum(-1).double()
    for share in [0.2, 0.35, 0.5, 0.65, 0.8]:
        k = (live * share).clamp(min=0.5)
        _check_against_reference(x, k, 1.0)
        _check_against_reference(x, k.round().clamp(1, n - 1).minimum(live - 0.5), 1.0)


def _soft_tile_counts(library) -> tuple[int, int]:
    """(soft tiles solved, passes they took) since the last call."""
    return kernel_counts(library, "gradkit_soft_tile_counts")


@needs_kernel
@pytest.mark.parametrize(("dtype", "most"), [(torch.float32, 3.2), (torch.float64, 3.8)])
@pytest.mark.parametrize(("n", "budget"), [(16, 8), (64, 6), (16, None), (64, None)])
def test_tiles_of_rows_of_a_few_tau_start_near_their_root(n, budget, dtype, most):
    # randn × 3 rows (about 10–15 τ wide) with a budget off the tails: the log-sum-exp start
    # lies 3.5–5.2 passes from the root on average, the moment start 2.3–3.5 (counted by the
    # kernel, per tile of 8 rows; float64 needs the tighter tolerance).  The bounds leave room
    # for another compiler's rounding, and fail without the moment start.
    library = _native._load()
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(2048, n, generator=generator, dtype=torch.float64) * 3
    if budget is None:
        k = torch.randint(1, n, (2048,), generator=generator).double()
    else:
        k = torch.full((2048,), float(budget), dtype=torch.float64)
    _soft_tile_counts(library)  # (reset)
    _, status, _ = _native.solve(x.to(dtype), k, 1.0)
    tiles, passes = _soft_tile_counts(library)
    if tiles == 0:
        pytest.skip("this build solves short rows row by row (an x86 build without AVX)")
    assert status.eq(0).all() and tiles == 2048 // 8
    assert passes / tiles <= most, passes / tiles
    _check_against_reference(x[:64].to(dtype), k[:64], 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [17, 33, 64, 100, 128])
def test_tiles_of_small_budgets_on_rows_of_16_to_40_tau_match_the_reference(n, dtype):
    # Rows spanning 16–40 τ (tiles of more than 16 entries): budgets within an eighth of the
    # live count from 0 or from it keep the log-sum-exp start (no counting rounds), the others
    # count; the first eight rows span 41–50 τ, so that the first tile counts whatever the
    # budget. Small and large budgets, fractional ones, and a middle one.
    x = seeded_randn(ROWS, n, seed=11 * n + 5)
    span = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).clamp(min=1e-3)
    widths = 16.5 + 23.0 * torch.arange(ROWS, dtype=torch.float64).unsqueeze(-1) / ROWS
    widths[:8] += 25.0
    x = ((x - x.amin(-1, keepdim=True)) * widths / span).to(dtype)
    small = max(1, n // 8)
    for k in [1, 2, small, small + 0.5, n - small, n - 1, n - 0.5, 0.5, n / 2]:
        _check_against_reference(x, torch.full((ROWS,), float(k), dtype=torch.float64), 1.0)


@needs_kernel
@pytest.mark.parametrize(
    ("spread", "dtype"),
    # (float32 at |x/τ| ~ 1e5 resolves θ to ~0.03: the mass check would not hold)
    [(100.0, torch.float32), (1000.0, torch.float32), (100.0, torch.float64), (1e5, torch.float64)],
)
@pytest.mark.parametrize("n", [2, 16, 64, 128])
def test_wide_short_rows_match_the_reference_for_every_budget(n, spread, dtype):
    # Rows far wider than TILE_SOFT·τ, in tiles: they start from counts above cuts (narrowed
    # round by round, then the entries around the last cut) and solve about that start; every
    # integer budget, and half-integers around the middle.
    x = (seeded_randn(ROWS, n, seed=3 * n + 1) * spread).to(dtype)
    for k in [*range(1, n), n / 2 + 0.5, max(n / 2 - 0.5, 0.5)]:
        _check_against_reference(x, torch.full((ROWS,), float(k), dtype=torch.float64), 1.0)


@needs_kernel
@pytest.mark.parametrize("n", [16, 64])
def test_rows_wider_than_the_count_start_resolves_leave_the_tile_for_the_per_row_path(n):
    # Rows of one entry at 1e13 τ above a cluster ~1e3 τ wide: eight rounds of counts leave
    # the cluster in a cell of ~1e6 τ, too wide for a start, so those lanes go to the per-row
    # solve (status 0 all the same); rows spanning 1e12 τ with gaps between their entries do
    # not (their start is read from the entries around the last cut), nor ordinary rows in
    # the same tiles.
    x = seeded_randn(ROWS, n, seed=5 * n)
    x[0::3] *= 1e3
    x[0::3, 0] = 1e13
    x[1::3] *= 1e12
    for k in [1.0, 2.5, n / 2, n - 1.0]:
        _check_against_reference(x, torch.full((ROWS,), k, dtype=torch.float64), 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_random_tiles_of_mixed_rows_match_the_reference(seed, dtype):
    # Property check over the tile's branches at once: a random n ≤ 128, rows of log-uniform
    # spreads from 0.01 to 1e4 τ (narrow and wide starts, several count rounds), random
    # −inf masks on some rows and random per-row budgets in [0, live].
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 129, (1,), generator=generator))
    rows = 24
    scales = 10 ** (torch.rand(rows, 1, generator=generator, dtype=torch.float64) * 6 - 2)
    x = torch.randn(rows, n, generator=generator, dtype=torch.float64) * scales
    masked = (torch.rand(rows, n, generator=generator) < 0.3) & (torch.arange(rows) % 3 == 0)[
        :, None
    ]
    x[masked] = -math.inf
    x[masked.all(-1), 0] = 0.0  # (at least one live entry per row)
    live = (x > -math.inf).sum(-1).double()
    k = torch.rand(rows, generator=generator, dtype=torch.float64) * live
    k[::5] = k[::5].round()
    _check_against_reference(x.to(dtype), k, 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33, 64, 100, 128, 129])
def test_short_row_vjp_matches_the_differentiable_formula(n, dtype):
    # Rows of up to 128 entries are differentiated 8 at a time (a vector's worth of entries
    # at a time, the rest one by one): two tiles and 3 more rows, one of them saturated (its
    # vjp is 0) inside a tile; 129 takes the per-row path.
    x = (seeded_randn(ROWS, n, seed=n) * 3).to(dtype)
    grad = seeded_randn(ROWS, n, seed=n + 1).to(dtype)
    p = soft_topk(x, max(n / 3, 0.5), temperature=0.7)
    p[4] = (torch.arange(n) % 2).to(dtype)
    fused = _native.vjp(grad, p, 0.7)
    assert fused is not None
    with torch.enable_grad():  # the out-of-place, twice-differentiable formula
        expected = _solve.soft_topk_vjp(grad, p, 0.7)
    # |∂L/∂x| ≤ max|g|/(4τ)·2 and |∂L/∂k| ≤ max|g|: absolute errors on that scale (a row of one
    # entry has an exact vjp of 0, computed as a difference of rounded numbers).
    atol = 64 * torch.finfo(dtype).eps * grad.abs().max() / 0.7
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0.0, atol=atol)
    assert bool((fused[0][4] == 0).all()) and fused[1][4].item() == 0.0


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [5, 16, 64])
def test_plus_inf_entries_inside_a_tile_are_solved_like_the_torch_path(n, dtype):
    # Rows with 1–3 entries at +inf (some also masked by −inf) in tiles: the +inf entries take
    # k/m each (at most 1), the finite ones share what is left, per-row budgets on both sides
    # of m and of the live count.
    x = (seeded_randn(ROWS, n, seed=2 * n) * torch.tensor(SPREADS * 3)[:ROWS, None]).to(dtype)
    for row in range(ROWS):
        x[row, [(row + j) % n for j in range(1 + row % 3)]] = math.inf
        if row % 4 == 1 and n > 4:
            x[row, (row + 3) % n] = -math.inf
    plus = (x == math.inf).sum(-1).double()
    live = (x > -math.inf).sum(-1).double()
    share = torch.tensor([0.5, 1.0, 1.5, 0.3, 0.7, 0.95, 1.0] * 3, dtype=torch.float64)[:ROWS]
    k = torch.minimum(plus + (live - plus) * share - 0.25 * (share == 0.5), live)
    p, status, _ = _native.solve(x, k, 1.0)
    assert status.tolist() == [0] * ROWS
    with _native.disabled():
        expected = _solve.solve_soft_topk(x, k.to(dtype), 1.0)
    torch.testing.assert_close(
        p.double(),
        expected.double(),
        rtol=0,
        atol=64 * float(_tolerance(x.nan_to_num(0, 0, 0), 1.0).max()),
    )
    assert bool((p[x == -math.inf] == 0).all())


# ------------------------------------------------------------------ sparse_topk, short rows
# Rows of up to SPARSE_TILE_N = 64 entries are solved 8 at a time, one per vector lane (rows
# the tile does not take or solve: the per-row path); longer ones by Newton passes over x from
# a start at the row's moments, or (long, wide, k < 16) the order-statistics window.


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 17, 33, 64, 100, 128, 129, 300, 512, 513, 700])
def test_sparse_short_rows_match_the_reference(n, dtype):
    rows = 12
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0, 300.0] * 2, dtype=torch.float64)
    x = (seeded_randn(rows, n, seed=5 * n) * scales[:, None]).to(dtype)
    k = _edge_budgets(n, rows)
    p, status, _ = _native.sparse_solve(x, k, 1.0)
    assert status.tolist() == [0] * rows
    expected = sparse_topk_reference(x, k, 1.0)
    eps = torch.finfo(dtype).eps
    scale = x.abs().amax(-1, keepdim=True).double().clamp(min=1.0)
    tolerance = 64 * eps * scale
    difference = (p.double() - expected).abs()
    assert bool((difference <= tolerance).all()), (difference - tolerance).max().item()
    mass_error = (p.double().sum(-1) - k).abs()
    assert bool((mass_error <= n * tolerance.squeeze(-1)).all()), mass_error.max().item()
    assert bool((p[expected == 0] == 0).all()) and bool((p[expected == 1] == 1).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [16, 64, 1000, 1024, 1025])
def test_sparse_short_path_masked_offset_rows_match_the_reference(n, dtype):
    # Half of each row masked by −inf, a common offset of 1000 (the moments the start uses
    # cancel; the result must not), spreads from 0.1 to 300 τ, budgets up to the live count.
    # 10 rows: one tile of 8 (rows ≤ SPARSE_TILE_N = 64) and 2 on the per-row path.
    rows = 10
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0, 100.0, 300.0, 0.5, 30.0, 2.0, 1000.0])
    x = seeded_randn(rows, n, seed=7 * n) * scales[:, None].double() + 1000.0
    order = torch.rand(rows, n, generator=torch.Generator().manual_seed(n)).argsort(-1)
    x = x.scatter(-1, order[:, : n // 2], -math.inf).to(dtype)
    live = n - n // 2
    k = [1.0, 2.5, live / 10, live / 2, live - 1.0, live - 0.5, 1.5, 3.0, live / 3, 2.0]
    k = torch.tensor(k, dtype=torch.float64)
    p, status, _ = _native.sparse_solve(x, k, 1.0)
    assert status.tolist() == [0] * rows
    expected = sparse_topk_reference(x, k, 1.0)
    tolerance = 64 * torch.finfo(dtype).eps * 5000.0
    difference = (p.double() - expected).abs()
    assert bool((difference <= tolerance).all()), difference.max().item()
    assert bool((p[x == -math.inf] == 0).all())
    assert bool((p[expected == 0] == 0).all()) and bool((p[expected == 1] == 1).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_long_rows_match_the_sort_based_solve(dtype):
    # Rows over SPARSE_SHORT_PATH: passes over x from the Gaussian-model start, and (wide rows,
    # k < 16) the order-statistics window; against the PyTorch path's sort-based exact solve.
    scales = torch.tensor([0.1, 1.0, 3.0, 100.0, 1000.0, 0.1, 10.0, 300.0], dtype=torch.float64)
    x = (seeded_randn(8, 5000, seed=11) * scales[:, None] - 40.0).to(dtype)
    x[5, ::3] = -math.inf
    k = torch.tensor([1.0, 2.0, 50.0, 2.5, 15.0, 1600.0, 2500.0, 4999.0], dtype=torch.float64)
    _assert_sparse_kernel_matches_the_sort_based_solve(x, k, 64 * torch.finfo(dtype).eps * 1e4)


def _assert_sparse_kernel_matches_the_sort_based_solve(x, k, tolerance: float):
    """The kernel solves every row (τ = 0.5) as the PyTorch path's sort-based exact solve,
    within ``tolerance``, with the same exact zeros and ones."""
    from gradkit.topk import _sparse

    p, status, _ = _native.sparse_solve(x, k, 0.5)
    assert status.tolist() == [0] * len(k)
    expected = _sparse.solve_sparse_nosync(x.double(), k, 0.5)
    assert bool(((p.double() - expected).abs() <= tolerance).all())
    assert bool((p[expected == 0] == 0).all()) and bool((p[expected == 1] == 1).all())
    return p


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [129, 300, 1000])
def test_sparse_mid_length_rows_of_small_budgets_match_the_sort_based_solve(n, dtype):
    # Rows of 129–1024 entries spanning 4–16 τ or more, budgets below 16: the order-statistics
    # window where the build has AVX-512 (the passes over x elsewhere), masks and ties included.
    scales = torch.tensor([0.3, 0.8, 1.5, 3.0, 10.0, 1.0, 2.0, 100.0], dtype=torch.float64)
    x = seeded_randn(8, n, seed=n + 5) * scales[:, None] + 3.0
    x[5, ::2] = -math.inf
    x[6, : n // 3] = 4.0  # (a third of the row tied at its top)
    x = x.to(dtype)
    k = torch.tensor([1.0, 2.0, 15.0, 2.5, 10.0, 1.0, 3.0, 14.5], dtype=torch.float64)
    p = _assert_sparse_kernel_matches_the_sort_based_solve(x, k, 64 * torch.finfo(dtype).eps * 1e3)
    assert torch.allclose(p.double().sum(-1), k, atol=n * torch.finfo(dtype).eps)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [50, 700])  # (700 ≥ 512: the long-row start; the reference is O(n²))
def test_sparse_kernel_solves_rows_with_infinities_and_nan(n, dtype):
    # +inf entries take k/m each (at most 1) of the budget, the finite ones share the rest;
    # a NaN makes its row (only) NaN; all in the kernel (status 0), as the reference.
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0, 100.0, 1.0] * 2, dtype=torch.float64)
    x = seeded_randn(12, n, seed=n + 1) * scales[:, None]
    x[0, 3] = math.inf
    x[1, :3] = math.inf
    x[2, :10] = math.inf
    x[3, 5] = math.nan
    x[4, :4], x[4, 10:30] = math.inf, -math.inf
    x[5, :] = math.inf
    x[6, :25], x[6, 25] = -math.inf, math.inf
    x[7, :], x[7, 0] = -math.inf, math.inf
    x[8, 7], x[8, 9] = math.inf, -math.inf
    x = x.to(dtype)
    k = torch.tensor([2.5, 3.0, 4.0, 2.0, 20.0, 7.0, 24.0, 0.5, 0.0, n, 1.0, n - 0.5])
    k = k.double()
    p, status, _ = _native.sparse_solve(x, k, 0.7)
    assert status.tolist() == [0] * 12
    expected = sparse_topk_reference(x, k, 0.7)
    assert torch.equal(p.isnan(), expected.isnan()) and bool(p[3].isnan().all())
    tolerance = 64 * torch.finfo(dtype).eps * 1e3
    assert bool(((p.double() - expected).abs().nan_to_num(0.0) <= tolerance).all())
    assert bool((p[:8][x[:8] == math.inf] > 0).all()) and bool((p[8] == 0).all())  # (k = 0)
    assert bool((p[x == -math.inf] == 0).all())
