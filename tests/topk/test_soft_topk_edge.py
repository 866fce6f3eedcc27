"""soft_topk edge cases: k = 0 / n, ±inf, NaN, ties, extreme scales, half precision, hard=True."""

from __future__ import annotations

import math

import pytest
import torch
from support import cluster_at_the_root, reference_soft_topk, reference_soft_topk_centred
from support import seeded_randn as _randn

from gradkit import soft_topk

# Every test here runs on both paths (see conftest.py).
pytestmark = pytest.mark.usefixtures("solver_path")

INF = math.inf


def _grad(x: torch.Tensor, fn, seed=1) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(weights.to(out.dtype))
    return x.grad


# ------------------------------------------------------------------------ k = 0 and n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_zero_gives_zeros_and_k_n_gives_ones_with_zero_gradient(dtype):
    x = _randn(3, 7, dtype=dtype)
    for k, value in [(0, 0.0), (7, 1.0)]:
        p = soft_topk(x, k, temperature=0.3)
        assert torch.equal(p, torch.full_like(x, value))
        grad = _grad(x, lambda a, k=k: soft_topk(a, k, temperature=0.3))
        assert torch.equal(grad, torch.zeros_like(x))


def test_k_tensor_mixing_trivial_and_regular_slices():
    x = _randn(3, 5)
    k = torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    p = soft_topk(x, k)
    assert torch.equal(p[0], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(p[2], torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(p[1], reference_soft_topk(x[1], 2.0), atol=1e-12, rtol=0)
    p.pow(2).sum().backward()
    assert torch.isfinite(k.grad).all()


# ------------------------------------------------------------------------------- ±inf


def test_minus_inf_entries_are_masked_out():
    x = _randn(2, 8)
    x[0, [1, 4]] = -INF
    x[1, 0] = -INF
    p = soft_topk(x, 2.5, temperature=0.7)
    assert p[0, 1] == 0 and p[0, 4] == 0 and p[1, 0] == 0
    keep0 = torch.isfinite(x[0])
    torch.testing.assert_close(
        p[0, keep0], reference_soft_topk(x[0, keep0], 2.5, 0.7), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        p[1, 1:], reference_soft_topk(x[1, 1:], 2.5, 0.7), atol=1e-12, rtol=0
    )
    grad = _grad(x, lambda a: soft_topk(a, 2.5, temperature=0.7))
    assert torch.isfinite(grad).all()
    assert grad[0, 1] == 0 and grad[0, 4] == 0 and grad[1, 0] == 0


def test_budget_beyond_the_selectable_entries_selects_all_of_them():
    x = torch.tensor([0.5, -INF, 2.0, -INF, -INF], dtype=torch.float64)
    p = soft_topk(x, 3)
    assert torch.equal(p, torch.tensor([1.0, 0, 1, 0, 0], dtype=torch.float64))
    assert torch.equal(_grad(x, lambda a: soft_topk(a, 3)), torch.zeros(5, dtype=torch.float64))
    # An all −inf slice selects nothing.
    assert torch.equal(soft_topk(torch.full((4,), -INF), 2), torch.zeros(4))


def test_plus_inf_entries_use_up_the_budget():
    x = torch.tensor([1.0, INF, 0.0, -1.0, 2.0], dtype=torch.float64)
    p = soft_topk(x, 2.5)
    assert p[1] == 1
    finite = torch.isfinite(x)
    torch.testing.assert_close(p[finite], reference_soft_topk(x[finite], 1.5), atol=1e-12, rtol=0)
    assert torch.isfinite(_grad(x, lambda a: soft_topk(a, 2.5))).all()


def test_more_plus_inf_entries_than_the_budget_share_it():
    x = torch.tensor([INF, 3.0, INF, INF, -INF])
    p = soft_topk(x, 2)
    torch.testing.assert_close(p, torch.tensor([2 / 3, 0, 2 / 3, 2 / 3, 0]))
    assert torch.isfinite(_grad(x, lambda a: soft_topk(a, 2))).all()


def test_nan_poisons_only_its_own_slice():
    x = _randn(3, 6)
    x[1, 2] = math.nan
    p = soft_topk(x, 2)
    assert torch.isnan(p[1]).all()
    clean = soft_topk(x[[0, 2]], 2)
    # The other slices are solved as if alone (same threshold); only σ's vectorised kernel
    # may round their tails differently for a different tensor length: an ulp or two.
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(p[[0, 2]], clean, rtol=0, atol=4 * eps)
    grad = _grad(x, lambda a: soft_topk(a, 2))
    assert torch.isfinite(grad[[0, 2]]).all()
    # Along another dim, the NaN poisons its column only.
    p_cols = soft_topk(x, 1, dim=0)
    assert torch.isnan(p_cols[:, 2]).all() and not torch.isnan(p_cols[:, [0, 1, 3, 4, 5]]).any()


# ------------------------------------------------------------------------------- ties


@pytest.mark.parametrize("k", [1, 2.5, 4])
def test_all_tied_gives_k_over_n(k):
    p = soft_topk(torch.full((2, 5), 3.7, dtype=torch.float64), k, temperature=0.01)
    torch.testing.assert_close(
        p, torch.full((2, 5), k / 5, dtype=torch.float64), atol=1e-14, rtol=0
    )
    grad = _grad(torch.full((2, 5), 3.7, dtype=torch.float64), lambda a: soft_topk(a, k))
    assert torch.isfinite(grad).all()


def test_tied_entries_get_equal_values():
    x = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0], dtype=torch.float64)
    p = soft_topk(x, 2, temperature=0.05)
    assert p[1] == p[2] == p[4]
    torch.testing.assert_close(p[[1, 2, 4]], torch.full((3,), 2 / 3, dtype=torch.float64))


