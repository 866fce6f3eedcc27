"""sparse_topk against the sort-based float64 reference, its edge cases, errors and gradients.

Every test taking ``solver_path`` runs on the fused CPU kernel and on the PyTorch path.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import cluster_at_the_root, seeded_randn

from gradkit import SparseTopK, sparse_topk
from gradkit.topk.reference import sparse_topk_reference

TAUS = [1e-3, 1e-2, 0.3, 1.0, 7.0, 1e3]


def _budgets(kind: str, batch: tuple[int, ...], n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if kind == "int":
        return float(max(1, n // 3))
    if kind == "frac":
        return n * 0.37
    return torch.rand(batch, generator=generator, dtype=torch.float64) * n


def _tolerance(x: torch.Tensor, tau: float) -> float:
    """Rounding of p = x/τ − θ: a few eps of the largest |x/τ| (the conditioning)."""
    scale = x[torch.isfinite(x)].abs().max().item() / tau if x.numel() else 1.0
    return 64 * torch.finfo(torch.float64).eps * max(scale, 1.0)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("kind", ["int", "frac", "per_slice"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 17), (40, 64)])
def test_matches_reference(solver_path, shape, kind, tau):
    seed = sum(shape) * 7 + len(kind)
    x = seeded_randn(*shape, seed=seed) * 3
    k = _budgets(kind, shape[:-1], shape[-1], seed)
    p = sparse_topk(x, k, temperature=tau)
    expected = sparse_topk_reference(x, k, tau)
    tol = _tolerance(x, tau)
    torch.testing.assert_close(p, expected, atol=tol, rtol=0)
    torch.testing.assert_close(
        p.sum(-1),
        torch.as_tensor(k, dtype=torch.float64).expand(shape[:-1]),
        atol=tol * shape[-1],
        rtol=0,
    )
    # Exact zeros and ones, where the reference has them.
    assert (p[expected == 0] == 0).all() and (p[expected == 1] == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1e-5, 1e-8, 1e-17, 1e-30, 1e-300])
@pytest.mark.parametrize("n", [5, 16, 64, 150])
def test_small_temperatures_keep_the_budget(solver_path, n, tau, dtype):
    # |x/τ| up to ~1e301: beyond the digits (and the range) in which w about the row's top
    # locates the root, so rows this wide are solved about a pivot near it.  Fractional,
    # whole and per-slice budgets, ±inf entries; Σp = k to rounding, no NaN, the reference's p,
    # and a backward without inf or NaN.
    rows = 16
    x = (seeded_randn(rows, n, seed=n + 31) * 3).to(dtype)
    x[::4, 1] = x[::4, 0]  # ties at the top
    x[1::5, 2] = -math.inf
    x[2::7, 3] = math.inf
    plus = (x == math.inf).sum(-1).double()
    live = (x > -math.inf).sum(-1).double() - plus
    shares = torch.tensor([0.1, 0.5, 1 / 3, 0.9], dtype=torch.float64).repeat(rows // 4)
    for k in (plus + shares * live, plus + (shares * live).floor().clamp(min=1)):
        leaf = x.clone().requires_grad_(True)
        p = sparse_topk(leaf, k.to(dtype), temperature=tau)
        p.backward(seeded_randn(rows, n, seed=n + 32).to(dtype))
        # 1/τ capped at the dtype's max/16: large finite gradients on F, exactly 0 off it
        free = (p > 0) & (p < 1)
        assert bool(torch.isfinite(leaf.grad).all()) and bool((leaf.grad[~free] == 0).all())
        p = p.detach()
        assert not bool(p.isnan().any())
        expected = sparse_topk_reference(x, k.to(dtype).double(), tau)
        # p to rounding in its dtype, plus the float64 solve's conditioning up to the span (2²⁰
        # τ) beyond which rows are solved about a pivot
        scale = min(float(x[torch.isfinite(x)].abs().max()) / tau, 2.0**20)
        eps = torch.finfo(dtype).eps + torch.finfo(torch.float64).eps * scale
        torch.testing.assert_close(p.double(), expected, atol=64 * eps, rtol=0)
        torch.testing.assert_close(
            p.double().sum(-1), k.to(dtype).double(), atol=64 * n * eps, rtol=0
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes(solver_path, dtype):
    x = seeded_randn(16, 50, seed=3).to(dtype)
    p = sparse_topk(x, 7.5, temperature=0.5)
    assert p.dtype == dtype
    expected = sparse_topk_reference(x.double(), 7.5, 0.5)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(p.double(), expected, atol=16 * eps, rtol=0)
    torch.testing.assert_close(
        p.double().sum(-1), torch.full((16,), 7.5, dtype=torch.float64), atol=50 * eps, rtol=0
    )


def test_large_offset_keeps_precision(solver_path):
    x = seeded_randn(8, 30, seed=4) + 1e6
    p = sparse_topk(x, 4.0, temperature=0.5)
    torch.testing.assert_close(p, sparse_topk_reference(x - 1e6, 4.0, 0.5), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [12, 60, 300])
def test_a_cluster_at_the_root_keeps_full_precision(solver_path, n, dtype):
    # p = clip(w − t) with w about the slice's top held the root to eps·|t| only: p was off by
    # up to 8e−4 in float32 at τ = 1e−4 (float writes), 5e−11 in float64 (the solve).
    eps = torch.finfo(dtype).eps
    for index, temperature in enumerate((1e-2, 1e-3, 1e-4, 1e-5)):
        x = cluster_at_the_root(16, n, temperature, dtype, seed=4 * n + index)
        p = sparse_topk(x, 4.3, temperature=temperature)
        expected = sparse_topk_reference(x.double(), 4.3, temperature)
        atol = 4096 * eps if dtype == torch.float64 else 16 * eps
        message = f"τ = {temperature}"
        torch.testing.assert_close(p.double(), expected, atol=atol, rtol=0, msg=message)


def test_edge_cases_match_reference(solver_path):
    inf, nan = math.inf, math.nan
    x = torch.tensor(
        [
            [1.0, -inf, 2.0, 0.5, -inf],  # masked entries
            [-inf, 3.0, -inf, -inf, 1.0],  # k beyond the unmasked count: those all get 1
            [inf, 1.0, 2.0, 0.0, -1.0],  # one +inf, k = 2.5
            [inf, inf, inf, 0.0, 1.0],  # three +inf share k = 2.5
            [inf, inf, 5.0, 0.0, 1.0],  # m = 2 = ⌊k⌋... plus a fraction for the rest
            [1.0, nan, 2.0, 3.0, 4.0],  # NaN: this slice only
            [2.0, 2.0, 2.0, 2.0, 2.0],  # ties: k/n
            [0.0, 1e-300, -1e-300, 0.0, 5e-324],  # tiny
        ],
        dtype=torch.float64,
    )
    p = sparse_topk(x, 2.5)
    expected = sparse_topk_reference(x, 2.5)
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0, equal_nan=True)
    assert torch.isnan(p[5]).all() and not torch.isnan(p[[0, 1, 2, 3, 4, 6, 7]]).any()
    torch.testing.assert_close(p[1], torch.tensor([0.0, 1, 0, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(p[3, :3], torch.full((3,), 2.5 / 3, dtype=torch.float64))
    torch.testing.assert_close(p[6], torch.full((5,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("k", [0, 6])
def test_empty_and_full_budgets(solver_path, k):
    x = seeded_randn(3, 6, seed=5, dtype=torch.float64).requires_grad_()
    p = sparse_topk(x, k)
    assert torch.equal(p, torch.full_like(p, float(k > 0)))
    p.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_dim_and_empty(solver_path):
    x = seeded_randn(4, 9, 3, seed=6)
    p = sparse_topk(x, 2.0, dim=1, temperature=0.7)
    expected = sparse_topk_reference(x.movedim(1, -1), 2.0, 0.7).movedim(-1, 1)
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)
    assert sparse_topk(torch.empty(0, 5), 2).shape == (0, 5)
    assert sparse_topk(torch.empty(3, 0), 0).shape == (3, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": [1.0]}, TypeError, "sparse_topk: x must be a torch.Tensor"),
        ({"x": torch.ones(3, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"k": 4}, ValueError, r"sparse_topk: k must lie in \[0, n\] = \[0, 3\]"),
        ({"k": -0.5}, ValueError, "k must lie in"),
        ({"k": math.nan}, ValueError, "k must lie in"),
        ({"k": "2"}, TypeError, "k must be a number or a tensor"),
        ({"k": torch.tensor(5.0)}, ValueError, r"got k values in \[5.0, 5.0\]"),
        ({"k": torch.ones(2)}, ValueError, "must broadcast"),
        ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": math.inf}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": torch.tensor(-1.0)}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": "1"}, TypeError, "temperature must be a positive number"),
        ({"dim": 1}, IndexError, "sparse_topk: dim=1 is out of range"),
        ({"dim": 1.0}, TypeError, "dim must be an int"),
        ({"k": 1.5, "hard": True}, ValueError, "hard=True needs an integer k"),
        # (one validation style with soft_topk: topk/_checks.py)
        ({"x": torch.empty(3, device="meta")}, ValueError, "sparse_topk: x is on the meta"),
        ({"x": torch.ones(3).to_sparse()}, TypeError, "sparse_topk: x must be a dense"),
        ({"temperature": torch.tensor(1j)}, TypeError, "temperature must be a real number"),
        ({"temperature": torch.ones(2)}, ValueError, r"temperature.*broadcast.*\(\).*\(2,\)"),
    ],
)
def test_errors(kwargs, error, match):
    args = {"x": torch.tensor([1.0, 2.0, 3.0]), "k": 1, **kwargs}
    with pytest.raises(error, match=match):
        sparse_topk(**args)


def _away_from_kinks(shape, k, tau, seed):
    """Seeded x with a free entry in every slice and every entry ≥ 1e-3 (in units of τ) from
    the kinks θ and θ + τ, so that finite differences do not cross one."""
    for attempt in range(100):
        x = seeded_randn(*shape, seed=seed + attempt) * 2
        p = sparse_topk_reference(x, k, tau)
        free = (p > 0) & (p < 1)
        if not free.any(-1).all():
            continue
        z = x / tau
        first = free.float().argmax(-1, keepdim=True)
        theta = (z - p).gather(-1, first)  # z − p = θ on the free set
        distance = torch.minimum((z - theta).abs(), (z - theta - 1).abs())
        if distance.min() > 1e-3:
            return x
    raise AssertionError("no kink-free sample found")


def test_gradcheck_all_inputs(solver_path):
    x = _away_from_kinks((3, 8), 3.0, 0.8, seed=10).requires_grad_()
    k = torch.tensor([2.5, 3.0, 3.5], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.8, 0.8, 0.8], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: sparse_topk(a, b, temperature=c), (x, k, tau))
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: sparse_topk(a, b, temperature=c), (x, k, tau)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: sparse_topk(a, b, temperature=c),
        (x, k, tau),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


def test_scalar_learnable_temperature(solver_path):
    x = _away_from_kinks((4, 10), 4.0, 1.3, seed=20).requires_grad_()
    tau = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: sparse_topk(a, 4.0, temperature=t), (x, tau))
    assert torch.autograd.gradgradcheck(lambda a, t: sparse_topk(a, 4.0, temperature=t), (x, tau))


def test_jacobian_closed_form(solver_path):
    x = seeded_randn(12, seed=30) * 2
    tau = 0.9
    jacobian = torch.func.jacrev(lambda a: sparse_topk(a, 4.0, temperature=tau))(x)
    p = sparse_topk(x, 4.0, temperature=tau)
    free = ((p > 0) & (p < 1)).double()
    expected = (torch.diag(free) - torch.outer(free, free) / free.sum()) / tau
    torch.testing.assert_close(jacobian, expected)
    assert 0 < free.sum() < 12 and (p == 0).any()


def test_vmap_grad_jacrev(solver_path):
    x = seeded_randn(5, 3, 9, seed=31)
    k = torch.rand(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 9
    batched = torch.func.vmap(lambda a, b: sparse_topk(a, b, temperature=0.5))(x, k)
    torch.testing.assert_close(batched, sparse_topk(x, k, temperature=0.5))
    weights = torch.arange(9.0, dtype=torch.float64)
    grad = torch.func.grad(lambda a: (sparse_topk(a, 3.0) * weights).sum())(x[0, 0])
    x0 = x[0, 0].clone().requires_grad_()
    (sparse_topk(x0, 3.0) * weights).sum().backward()
    torch.testing.assert_close(grad, x0.grad)
    per_sample = torch.func.vmap(torch.func.jacrev(lambda a: sparse_topk(a, 3.0)))(x[0])
    assert per_sample.shape == (3, 9, 9)


def test_hard_straight_through(solver_path):
    x = seeded_randn(4, 10, seed=40).requires_grad_()
    weights = seeded_randn(4, 10, seed=41)
    hard = sparse_topk(x, 3, temperature=2.0, hard=True)
    expected = torch.zeros_like(x).scatter(-1, x.detach().topk(3).indices, 1.0)
    assert torch.equal(hard.detach(), expected)
    (hard * weights).sum().backward()
    hard_grad = x.grad.clone()
    x.grad = None
    (sparse_topk(x, 3, temperature=2.0) * weights).sum().backward()
    torch.testing.assert_close(hard_grad, x.grad)
    assert hard_grad.abs().sum() > 0


def test_module_learns_temperature():
    layer = SparseTopK(k=2, temperature=torch.nn.Parameter(torch.tensor(2.0)))
    x = torch.tensor([[3.0, 1.0, 2.2, -1.0]])
    (layer(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert layer.temperature.grad is not None and layer.temperature.grad != 0
    assert "temperature=tensor()" in repr(layer)
    fixed = SparseTopK(k=torch.tensor(2.0), temperature=0.5)
    assert "k" in dict(fixed.named_buffers())
    torch.testing.assert_close(fixed(x).sum(), torch.tensor(2.0))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    rows=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    fraction=st.floats(0, 1),
    log_tau=st.floats(-3, 3),
    ties=st.booleans(),
)
def test_properties(n, rows, seed, fraction, log_tau, ties):
    x = seeded_randn(rows, n, seed=seed)
    if ties:
        x = x.round()
    k, tau = fraction * n, 10.0**log_tau
    p = sparse_topk(x, k, temperature=tau)
    tol = _tolerance(x, tau) * n
    assert ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(
        p.sum(-1), torch.full((rows,), k, dtype=torch.float64), atol=tol, rtol=0
    )
    torch.testing.assert_close(p, sparse_topk_reference(x, k, tau), atol=tol, rtol=0)
    order = x.argsort(-1)
    assert (p.gather(-1, order).diff(dim=-1) >= -tol).all()  # monotone in x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_agrees_with_torch_path(dtype):
    """The fused kernel (rows it takes) and the PyTorch path (all rows) on a mixed batch,
    including rows the kernel hands back (+inf, NaN)."""
    from gradkit.topk import _native

    if not _native.available():
        pytest.skip(f"fused CPU kernel {_native.status()}")
    x = torch.cat([seeded_randn(30, 200, seed=60) * s for s in (1e-2, 1.0, 30.0)]).to(dtype)
    x[3, 5], x[40, 7], x[50, :20] = math.inf, math.nan, -math.inf
    k = torch.rand(90, generator=torch.Generator().manual_seed(61), dtype=torch.float64) * 150
    grad = seeded_randn(90, 200, seed=62).to(dtype)
    results = []
    for switched_off in (False, True):
        with _native.disabled() if switched_off else contextlib.nullcontext():
            leaf = x.clone().requires_grad_()
            p = sparse_topk(leaf, k.to(dtype), temperature=0.3)
            p.backward(grad)
            results.append((p.detach(), leaf.grad))
    eps = torch.finfo(dtype).eps
    scale = 30 * 4 / 0.3  # the largest |x/τ|, roughly
    torch.testing.assert_close(
        results[0][0], results[1][0], atol=64 * eps * scale, rtol=0, equal_nan=True
    )
    torch.testing.assert_close(
        results[0][1], results[1][1], atol=64 * eps / 0.3, rtol=0, equal_nan=True
    )
    expected = sparse_topk_reference(x.double(), k, 0.3)
    torch.testing.assert_close(
        results[0][0].double(), expected, atol=64 * eps * scale, rtol=0, equal_nan=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_on_kinks_and_degenerate_slices(solver_path, dtype):
    """Integer scores (entries exactly on θ or θ + τ), all-equal slices, tiny spreads around a
    large offset and wide spreads, with integer and fractional budgets."""
    generator = torch.Generator().manual_seed(70)
    for trial in range(40):
        n = int(torch.randint(1, 30, (1,), generator=generator))
        x = [
            torch.randint(-3, 4, (3, n), generator=generator).double(),
            torch.zeros(3, n, dtype=torch.float64),
            torch.randn(3, n, generator=generator, dtype=torch.float64) * 1e-9 + 5,
            torch.randn(3, n, generator=generator, dtype=torch.float64) * 100,
        ][trial % 4].to(dtype)
        k = float(torch.randint(0, n + 1, (1,), generator=generator))
        k = k if trial % 2 else k * 0.7
        tau = [1.0, 0.5, 1e-3, 10.0][(trial // 4) % 4]
        p = sparse_topk(x, k, temperature=tau).double()
        scale = max(1.0, x.abs().max().item() / tau)
        tol = 64 * torch.finfo(dtype).eps * scale * n
        torch.testing.assert_close(p, sparse_topk_reference(x.double(), k, tau), atol=tol, rtol=0)
        torch.testing.assert_close(
            p.sum(-1), torch.full((3,), k, dtype=torch.float64), atol=tol, rtol=0
        )


def test_batched_cotangents_and_hessian(solver_path):
    x = seeded_randn(3, 7, seed=80).requires_grad_()
    p = sparse_topk(x, 2.5, temperature=2.0)
    identity = torch.eye(21, dtype=torch.float64).reshape(21, 3, 7)
    (batched,) = torch.autograd.grad(p, x, identity, is_grads_batched=True)
    jacobian = torch.autograd.functional.jacobian(
        lambda a: sparse_topk(a, 2.5, temperature=2.0), x.detach()
    )
    torch.testing.assert_close(batched.reshape(3, 7, 3, 7), jacobian)
    # p is piecewise linear, so the Hessian of Σp² is 2 JᵀJ.
    row = x.detach()[0]
    hessian = torch.func.hessian(lambda a: sparse_topk(a, 2.5, temperature=2.0).pow(2).sum())(row)
    j = torch.func.jacrev(lambda a: sparse_topk(a, 2.5, temperature=2.0))(row)
    torch.testing.assert_close(hessian, 2 * j.T @ j)
    assert j.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 0.01, 1e-3])
def test_long_rows_small_budgets(solver_path, dtype, tau):
    """Long rows with small budgets (the kernel keeps only the entries near the root)."""
    x = seeded_randn(2, 2000, seed=90).to(dtype)
    x[0, :100] = -math.inf
    for k in (2.5, 15.0):
        p = sparse_topk(x, k, temperature=tau)
        tol = _tolerance(x.double(), tau) * torch.finfo(dtype).eps / torch.finfo(torch.float64).eps
        torch.testing.assert_close(
            p.double(), sparse_topk_reference(x.double(), k, tau), atol=tol, rtol=0
        )
