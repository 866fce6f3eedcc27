"""sparse_topk's short-row tiles in the fused kernel (rows of n ≤ 64, 8 at a time, one per
vector lane): rows with +inf entries solved inside a tile, p written row by row from x, and
the tiled vjp (rows of n ≤ 128; longer ones row by row).

Only calls with at least 8 rows reach a tile, so these tests use 19 rows (two tiles and 3
rows on the per-row path).  References: the float64 sort-based exact projection
(:func:`gradkit.topk.reference.sparse_topk_reference`) for the solve, the differentiable
formula (:func:`gradkit.topk._sparse.sparse_topk_vjp`) in float64 for the vjp.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from support import kernel_counts, seeded_randn

from gradkit import sparse_topk
from gradkit.topk import _native, _sparse
from gradkit.topk.reference import sparse_topk_reference

needs_kernel = pytest.mark.skipif(
    not _native.available(), reason=f"fused CPU kernel {_native.status()}"
)

ROWS = 19  # two tiles of 8 rows and 3 rows on the per-row path
TILE_NS = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 63, 64]
# row spreads in units of τ: narrow, mid, wide (hard-mask-like) rows side by side in a tile
SPREADS = [0.1, 1.0, 3.0, 10.0, 100.0, 0.3, 30.0, 1000.0]


def _rows(n: int, seed: int) -> torch.Tensor:
    scales = torch.tensor([SPREADS[r % len(SPREADS)] for r in range(ROWS)], dtype=torch.float64)
    return seeded_randn(ROWS, n, seed=seed) * scales[:, None]


def _with_infinities(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One to three +inf entries in most rows (a few also masked by −inf), and per-row budgets
    that leave the finite entries something to share (k − plus in (0, live)), except rows 5
    and 13 (k ≤ plus: the +inf entries share k; not a tile's row) and row 9 (k = live + plus:
    every unmasked entry 1)."""
    x = x.clone()
    rows, n = x.shape
    k = torch.empty(rows, dtype=torch.float64)
    for r in range(rows):
        plus = min(1 + r % 3, n)
        x[r, torch.arange(plus) * 7 % n] = math.inf
        if n >= 6 and r % 4 == 1:
            masked = torch.arange(n)[x[r] != math.inf][: n // 3]
            x[r, masked] = -math.inf
        plus = int((x[r] == math.inf).sum())
        live = int((x[r] > -math.inf).sum()) - plus
        share = [0.5, 0.25, 0.75, 1 / 3][r % 4]
        k[r] = plus + share * live if live > 0 else plus
        if r in (5, 13):
            k[r] = plus * 0.5
        if r == 9:
            k[r] = plus + live
    return x, k


def _assert_close_to_reference(p, x, k, tau):
    expected = sparse_topk_reference(x, k, tau)
    assert torch.equal(p.isnan(), expected.isnan())
    eps = torch.finfo(x.dtype).eps
    finite = torch.where(torch.isfinite(x), x, 0.0).double()
    scale = finite.abs().amax(-1, keepdim=True) / torch.as_tensor(tau).double().reshape(-1, 1)
    tolerance = 64 * eps * scale.clamp(min=1.0)
    difference = (p.double() - expected).abs().nan_to_num(0.0)
    assert bool((difference <= tolerance).all()), (difference - tolerance).max().item()
    # p in [0, 1], exact zeros at −inf; (exact zeros and ones elsewhere are the kernel's own θ's:
    # at a kink the reference may round the other way, within the tolerance above)
    assert bool((((p >= 0) & (p <= 1)) | p.isnan()).all())
    assert bool((p[x == -math.inf] == 0).all())
    return expected


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", TILE_NS)
def test_plus_inf_rows_are_solved_in_the_tile(n, dtype):
    x, k = _with_infinities(_rows(n, seed=31 * n))
    x = x.to(dtype)
    tau = torch.tensor([0.5, 1.0, 2.0, 0.25] * 5, dtype=torch.float64)[:ROWS]
    p, status, _ = _native.sparse_solve(x, k, tau)
    assert status.tolist() == [0] * ROWS
    expected = _assert_close_to_reference(p, x, k, tau)
    plus = (x == math.inf).sum(-1).double()
    finite_share = (k - plus).clamp(min=0) > 0
    # +inf entries hold 1 when the finite entries get a share, k/m each otherwise
    for r in range(ROWS):
        at_inf = p[r][x[r] == math.inf].double()
        value = 1.0 if finite_share[r] else float(k[r] / plus[r])
        assert bool((at_inf == value).all() or (at_inf - value).abs().max() < 1e-6), r
    mass_error = (p.double().sum(-1) - expected.sum(-1)).abs()
    assert bool((mass_error <= 1e3 * n * torch.finfo(dtype).eps).all()), mass_error.max()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", TILE_NS)
def test_tile_rows_of_every_budget_and_spread_match_the_reference(n, dtype):
    # Per-row budgets (fractional, near both ends), per-row τ, −inf masks in some rows, a large
    # common offset in others: p is written row by row from x with the tile's θ.
    x = _rows(n, seed=17 * n + 1)
    x[::3] += 1000.0
    if n >= 4:
        x[1::4, : n // 4] = -math.inf
    x = x.to(dtype)
    live = (x > -math.inf).sum(-1).double()
    shares = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99, 1 / 3, 0.25, 0.75], dtype=torch.float64)
    k = (shares.repeat(3)[:ROWS] * live).clamp(min=0.25 if n > 1 else 0.5)
    k = torch.minimum(k, live - 0.25).clamp(min=0.0) if n > 1 else k.clamp(max=1.0)
    tau = torch.tensor([1.0, 0.5, 2.0] * 7, dtype=torch.float64)[:ROWS]
    p, status, _ = _native.sparse_solve(x, k, tau)
    assert status.tolist() == [0] * ROWS
    expected = _assert_close_to_reference(p, x, k, tau)
    mass_error = (p.double().sum(-1) - expected.sum(-1)).abs()
    assert bool((mass_error <= 1e3 * n * torch.finfo(dtype).eps).all()), mass_error.max()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", TILE_NS)