# ------------------------------------------------------------------------------ scales


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e10, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scales_stay_finite_and_meet_the_budget(scale, dtype):
    x = (_randn(4, 50) * scale).to(dtype)
    k = 5
    p = soft_topk(x, k)
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(
        p.double().sum(-1), torch.full((4,), 5.0, dtype=torch.float64), atol=tol, rtol=0
    )
    grad = _grad(x, lambda a: soft_topk(a, k))
    assert torch.isfinite(grad).all()
    if dtype == torch.float64 and scale <= 1e3:
        torch.testing.assert_close(p, reference_soft_topk(x, k), atol=1e-11, rtol=0)
    if scale >= 1e10:  # saturated: the hard mask, and an exactly zero gradient
        top = torch.zeros_like(x).scatter(-1, x.topk(k, -1).indices, 1.0)
        assert torch.equal(p, top)
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("temperature", [1e-30, 1e-8, 1e8, 1e30])
def test_extreme_temperatures(temperature):
    x = _randn(3, 20)
    p = soft_topk(x, 4.5, temperature=temperature)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.full((3,), 4.5, dtype=torch.float64))
    assert torch.isfinite(_grad(x, lambda a: soft_topk(a, 4.5, temperature=temperature))).all()
    if temperature >= 1e8:
        torch.testing.assert_close(p, torch.full_like(p, 4.5 / 20))


@pytest.mark.parametrize("n", [12, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1e-6, 1e-12, 1e-20, 1e-300])
def test_small_temperatures_keep_a_fractional_budget(temperature, dtype, n):
    # Budgets whose fraction lands on one entry (p = 0.3, not σ(0) = 0.5): about 0, w = x/τ
    # cannot hold that entry's p once τ ≪ ulp(x), so slices this wide are solved about a
    # centre near the root (the kernel solves float32 rows spanning more than 2²⁰ τ in
    # float64, and float64 rows spanning more than 2⁴⁶ τ about a pivot; the PyTorch path
    # centres them too); ±inf entries in some slices,
    # ties in others; 13 rows: a tile of 8 and 5 on the kernel's per-row path (n = 12), all
    # per-row (n = 200).
    x = _randn(13, n).mul(3).to(dtype)
    x[1::4, 2] = -INF
    x[2::5, 3] = INF
    x[3::4, 1] = x[3::4, 0]
    k = torch.tensor([2.3, 1.7, 5.5, 8.9] * 4, dtype=dtype)[:13]
    p = soft_topk(x, k, temperature=temperature)
    assert not bool(p.isnan().any())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(p.double().sum(-1), k.double(), atol=64 * n * eps, rtol=0)
    assert torch.isfinite(_grad(x, lambda a: soft_topk(a, k, temperature=temperature))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [12, 60, 300])
