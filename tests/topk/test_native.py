"""The fused CPU kernel (_native.c) against the PyTorch path and the references.

The rest of the operator's tests run on both paths (conftest.py); these check the kernel's
own contract: it builds where a C compiler exists, it agrees with the PyTorch path and with
an independent reference, it hands back exactly the rows it does not take on, and the
switches that turn it off work.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from support import reference_soft_topk, reference_soft_topk_centred, seeded_randn

from gradkit import soft_topk
from gradkit.topk import _kernel_cache, _native, _solve, _sparse


def _torch_path(x, k, temperature):
    """The operator's forward with PyTorch ops only (the kernel switched off)."""
    with _native.disabled():
        return _solve.solve_soft_topk(x, k, temperature)


needs_kernel = pytest.mark.skipif(
    not _native.available(), reason=f"fused CPU kernel {_native.status()}"
)


def test_kernel_builds_wherever_a_c_compiler_exists(tmp_path):
    # A silent build failure would quietly cost CI (and users) the fast path.  Only a
    # compiler that cannot build even a trivial shared library excuses it.
    compiler, _ = _kernel_cache.compiler_command()
    if os.environ.get("GRADKIT_NATIVE", "1") == "0" or compiler is None:
        pytest.skip("no C compiler, or disabled by GRADKIT_NATIVE=0")
    trivial = tmp_path / "trivial.c"
    trivial.write_text("int answer(void) { return 42; }\n")
    try:
        probe = subprocess.run(
            [*compiler, "-shared", "-fPIC", str(trivial), "-o", str(tmp_path / "trivial.so")],
            capture_output=True,
        )
    except OSError:
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"{compiler} cannot build a shared library here")
    assert _native.available(), _native.status()
    assert _native.status() == "in use"