def test_integer_budgets_on_wide_rows_match_the_reference(n, dtype):
    # One number k for every row, spreads up to 1000 τ (roots on flat pieces of F, p a hard
    # mask), as the benchmark grid's cells.
    x = _rows(n, seed=5 * n + 3).to(dtype)
    for k in sorted({1, 2, max(1, n // 10), max(1, n // 2), max(1, n - 1)}):
        if k >= n:
            continue
        p, status, _ = _native.sparse_solve(x, float(k), 1.0)
        assert status.tolist() == [0] * ROWS
        _assert_close_to_reference(p, x, torch.full((ROWS,), float(k)), 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [*TILE_NS, 100, 127, 128, 129])  # (129: row by row)
def test_tiled_vjp_matches_the_differentiable_formula(n, dtype):
    x, k = _with_infinities(_rows(n, seed=3 * n + 2))
    x[4, 0] = math.nan  # a NaN row inside the first tile: its gradient is NaN
    x = x.to(dtype)
    tau = torch.tensor([0.5, 1.0, 2.0, 0.25] * 5, dtype=torch.float64)[:ROWS].to(dtype)
    p = _sparse.solve_sparse_topk(x, k.to(dtype), tau)
    grad = seeded_randn(ROWS, n, seed=n + 100).to(dtype)
    got = _native.sparse_vjp(grad, p, tau)
    assert got is not None
    want = _sparse.sparse_topk_vjp(grad.double(), p.double(), tau.double())
    eps = torch.finfo(dtype).eps
    atol = 64 * eps * float(grad.abs().max()) / float(tau.min())
    torch.testing.assert_close(got[0].double(), want[0], rtol=0.0, atol=atol, equal_nan=True)
    torch.testing.assert_close(got[1].double(), want[1], rtol=0.0, atol=atol, equal_nan=True)
    assert bool(got[0][4].isnan().all())
    free = (p > 0) & (p < 1)
    assert bool((got[0][~free & ~p.isnan()] == 0).all())  # exactly zero off the free set


@needs_kernel
@pytest.mark.parametrize("n", [16, 64])
def test_operator_gradients_through_the_tiles(n):
    # sparse_topk end to end (tile solve and tiled vjp) against the same in float64 through
    # the PyTorch path.
    x, k = _with_infinities(_rows(n, seed=n + 7))
    x32 = x.float().requires_grad_(True)
    grad = seeded_randn(ROWS, n, seed=n + 8)
    sparse_topk(x32, k.float()).backward(grad.float())
    with _native.disabled():
        x64 = x.clone().requires_grad_(True)
        sparse_topk(x64, k).backward(grad)
    finite = torch.isfinite(x)
    torch.testing.assert_close(
        x32.grad[finite].double(), x64.grad[finite], rtol=0.0, atol=1e-4, equal_nan=True
    )


@needs_kernel
@pytest.mark.parametrize("n", [2, 3, 5, 8, 9, 12, 16])
def test_wide_float32_rows_from_the_sorted_start_match_the_reference(n):
    # float32 tiles of n ≤ 16 with a row spanning more than 16 τ start from the order
    # statistics of a sorting network (then the float passes and the exact pass, or the double
    # passes in tiles with a row spanning more than 4096 τ): every row wide, ties (rounded
    # entries), −inf masks, +inf entries, integer and fractional per-row budgets, roots on flat
    # pieces and inside.
    rows = 64
    spreads = torch.logspace(1.3, 4.0, rows, dtype=torch.float64)
    x = seeded_randn(rows, n, seed=400 + n) * spreads[:, None]
    x[::5] = x[::5].round()  # ties
    x[1::7, 0] = -math.inf
    x[2::9, -1] = math.inf
    x[3::6, : n // 2] = x[3::6, :1]  # a block of equal entries
    x = x.float()
    plus = (x == math.inf).sum(-1).double()
    live = (x > -math.inf).sum(-1).double() - plus
    shares = torch.tensor([0.5, 0.25, 0.75, 1 / 3, 0.9, 0.1], dtype=torch.float64)
    fractional = plus + shares.repeat(11)[:rows] * live
    whole = plus + (shares.repeat(11)[:rows] * live).round().clamp(min=1.0)
    for k in (fractional, torch.minimum(whole, plus + live - 1).clamp(min=plus + 0.5)):
        p, status, _ = _native.sparse_solve(x, k, 1.0)
        assert status.tolist() == [0] * rows
        _assert_close_to_reference(p, x, k, 1.0)  # (to within rounding at |x|: up to 1e4 τ)


@needs_kernel
@pytest.mark.parametrize("tau", [1e-3, 1e-25, 1e-38, 1e-300])
@pytest.mark.parametrize("n", [16, 64])
def test_float32_tiles_whose_w_leaves_float_range_match_the_reference(n, tau):
    # float32 tiles take their passes on w = (x − max)/τ rounded to float while every row's w
    # fits in float (here up to 1e25·|x|), else in float64 (1e38 and 1e300: beyond float's
    # range).  Whole budgets: roots on flat pieces of F, exact at any τ.
    x = (seeded_randn(ROWS, n, seed=900 + n) * 3).float()
    x[::2, 1] = x[::2, 0] * (1 + 2**-20)  # near-ties at the top
    whole = torch.tensor([1.0, 2.0, 3.0, 0.5 * n, n - 1.0] * 4, dtype=torch.float64)[:ROWS]
    p, status, _ = _native.sparse_solve(x, whole, tau)
    assert status.tolist() == [0] * ROWS
    _assert_close_to_reference(p, x, whole, tau)


@needs_kernel
@pytest.mark.parametrize("n", [9, 16, 17, 32, 64])
def test_float32_tiles_of_the_float_passes_match_the_reference(n):
    # float32 tiles whose rows all span 2–4096 τ take their passes in float, then the exact
    # pass (rows of n ≤ 16 wider than 16 τ from a sorting network's bracket).  Fractional,
    # whole and per-row budgets, −inf masks and +inf entries.
    rows = 64
    top = 3.5 if n <= 16 else 800.0
    spreads = torch.logspace(math.log10(0.6), math.log10(top / 3.5), rows, dtype=torch.float64)
    x = seeded_randn(rows, n, seed=700 + n) * spreads[:, None]
    x[1::7, 0] = -math.inf
    x[2::9, -1] = math.inf
    x = x.float()
    plus = (x == math.inf).sum(-1).double()
    live = (x > -math.inf).sum(-1).double() - plus
    shares = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.95, 1 / 3, 0.1, 0.9], dtype=torch.float64)
    fractional = plus + shares.repeat(8) * live
    whole = plus + (shares.repeat(8) * live).round().clamp(1.0, n - 2.0)
    for k in (fractional, torch.minimum(whole, plus + live - 1)):
        p, status, _ = _native.sparse_solve(x, k, 1.0)
        assert status.tolist() == [0] * rows
        expected = _assert_close_to_reference(p, x, k, 1.0)
        mass_error = (p.double().sum(-1) - expected.sum(-1)).abs()
        assert bool((mass_error <= 64 * n * torch.finfo(torch.float32).eps).all())


@needs_kernel
@pytest.mark.parametrize("n", [8, 16, 32])
def test_float32_tiles_with_roots_at_breakpoints_keep_them_without_the_double_passes(n):
    # Whole budgets on rows of a few τ: many roots lie on a flat piece of F (no entry free)
    # and the float passes often end at its end, on an entry's breakpoint, or with a root at
    # such a breakpoint.  The exact pass keeps those (a flat lane moved into its piece, the
    # others checked in double): no lane goes back to the double passes, and p is the
    # reference's.
    library = _native._load()
    _tile_counts(library)  # (reset)
    rows = 2048
    spreads = torch.tensor([1.5, 3.0], dtype=torch.float64).repeat(rows // 2)[:, None]
    x = (seeded_randn(rows, n, seed=950 + n) * spreads).float()
    k = (torch.arange(rows) % (n - 1) + 1).double()
    p, status, _ = _native.sparse_solve(x, k, 1.0)
    assert status.eq(0).all()
    assert _tile_counts(library) == (0, 0)
    _assert_close_to_reference(p, x, k, 1.0)
    # (a root on a flat piece: its end within rounding of an entry's breakpoint, in some rows)
    ordered = x.double().sort(dim=-1, descending=True).values
    kth = ordered.gather(1, k.long()[:, None] - 1)
    gap = kth - 1 - ordered.gather(1, k.long()[:, None])
    assert int((gap > 1e-3).sum()) >= 20


def _kink_rows(rows: int, n: int) -> torch.Tensor:
    """Rows whose root lies among clusters of entries a few 1e-7 apart at its kinks (p = 1 at
    w − 1 = θ, p = 0 at w = θ), with the row's top at 256 τ, where float rounds every w of a
    cluster to one value: for k = 12.5 (τ = 1) the float passes end on the wrong piece of F."""
    x = torch.full((rows, n), -10.0, dtype=torch.float64)
    offsets = (torch.arange(10, dtype=torch.float64) - 4.5) * 1e-7
    shift = (torch.rand(rows, 1, generator=torch.Generator().manual_seed(5)) - 0.5) * 1e-6
    x[:, 0] = 256.0
    x[:, 1:11] = 1.0 + offsets + shift  # p = 1 − a few 1e-7, or exactly 1
    x[:, 11:21] = offsets + shift  # p = 0, or a few 1e-7
    x[:, 21:24] = 0.5 + shift  # free
    return x.float()


def _rounded_rows(rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with their top at 260 τ, the rest in (−2, 2), where float rounds w = x − top by up
    to 1.5e-5: each row's budget puts its root 4e-6 below the w of an entry that float rounds
    down by more than 1e-5 (free in double, with p = 4e-6; not free at the float root)."""
    x, budgets = [], []
    seed = 0
    while len(x) < rows:
        row = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 4 - 2).double()
        seed += 1
        row[0] = 260.0
        w = row - 260.0
        rounded_down = ((w.float().double() - w)[1:] < -1e-5).nonzero()
        if len(rounded_down) == 0:
            continue
        root = w[1 + int(rounded_down[0])] - 4e-6
        x.append(row.float())
        budgets.append(float((w - root).clamp(0.0, 1.0).sum()))
    return torch.stack(x), torch.tensor(budgets, dtype=torch.float64)


@needs_kernel
@pytest.mark.parametrize("case", ["spread", "kink", "rounded"])
def test_float32_tiles_find_the_double_passes_root_to_the_bit(case):
    # The same seven rows in a tile of the float passes (its rows span 2–4096 τ) and in a tile
    # that an eighth row spanning more than 4096 τ keeps on the double passes: the exact pass
    # after the float passes gives the double passes' root, bit for bit, also where the float
    # passes end on the wrong piece of F (kink rows: the exact pass hands those to the double
    # passes), and where float's rounding of w leaves an entry off F at the float root (rounded
    # rows: the exact pass checks those in double).  Fractional budgets: no root on a flat
    # piece, where any θ of the piece is a root.
    n = 32
    k = torch.full((7,), 12.5 if case == "kink" else 7.3, dtype=torch.float64)
    if case == "rounded":
        rows, k = _rounded_rows(7, n)
    else:
        rows = _kink_rows(7, n) if case == "kink" else (seeded_randn(7, n, seed=61) * 20).float()
    wide = (seeded_randn(1, n, seed=62) * 3000).float()
    x = torch.cat([rows, rows[:1], rows, wide])  # two tiles of 8 rows
    k = torch.cat([k, k[:1], k, torch.tensor([7.3], dtype=torch.float64)])
    p, status, _ = _native.sparse_solve(x, k, 1.0)
    assert status.tolist() == [0] * 16
    assert torch.equal(p[:7], p[8:15])
    _assert_close_to_reference(p, x, k, 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 13, 16])
def test_the_tiles_sorting_network_sorts_each_row(n, dtype):
    # The short-row tiles' starts read order statistics off a sorting network across the
    # lanes (vectors in registers; float64 tiles sort two halves of four lanes). A wrong
    # network would only slow the solves, which converge from any start: checked here on its
    # own, through the kernel's test entry point, against torch.sort. Ties, ±inf, rows of 16
    # and 19 (two whole tiles; the last 3 rows are not written).
    x = seeded_randn(19, n, seed=80 + n).to(dtype)
    x[::3] = x[::3].round()  # ties
    x[1::4, 0] = -math.inf
    x[2::5, -1] = math.inf
    out = torch.full_like(x, math.nan)
    library = _native._load()
    entry = library.gradkit_sort_tiles
    entry.restype = ctypes.c_int
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    entry.argtypes = [ctypes.c_int, pointer, pointer, int64, int64]
    assert entry(int(dtype == torch.float64), x.data_ptr(), out.data_ptr(), 19, n) == 0
    assert torch.equal(out[:16], x[:16].sort(dim=-1, descending=True).values)
    assert bool(out[16:].isnan().all())
    assert entry(0, x.data_ptr(), out.data_ptr(), 19, 17) == 1  # (n > 16: refused)


@needs_kernel
@pytest.mark.parametrize("n", [5, 9, 16])
def test_float32_tiles_of_budgets_near_the_ends_from_the_sorted_start_match_the_reference(n):
    # Tiles of rows spanning 8–16 τ whose budgets all lie within a quarter of the live count
    # from 0 or from it start from the sorting network's order statistics too (other budgets:
    # the float passes). Fractional and whole budgets, masks and +inf entries.
    rows = 64
    x = seeded_randn(rows, n, seed=600 + n)
    span = x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)
    x = (x / span * torch.linspace(8.5, 15.5, rows, dtype=torch.float64)[:, None]).float()
    x[1::7, 0] = -math.inf
    x[2::9, -1] = math.inf
    plus = (x == math.inf).sum(-1).double()
    live = (x > -math.inf).sum(-1).double() - plus
    for share in (0.1, 0.25, 0.8, 0.95, 0.5):
        for k in (plus + share * live, plus + (share * live).round().clamp(1.0, n - 2.0)):
            k = torch.minimum(k, plus + live - 0.5)
            p, status, _ = _native.sparse_solve(x, k, 1.0)
            assert status.tolist() == [0] * rows
            _assert_close_to_reference(p, x, k, 1.0)


def _tile_counts(library) -> tuple[int, int]:
    """``gradkit_sparse_tile_counts``: (rows a tile took but handed to sparse_row unsolved,
    float32 lanes sent back from the exact pass to the double passes) since the last call."""
    return kernel_counts(library, "gradkit_sparse_tile_counts")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 5, 8, 16, 33, 64])
def test_the_tiles_solve_the_rows_they_take_without_falling_back(n, dtype):
    # A tile's rows converge there: a lane that does not goes to sparse_row, which solves it
    # correctly, so a broken tile step (a lane that never moves, say) would only cost time.
    # The kernel counts those hand-overs (and float32 lanes sent back to the double passes):
    # none on rows of every spread, masks, per-row fractional and whole budgets.
    library = _native._load()
    _tile_counts(library)  # (reset)
    rows = 2048
    generator = torch.Generator().manual_seed(900 + n)
    spreads = torch.tensor(SPREADS, dtype=torch.float64).repeat(rows // len(SPREADS))
    x = torch.randn(rows, n, generator=generator, dtype=torch.float64) * spreads[:, None]
    x[1::7, 0] = -math.inf
    live = (x > -math.inf).sum(-1).double()
    k = torch.rand(rows, generator=generator, dtype=torch.float64) * (live - 0.5) + 0.25
    k[::3] = k[::3].round().clamp(min=1.0)
    k = torch.minimum(k, live - 0.5)
    p, status, _ = _native.sparse_solve(x.to(dtype), k, 1.0)
    assert status.eq(0).all()
    assert _tile_counts(library) == (0, 0)
    _assert_close_to_reference(p[:64], x.to(dtype)[:64], k[:64], 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [12, 17, 33, 64])
def test_tiles_of_budgets_near_the_ends_start_from_a_list_of_their_extreme_entries(n, dtype):
    # Tiles of more than 16 entries (any in float64) spanning more than τ read the order
    # statistics of budgets below 8 (4 in tiles of 16 or fewer), or as near n, off a per-lane
    # list of the largest (smallest) entries: the start brackets the root. Budgets at both
    # ends and in the middle in one tile, whole and fractional; ties at the top, +inf entries
    # (counted in k), −inf masks (at the bottom of the list), a NaN row; spreads 0.7–1000 τ.
    library = _native._load()
    _tile_counts(library)  # (reset)
    rows = 576
    generator = torch.Generator().manual_seed(950 + n)
    spreads = torch.tensor([1.5, 3.0, 10.0, 100.0, 1000.0, 0.7, 30.0, 5.0], dtype=torch.float64)
    x = torch.randn(rows, n, generator=generator, dtype=torch.float64) * spreads.repeat(72)[:, None]
    x[::5, 1] = x[::5, 0] = x[::5].amax(-1)  # a tie at the top
    x[3::7, 2] = math.inf
    x[4::9, -3:] = -math.inf
    x[100, 5] = math.nan
    plus = (x == math.inf).sum(-1).double()
    live = (x > -math.inf).sum(-1).double() - plus
    shares = torch.tensor([0.5, 1.0, 2.7, 3.9, 5.0, 7.5, 12.0, -0.5, -2.5, -3.5, -6.0, -7.9])
    share = shares.double().repeat(rows // len(shares))
    k = plus + torch.where(share > 0, share, live + share).clamp(0.25, None).minimum(live - 0.25)
    p, status, _ = _native.sparse_solve(x.to(dtype), k, 1.0)
    assert status.eq(0).all()
    assert _tile_counts(library) == (0, 0)
    _assert_close_to_reference(p, x.to(dtype), k, 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 4, 5, 8, 9, 16, 17, 40, 64])
def test_the_tiles_lists_give_the_order_statistics_of_budgets_near_the_ends(n, dtype):
    # The lists of each lane's largest (smallest) entries, 8 long in tiles of more than 16
    # entries and 4 otherwise, give the ⌈k⌉-th and (⌊k⌋+1)-th largest for budgets below that
    # length (or within it of n), NaN otherwise: checked on their own, through
    # the kernel's test entry point, against torch.sort. A wrong list or rank would only slow
    # the solves (they converge from any start). Ties, ±inf entries, whole and fractional k;
    # 19 rows (two whole tiles; the last 3 rows are not written).
    x = seeded_randn(19, n, seed=990 + n).to(dtype)
    x[::3] = x[::3].round()  # ties
    x[1::4, 0] = -math.inf
    x[2::5, -1] = math.inf
    shares = torch.tensor([0.5, 2.0, 3.5, 4.0, 5.5, 7.0, 7.5, 8.0], dtype=torch.float64)
    k = torch.cat([shares, n - shares, shares[:3]]).clamp(0.25, n - 0.25)
    length = 8 if n > 16 else 4
    a = torch.full((19,), 7.0, dtype=dtype)
    b = torch.full((19,), 7.0, dtype=dtype)
    library = _native._load()
    entry = library.gradkit_order_tiles
    entry.restype = ctypes.c_int
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    entry.argtypes = [ctypes.c_int, pointer, pointer, pointer, pointer, int64, int64]
    double = int(dtype == torch.float64)
    assert entry(double, x.data_ptr(), k.data_ptr(), a.data_ptr(), b.data_ptr(), 19, n) == 0
    ordered = x.sort(dim=-1, descending=True).values
    for r in range(16):
        budget = float(k[r])
        if budget < length or budget > n - length:
            up, down = math.ceil(budget) - 1, math.floor(budget)
            assert torch.equal(a[r], ordered[r, up]), (r, budget)
            assert torch.equal(b[r], ordered[r, down]), (r, budget)
        else:
            assert bool(a[r].isnan() and b[r].isnan()), (r, budget)
    assert bool((a[16:] == 7).all() and (b[16:] == 7).all())
    assert entry(0, x.data_ptr(), k.data_ptr(), a.data_ptr(), b.data_ptr(), 19, 65) == 1


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 8, 16, 33, 64])
def test_narrow_tiles_solved_at_their_all_free_root_match_the_reference(n, dtype):
    # Rows narrower than τ whose entries all lie free at the all-free root
    # (Σw + |U| − k)/|F| take that root without a pass; the others in the same tiles (a budget
    # share below the row's width, or an entry half a τ below the rest) take the passes.
    # +inf entries (in U) and −inf masks in some rows.
    generator = torch.Generator().manual_seed(40 + n)
    width = torch.rand(ROWS, 1, generator=generator, dtype=torch.float64) * 0.4
    x = torch.rand(ROWS, n, generator=generator, dtype=torch.float64) * width
    plus = torch.zeros(ROWS, dtype=torch.float64)
    if n >= 4:
        x[1::4, 1] = math.inf
        x[2::4, 2] = -math.inf
        plus[1::4] = 1.0
    if n >= 3:
        x[::5, 0] -= 0.5  # (not free at the all-free root of the rest)
    live = (x > -math.inf).sum(-1).double() - plus
    share = torch.tensor([0.5, 0.7, 0.45, 0.1, 0.9, 0.6] * 4, dtype=torch.float64)[:ROWS]
    k = plus + share * live
    p, status, _ = _native.sparse_solve(x.to(dtype), k, 1.0)
    assert status.tolist() == [0] * ROWS
    _assert_close_to_reference(p, x.to(dtype), k, 1.0)