def test_a_cluster_at_the_root_keeps_full_precision(n, dtype):
    # w = x/τ (or x/τ − t₀ about a start far from the cluster) kept only eps·|x|/τ units: Σp
    # missed k by up to 8e−4 in float64 at τ = 1e−12 (the kernel's wide rows), 4e−3 in float32
    # at 1e−4; p was off by up to 0.2 in float32 with a common offset of 1e4 (PyTorch path).
    eps = torch.finfo(dtype).eps
    for temperature in (1e-2, 1e-4, 1e-6, 1e-9, 1e-12):
        x = cluster_at_the_root(16, n, temperature, dtype, seed=n)
        for offset in (0.0, 1e4):
            shifted = x + offset if offset == 0.0 or dtype == torch.float64 else x
            p = soft_topk(shifted, 4.3, temperature=temperature)
            expected = reference_soft_topk_centred(shifted, 4.3, temperature)
            message = f"τ = {temperature}, offset {offset}"
            torch.testing.assert_close(p.double(), expected, atol=64 * eps, rtol=0, msg=message)


def test_a_common_offset_keeps_full_precision():
    # x/τ ≈ 1e7 in float32: about 0, w kept a unit of τ at most.
    x = (_randn(16, 50, seed=21) * 0.003 + 1e4).to(torch.float32)
    p = soft_topk(x, 4.3, temperature=1e-3)
    expected = reference_soft_topk_centred(x, 4.3, 1e-3)
    torch.testing.assert_close(p.double(), expected, atol=64 * 2.0**-23, rtol=0)


def test_mixed_scales_within_a_slice_resolve_the_small_entries():
    # The budget left after 1e30 is decided among O(1) entries: their resolution must not be
    # lost to the huge one.
    x = torch.tensor([1e30, -1e30, 0.0, 0.5, -0.3], dtype=torch.float64)
    p = soft_topk(x, 2.2)
    assert p[0] == 1 and p[1] == 0
    torch.testing.assert_close(p[2:], reference_soft_topk(x[2:], 1.2), atol=1e-12, rtol=0)


def test_saturated_gaps_give_exact_hard_mask_and_zero_gradient():
    x = torch.tensor([[1000.0, 0.0, -5.0, 3.0], [0.0, 1e-3, 2e-3, 3e-3]])
    p = soft_topk(x, 1, temperature=1e-6)
    assert torch.equal(p[0], torch.tensor([1.0, 0, 0, 0]))
    grad = _grad(x, lambda a: soft_topk(a, 1, temperature=1e-6))
    assert torch.isfinite(grad).all() and torch.equal(grad[0], torch.zeros(4))


# ---------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_preserved_and_finite(dtype):
    x32 = _randn(4, 30, dtype=torch.float32) * 3
    x = x32.to(dtype)
    p = soft_topk(x, 6, temperature=0.5)
    assert p.dtype == dtype and torch.isfinite(p).all()
    torch.testing.assert_close(
        p.float(), soft_topk(x.float(), 6, temperature=0.5), atol=1e-2, rtol=0
    )
    torch.testing.assert_close(p.float().sum(-1), torch.full((4,), 6.0), atol=0.1, rtol=0)
    grad = _grad(x, lambda a: soft_topk(a, 6, temperature=0.5))
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    big = soft_topk(torch.full((8,), 6e4, dtype=dtype) * torch.arange(8).to(dtype) / 8, 3)
    assert big.dtype == dtype and torch.isfinite(big).all()


def test_half_precision_gradient_saturates_instead_of_overflowing():
    x = torch.zeros(2, 2, dtype=torch.float16)  # ties: gradient 1/(8τ) = 1.25e7 > 65504
    grad = _grad(x, lambda a: soft_topk(a, 1, temperature=1e-8))
    assert torch.isfinite(grad).all() and grad.abs().max() == torch.finfo(torch.float16).max