def _problem(seed: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 40, (), generator=generator))
    n = int(torch.randint(1, 2500, (), generator=generator))
    k = float(torch.randint(0, 2 * n, (), generator=generator)) / 2 + 0.25
    k = min(max(k, 0.25), n - 0.25)
    temperature = float(10 ** torch.empty(()).uniform_(-0.6, 1.0, generator=generator))
    scale = float(10 ** torch.empty(()).uniform_(-3.0, 1.0, generator=generator))
    x = (torch.randn(rows, n, generator=generator) * scale).to(dtype)
    return x, k, temperature


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(12))
def test_kernel_matches_the_torch_path(seed, dtype):
    x, k, temperature = _problem(seed, dtype)
    solved = _native.solve(x, k, 1.0 / temperature)
    assert solved is not None
    p, status, unsolved = solved
    taken = status == 0
    assert unsolved == 0
    assert taken.all(), "finite rows must all be taken on"
    expected = _torch_path(x, k, temperature)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(p[taken], expected[taken], rtol=0, atol=64 * eps)
    mass_error = (p[taken].double().sum(-1) - k).abs().max().item()
    assert mass_error <= 64 * eps * max(k, 1.0)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2.5, 31, 63.75])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kernel_matches_bisection_reference_float64(k, temperature):
    x = torch.randn(20, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    p, status, _ = _native.solve(x, k, 1.0 / temperature)
    assert bool((status == 0).all())
    torch.testing.assert_close(p, reference_soft_topk(x, k, temperature), atol=1e-13, rtol=0)


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
def test_special_rows_are_solved_by_the_kernel_like_the_torch_path(seed):
    # (issue 10: it compared unseeded input to 1e-15; 200 seeds pass the bound below)
    x = torch.randn(6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x[1, 3] = math.nan  # the whole slice is NaN
    x[2, 7] = math.inf  # takes k/m of the budget (here 1), the finite entries the rest
    x[3, 9] = -math.inf  # masked: p = 0
    x[4] *= 100.0  # spread ≫ 16·τ: the order-statistics start
    x[5] = 0.25  # exact ties: p = k/n
    _, status, _ = _native.solve(x, 5.0, 1.0)
    assert status.tolist() == [0] * 6
    p = soft_topk(x, 5)
    with _native.disabled():
        expected = soft_topk(x, 5)
    # Both paths resolve θ to an ulp of the row's scale |x|/τ (τ = 1) and p moves by at most
    # Δθ/(4τ); the rest is rounding in the n-term sums (64 eps).
    eps = torch.finfo(x.dtype).eps
    scale = torch.where(x.isfinite(), x, 0.0).abs().amax(-1, keepdim=True)
    tolerance = 64 * eps + 4 * eps * scale
    difference = torch.where(p.isnan() & expected.isnan(), 0.0, (p - expected).abs())
    assert bool((difference <= tolerance).all()), (difference - tolerance).max().item()
    assert torch.equal(p[1:3].isnan(), expected[1:3].isnan())
    assert torch.equal(p[5], torch.full((50,), 0.1, dtype=torch.float64))
    assert p[3, 9].item() == 0.0


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.01])
@pytest.mark.parametrize("k", [0.0, 1.0, 3.5, 12.0, 19.0, 30.0, 40.0])
def test_kernel_masks_minus_inf_entries_like_the_torch_path(k, temperature, dtype):
    # −inf entries are never selected (p = 0); a budget beyond the live entries selects
    # all of them (p = 1); rows entirely masked are zeros.  Masks of every density, with
    # budgets below, at and above the live count, on both the narrow and the wide start.
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(5, 40, generator=generator).to(dtype)
    density = torch.tensor([[1.0], [0.8], [0.5], [0.1], [0.0]])
    keep = torch.rand(5, 40, generator=generator) < density
    x = torch.where(keep, x, -math.inf)
    _, status, _ = _native.solve(x, k, 1.0 / temperature)
    assert bool((status == 0).all())
    got = soft_topk(x, k, temperature=temperature)
    with _native.disabled():
        expected = soft_topk(x, k, temperature=temperature)
    eps = torch.finfo(dtype).eps
    theta_ulp = eps * 4 / temperature
    torch.testing.assert_close(got, expected, rtol=0, atol=64 * eps + 4 * theta_ulp)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.1, 0.01, 0.001])
@pytest.mark.parametrize(("n", "k"), [(64, 2), (1000, 10), (2000, 700.5), (300, 299)])
def test_kernel_at_small_temperatures_matches_the_torch_path(n, k, temperature, dtype):
    # Rows spanning many τ: order-statistics start, exponentials stored relative to it.
    x = torch.randn(24, n, generator=torch.Generator().manual_seed(11)).to(dtype)
    p, status, _ = _native.solve(x, float(k), 1.0 / temperature)
    assert bool((status == 0).all())
    expected = _torch_path(x, float(k), temperature)
    # Both resolve θ to an ulp of x/τ; p moves by at most v·Δθ/τ ≤ Δθ/(4τ).
    theta_ulp = torch.finfo(dtype).eps * x.abs().max().item() / temperature
    torch.testing.assert_close(p, expected, rtol=0, atol=4 * theta_ulp + 1e-12)
    if dtype == torch.float64:
        torch.testing.assert_close(p, reference_soft_topk(x, k, temperature), atol=1e-9, rtol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [12, 300])
def test_kernel_solves_every_temperature_itself(n, dtype):
    # float32 rows spanning more than 2²⁰ τ are solved in float64, float64 rows spanning more
    # than 2⁴⁶ τ about their ⌈k⌉-th largest entry; both were handed to the PyTorch path
    # (status 1, about 10× slower).  −inf entries in some rows, +inf in others.
    x = (seeded_randn(16, n, seed=22) * 3).to(dtype)
    x[1::4, 2] = -math.inf
    x[2::5, 3] = math.inf
    k = torch.tensor([2.3, 1.7, 5.5, 8.9] * 4, dtype=torch.float64)
    for temperature in (1e-6, 1e-12, 1e-15, 1e-40, 1e-300):
        p, status, _ = _native.solve(x, k, 1.0 / temperature)
        assert status.tolist() == [0] * 16, temperature
        finite = x.isfinite().all(-1)
        expected = reference_soft_topk_centred(x[finite], k[finite], temperature)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(p[finite].double(), expected, atol=64 * eps, rtol=0)
        with _native.disabled():
            torch.testing.assert_close(p, soft_topk(x, k.to(dtype), temperature=temperature))