# ------------------------------------------------------------------------------ hard


def test_hard_equals_topk_mask_with_soft_gradient():
    x = _randn(5, 12) * 2
    hard = soft_topk(x, 4, temperature=0.5, hard=True)
    expected = torch.zeros_like(x).scatter(-1, torch.topk(x, 4, dim=-1).indices, 1.0)
    assert torch.equal(hard, expected)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    hard_grad = _grad(x, lambda a: soft_topk(a, 4, temperature=0.5, hard=True))
    soft_grad = _grad(x, lambda a: soft_topk(a, 4, temperature=0.5))
    torch.testing.assert_close(hard_grad, soft_grad)


def test_hard_along_dim_and_per_slice_k():
    x = _randn(6, 3)
    k = torch.tensor([1, 4, 6])
    hard = soft_topk(x, k, dim=0, hard=True)
    for column in range(3):
        expected = torch.zeros(6, dtype=torch.float64)
        expected[torch.topk(x[:, column], int(k[column])).indices] = 1
        assert torch.equal(hard[:, column], expected)
    soft_grad = _grad(x, lambda a: soft_topk(a, k, dim=0))
    torch.testing.assert_close(_grad(x, lambda a: soft_topk(a, k, dim=0, hard=True)), soft_grad)


def test_hard_never_selects_minus_inf_and_keeps_nan_slices():
    x = torch.tensor([[1.0, -INF, -INF, 0.0], [1.0, math.nan, 2.0, 3.0]])
    hard = soft_topk(x, 3, hard=True)
    assert torch.equal(hard[0], torch.tensor([1.0, 0, 0, 1]))
    assert torch.isnan(hard[1]).all()


def test_hard_double_backward_is_the_soft_one():
    x = _randn(6).requires_grad_()
    weights = _randn(6, seed=3)

    def hessian(hard):
        (g,) = torch.autograd.grad(
            (soft_topk(x, 2, hard=hard) * weights).sum(), x, create_graph=True
        )
        return torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(6)])

    torch.testing.assert_close(hessian(True), hessian(False))


# ----------------------------------------------------------------------------- empties


def test_empty_inputs():
    assert soft_topk(torch.empty(0, 5), 2).shape == (0, 5)
    assert soft_topk(torch.empty(3, 0), 0).shape == (3, 0)
    with pytest.raises(ValueError, match="k"):
        soft_topk(torch.empty(3, 0), 1)


@pytest.mark.parametrize("k_per_slice", [False, True], ids=["k_number", "k_tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.1, 0.03, 0.01, 0.001])
@pytest.mark.parametrize(("shape", "k"), [((512, 64), 2), ((64, 1000), 10), ((16, 2000), 700.5)])
def test_small_temperatures_converge_in_a_handful_of_passes(
    monkeypatch, dtype, temperature, shape, k, k_per_slice
):
    # At small τ most entries saturate: the solve must start near the root (order statistics)
    # and stop once a step is below the resolution of θ, not creep by bisection. Counted in
    # solver passes (deterministic), not in seconds.
    from gradkit.topk import _solve

    passes = []
    counted = _solve._evaluate

    def counting(*args, **kwargs):
        passes.append(1)
        return counted(*args, **kwargs)

    monkeypatch.setattr(_solve, "_evaluate", counting)
    x = _randn(*shape, seed=3, dtype=dtype)
    budget = torch.full(shape[:-1], float(k), dtype=dtype) if k_per_slice else k
    p = soft_topk(x, budget, temperature=temperature)
    assert len(passes) <= 8, f"{len(passes)} solver passes"
    # Σp = k to the resolution of θ in the dtype: |θ| ≈ max|x|/τ units, one ulp each.
    theta_ulp = torch.finfo(dtype).eps * x.abs().max().item() / temperature
    assert (p.sum(-1) - k).abs().max().item() <= 8 * torch.finfo(dtype).eps * k + 2 * theta_ulp
    if dtype == torch.float64:
        torch.testing.assert_close(p, reference_soft_topk(x, k, temperature), atol=1e-9, rtol=0)