@needs_kernel
@pytest.mark.parametrize("entry", [_native.solve, _native.sparse_solve])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_solves_count_the_rows_they_hand_back(entry, dtype, threads):
    # The callers read the per-row statuses only when this count is nonzero, so it must be
    # exact, summed over the kernel's threads too.  A NaN budget (the public API rejects it)
    # is a row the kernel does not take on (status 3).
    x = seeded_randn(4096, 64, dtype=dtype, seed=31)
    budgets = torch.full((4096,), 3.0, dtype=torch.float64)
    budgets[5::7] = math.nan
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, status, unsolved = entry(x, budgets, 1.0)
        _, clean_status, clean_unsolved = entry(x, 3.0, 1.0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(status != 0, budgets.isnan())
    assert unsolved == len(range(5, 4096, 7))
    assert clean_unsolved == 0 and int(clean_status.count_nonzero()) == 0


@needs_kernel
@pytest.mark.parametrize("solve", [_solve.solve_soft_topk, _sparse.solve_sparse_topk])
def test_rows_handed_back_are_solved_by_the_torch_path_in_any_batch_shape(solve):
    # The statuses come back flat (one per row); the solve maps the unsolved ones back onto
    # x's batch dimensions.  NaN budgets (internal callers only) are rows the kernel leaves.
    x = seeded_randn(3, 5, 16, seed=32)
    k = torch.full((3, 5), 4.0, dtype=torch.float64)
    k[1, 2] = k[2, 0] = math.nan
    p = solve(x, k, 1.0)
    with _native.disabled():
        expected = solve(x, k, 1.0)
    valid = ~k.isnan()
    torch.testing.assert_close(p[valid], expected[valid], atol=1e-12, rtol=0)
    assert p.shape == x.shape and torch.isfinite(p[valid]).all()


@needs_kernel
def test_kernel_takes_every_row_of_a_common_batch():
    # The benchmark shapes at τ = 1: no row may silently fall back to the slow path.
    for rows, n, k in [(4096, 64, 2), (256, 1000, 10), (16, 32000, 1000)]:
        _, status, _ = _native.solve(seeded_randn(rows, n, dtype=torch.float32), float(k), 1.0)
        assert int(status.count_nonzero()) == 0, (rows, n, k)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_vjp_matches_the_differentiable_formula(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(33, 257, generator=generator).to(dtype)
    grad = torch.randn(33, 257, generator=generator).to(dtype)
    p = soft_topk(x, 12.5, temperature=0.7)
    fused = _native.vjp(grad, p, 0.7)
    assert fused is not None
    with torch.enable_grad():  # the out-of-place, twice-differentiable formula
        expected = _solve.soft_topk_vjp(grad, p, 0.7)
    eps = torch.finfo(dtype).eps
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=64 * eps, atol=64 * eps * want.abs().max())


@needs_kernel
def test_kernel_vjp_of_a_saturated_row_is_zero():
    p = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.9, 0.1, 0.5, 0.5]])
    grad_x, grad_k = _native.vjp(torch.ones_like(p), p, 1.0)
    assert torch.equal(grad_x[0], torch.zeros(4)) and grad_k[0].item() == 0.0
    assert torch.isfinite(grad_x).all()


@needs_kernel
def test_kernel_is_not_used_where_it_cannot_apply():
    x = seeded_randn(8, 30, dtype=torch.float32)
    assert _native.solve(x.half(), 3.0, 1.0) is None  # not float32/float64
    with _native.disabled():
        assert _native.solve(x, 3.0, 1.0) is None
    assert (
        _native.vjp(seeded_randn(8, 30), seeded_randn(8, 30, dtype=torch.float32).sigmoid(), 1.0)
        is None
    )


@needs_kernel
def test_kernel_takes_strided_inputs_and_expanded_cotangents():
    # dim=0 selections arrive transposed, .sum() sends a stride-0 cotangent: one copy each.
    x = seeded_randn(30, 8)
    p, status, _ = _native.solve(x.t(), 3.0, 1.0)
    assert bool((status == 0).all())
    torch.testing.assert_close(p, _torch_path(x.t().contiguous(), 3.0, 1.0))
    g = seeded_randn(30, seed=1).expand(8, 30)
    grad_x, grad_k = _native.vjp(g, p, 1.0)
    with torch.enable_grad():
        expected_x, expected_k = _solve.soft_topk_vjp(g, p, 1.0)
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_k, expected_k)


def test_environment_variable_turns_the_kernel_off():
    code = "from gradkit.topk import _native; print(_native.status())"
    env = {**os.environ, "GRADKIT_NATIVE": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "not in use: disabled by GRADKIT_NATIVE=0"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_missing_compiler_falls_back_with_a_reason(tmp_path):
    code = (
        "import torch; from gradkit import soft_topk; from gradkit.topk import _native\n"
        "p = soft_topk(torch.randn(4, 9, generator=torch.Generator().manual_seed(0)), 3)\n"
        "print(round(float(p.sum()), 4)); print(_native.status())"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    env["GRADKIT_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    total, status = result.stdout.strip().splitlines()
    assert total == "12.0"
    assert status.startswith("not in use:")


@needs_kernel
@pytest.mark.parametrize("offset", [-500.0, 1e3, 1e4])
def test_kernel_keeps_full_precision_for_offset_scores(offset):
    # It solves relative to each row's maximum, so a common offset costs no precision in θ
    # (the PyTorch path's θ is resolved to eps·|θ/τ|: ~1e-4 of mass at offset 1e4).
    x = torch.randn(16, 300, generator=torch.Generator().manual_seed(5)) + offset
    p, status, _ = _native.solve(x, 10.0, 1.0)
    assert bool((status == 0).all())
    expected = reference_soft_topk(x.double(), 10.0, 1.0)
    assert (p.double() - expected).abs().max().item() < 2e-6
    assert (p.double().sum(-1) - 10.0).abs().max().item() < 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_takes_per_row_budgets(dtype):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(7, 40, generator=generator).to(dtype)
    budgets = torch.tensor([0.0, 0.5, 3.0, 17.25, 20.0, 39.5, 40.0], dtype=dtype)
    for temperature in (1.0, 0.01):
        p, status, _ = _native.solve(x, budgets, 1.0 / temperature)
        assert bool((status == 0).all())
        expected = _torch_path(x, budgets, temperature)
        eps = torch.finfo(dtype).eps
        theta_ulp = eps * x.abs().max().item() / temperature
        torch.testing.assert_close(p, expected, rtol=0, atol=64 * eps + 4 * theta_ulp)
        assert torch.equal(p[0], torch.zeros(40, dtype=dtype))
        assert torch.equal(p[-1], torch.ones(40, dtype=dtype))


def _check_against_torch_path(x, k, temperature, atol):
    p, status, _ = _native.solve(x, k, 1.0 / temperature)
    assert bool((status == 0).all())
    torch.testing.assert_close(p, _torch_path(x, k, temperature), rtol=0, atol=atol, equal_nan=True)
    return p


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1.0, 3.0, 4.5, 7.0])
def test_kernel_handles_plus_inf_entries_like_the_torch_path(dtype, k):
    # m entries at +inf take k/m each (at most 1); the finite entries share max(k − m, 0).
    x = seeded_randn(5, 40, seed=11, dtype=dtype)
    x[0, :2] = math.inf
    x[1, :4] = math.inf
    x[2, :10] = math.inf
    x[3, 5] = math.inf
    x[3, 6:20] = -math.inf  # +inf and −inf in one row
    x[4, :] = math.inf  # nothing finite
    eps = torch.finfo(dtype).eps
    p = _check_against_torch_path(x, k, 1.0, atol=200 * eps)
    for row in range(5):
        m = int((x[row] == math.inf).sum())
        assert torch.allclose(
            p[row][x[row] == math.inf], torch.tensor(min(1.0, k / m), dtype=dtype)
        )
        expected_total = min(k, m) + max(0.0, min(k - m, float((x[row].isfinite()).sum())))
        assert abs(float(p[row].sum()) - expected_total) < 100 * eps * 40


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_makes_a_nan_slice_nan_and_leaves_the_others(dtype):
    x = seeded_randn(4, 30, seed=12, dtype=dtype)
    x[1, 4] = math.nan
    x[2, 0] = math.nan
    x[2, 1] = math.inf
    p, status, _ = _native.solve(x, 3.0, 1.0)
    assert bool((status == 0).all())
    assert bool(p[1].isnan().all()) and bool(p[2].isnan().all())
    assert not bool(p[[0, 3]].isnan().any())
    torch.testing.assert_close(p, _torch_path(x, 3.0, 1.0), rtol=0, atol=1e-5, equal_nan=True)


@needs_kernel
@pytest.mark.parametrize("spread", [3.0, 20.0, 300.0, 1e4, 1e6])
@pytest.mark.parametrize("n", [16, 64, 1000, 5000])
def test_wide_rows_match_the_reference_across_budgets_float64(spread, n):
    # The counting start of wide rows (spread > 16·τ), at every budget the grid benchmark
    # uses (including the mid-range budgets of the former k-cliff), per-row budgets and rows
    # with half their entries masked, against the independent float64 bisection.
    x = seeded_randn(3, n, seed=n, dtype=torch.float64) * spread
    budgets = sorted({1, 2, 10, n // 100, n // 10, n // 2, n - 1, 2.5, n / 3 + 0.25} - {0})
    for k in budgets:
        p, status, _ = _native.solve(x, float(k), 1.0)
        assert bool((status == 0).all()), (n, spread, k)
        torch.testing.assert_close(p, reference_soft_topk(x, k), rtol=0, atol=1e-9)
    per_row = torch.tensor([1.0, n / 2 + 0.5, n - 1.5], dtype=torch.float64)
    p, status, _ = _native.solve(x, per_row, 1.0)
    assert bool((status == 0).all())
    torch.testing.assert_close(p, reference_soft_topk(x, per_row), rtol=0, atol=1e-9)
    masked = x.clone()
    masked[:, ::2] = -math.inf
    k = max(1, n // 10)
    p, status, _ = _native.solve(masked, float(k), 1.0)
    assert bool((status == 0).all())
    live = reference_soft_topk(x[:, 1::2], k)
    torch.testing.assert_close(p[:, 1::2], live, rtol=0, atol=1e-9)
    assert bool((p[:, ::2] == 0).all())


@needs_kernel
@pytest.mark.parametrize("spread", [0.1, 3.0, 30.0, 1000.0])
@pytest.mark.parametrize("n", [16, 1000])
def test_kernel_float32_matches_the_float64_reference(spread, n):
    x64 = seeded_randn(4, n, seed=7, dtype=torch.float64) * spread
    x = x64.float()
    for k in sorted({1, 2, 10, n // 10, n // 2, n - 1}):
        p, status, _ = _native.solve(x, float(k), 1.0)
        assert bool((status == 0).all())
        # θ to float32's resolution at the scale of x: |Δp| ≤ max v·|Δθ| ≤ |Δθ|/4.
        theta_ulp = torch.finfo(torch.float32).eps * max(1.0, float(x.abs().max()))
        expected = reference_soft_topk(x.double(), k)
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=16 * theta_ulp + 1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_writes_no_denormal_p(dtype):
    # Wide rows keep G = e^{t₀ − w} up to the edge of T's range: p (or 1 − p) of the entries
    # beyond it would be denormal, and every product or quotient making one costs a microcode
    # assist (2–3× the whole solve at spreads of 15–40·τ).  The kernel writes 0 there: p is 0
    # or at least twice T's least normal number, and still matches the reference.
    tiny = torch.finfo(dtype).tiny
    x64 = seeded_randn(6, 1000, seed=11, dtype=torch.float64) * 20.0
    if dtype == torch.float64:
        x64 = x64 * 16.0  # (float64's range: about 708·τ)
    x64[3:] = x64[3:] * 2.0
    theta_ulp = torch.finfo(dtype).eps * float(x64.abs().max())
    for k in [10.0, 100.0, 500.0, 900.0]:
        p, status, _ = _native.solve(x64.to(dtype), k, 1.0)
        assert bool((status == 0).all()), (k, status.tolist())
        assert bool(((p == 0) | (p >= 2 * tiny)).all()), k
        assert bool((p == 0).any()), k  # (entries beyond the range: the case tested)
        expected = reference_soft_topk(x64.to(dtype).double(), k)
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=16 * theta_ulp + 1e-9)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [300, 1000, 5000])
def test_rows_of_16_to_40_tau_around_the_small_budget_share_match_the_reference(n, dtype):
    # Rows spanning 16–40·τ whose budget lies within an eighth of the live count from 0 or
    # from it start from the log-sum-exp bound (exponentials about the row's top, ≥ e^−40);
    # budgets just beyond that share start from counting rounds.  Gaussian rows (spans of
    # about 18–35·τ) and uniform ones (20–39·τ), plain and with a third of them masked.
    gaussian = seeded_randn(4, n, seed=n, dtype=torch.float64) * torch.tensor(
        [[2.7], [3.0], [4.0], [5.0]]
    )
    uniform = torch.rand(4, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x = torch.cat([gaussian, uniform * torch.tensor([[20.0], [25.0], [33.0], [39.0]])])
    span = (x.amax(1) - x.amin(1)).min()
    assert 16.0 < float(span) and float((x.amax(1) - x.amin(1)).max()) < 40.0
    theta_ulp = torch.finfo(dtype).eps * float(x.abs().max())
    tolerance = 16 * theta_ulp + 4 * n * torch.finfo(torch.float64).eps
    live = torch.arange(n) % 3 != 0
    masked = torch.where(live, x, -math.inf)
    for k in [0.05 * n, n // 10, n / 8, n / 8 + 1.5, n - n // 10, n - n / 8 - 1]:
        p, status, _ = _native.solve(x.to(dtype), float(k), 1.0)
        assert bool((status == 0).all()), (k, status.tolist())
        expected = reference_soft_topk(x.to(dtype).double(), k)
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=tolerance)
        k_live = k * float(live.sum()) / n
        p, status, _ = _native.solve(masked.to(dtype), k_live, 1.0)
        assert bool((status == 0).all()), (k, status.tolist())
        expected = reference_soft_topk(x[:, live].to(dtype).double(), k_live)
        torch.testing.assert_close(p[:, live].double(), expected, rtol=0, atol=tolerance)
        assert bool((p[:, ~live] == 0).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [300, 600, 5000])
@pytest.mark.parametrize("spread", [10.0, 60.0])
def test_long_wide_rows_of_small_budgets_match_the_reference(n, spread, dtype):
    # Wide rows of small budgets start from a list of their top entries (budgets < 15 in
    # long enough rows: 300 entries for k < 2 with AVX-512, 768 without) and iterate on the
    # entries near the root only (rows of ≥ 512): every
    # budget near those limits, flipped budgets (n − k) and masked entries.
    x = seeded_randn(3, n, seed=n + int(spread), dtype=torch.float64) * spread
    # θ to the dtype's resolution at the scale of x, and the reference's own rounding of a
    # mass of n terms (which matters for the budgets n − k).
    theta_ulp = torch.finfo(dtype).eps * float(x.abs().max())
    tolerance = 16 * theta_ulp + 4 * n * torch.finfo(torch.float64).eps
    for k in [1.0, 1.5, 2.0, 13.75, 14.0, 20.0, n - 2.0]:
        p, status, _ = _native.solve(x.to(dtype), k, 1.0)
        assert bool((status == 0).all()), (k, status.tolist())
        expected = reference_soft_topk(x.to(dtype).double(), k)
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=tolerance)
    live = torch.arange(n) % 3 != 0
    masked = torch.where(live, x, -math.inf)
    # (live − 2: the flipped scan, where a masked entry's −inf·(−1/τ) must not enter the list)
    for k in [2.0, 14.5, int(live.sum()) - 2.0]:
        p, status, _ = _native.solve(masked.to(dtype), k, 1.0)
        assert bool((status == 0).all()), (k, status.tolist())
        expected = reference_soft_topk(x[:, live].to(dtype).double(), k)
        torch.testing.assert_close(p[:, live].double(), expected, rtol=0, atol=tolerance)
        assert bool((p[:, ~live] == 0).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1.001, 5.01, 14.001])
def test_long_wide_rows_whose_root_lies_far_below_the_start(k, dtype):
    # 15 tied top entries: the start from the (m+1)-th largest lies ≥ 4·τ above the root, so
    # the iteration on the entries near the start gives way to one on every entry.
    n = 2000
    x = seeded_randn(2, n, seed=11, dtype=torch.float64) * 10 - 60
    x[:, :15] = 0.0
    p, status, _ = _native.solve(x.to(dtype), k, 1.0)
    assert bool((status == 0).all())
    expected = reference_soft_topk(x, k)
    tolerance = 64 * torch.finfo(dtype).eps * 100
    torch.testing.assert_close(p.double(), expected, rtol=0, atol=tolerance)


@needs_kernel
@pytest.mark.parametrize("far_at, count", [(23.5, 100_000), (23.3, 300_000)])
def test_far_entries_weigh_in_to_second_order(far_at, count):
    # Long wide rows iterate on the entries near the start only; each of the others weighs
    # 1/y − 1/y² (y = e^{θ − w} ≥ e^{19} in float64), summed once.  Here the root lies 3·τ
    # below the start and 10⁵ entries sit just past that reach: their second-order weight,
    # ~1e−13 of the mass, is 7–35× the solve's tolerance (8·eps·k), and the row's Σp must
    # still be k to rounding.  The four distinct values give an exact root in mpmath.
    mpmath = pytest.importorskip("mpmath")
    k, groups = 10.5, [(0.1, 10), (0.0, 1), (-far_at, count), (-40.0, 1)]
    x = torch.cat([torch.full((size,), value, dtype=torch.float64) for value, size in groups])
    p, status, _ = _native.solve(x[None], k, 1.0)
    assert int(status[0]) == 0
    with mpmath.workdps(40):

        def mass(theta):
            return sum(size * mpmath.sigmoid(value - theta) for value, size in groups)

        lo, hi = mpmath.mpf(-50), mpmath.mpf(50)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mass(mid) > k else (lo, mid)
        theta = (lo + hi) / 2
        expected = torch.cat(
            [
                torch.full((size,), float(mpmath.sigmoid(value - theta)), dtype=torch.float64)
                for value, size in groups
            ]
        )
    assert abs(float(p.sum()) - k) <= 5e-14
    torch.testing.assert_close(p[0], expected, rtol=1e-12, atol=1e-16)
