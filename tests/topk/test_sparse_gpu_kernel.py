"""The GPU solve and vjp of ``sparse_topk`` (Triton kernels, and the host-sync-free PyTorch
path) against the float64 reference (a sort-based exact projection), over the CPU kernel's
edge cases.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter; with one, the
same tests also run compiled on CUDA tensors.  Shapes are small: the interpreter is slow.
``solve_sparse_nosync`` (no triton needed) runs the same tests on every device.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import compile_for_sm90, need_triton_kernels, seeded_randn, triton_pointer

import gradkit
from gradkit.topk import _gpu
from gradkit.topk._sparse import solve_sparse_nosync, sparse_topk_vjp
from gradkit.topk.reference import sparse_topk_reference

pytestmark = pytest.mark.gpu_kernel

INF = math.inf
CUDA = torch.cuda.is_available()


@pytest.fixture
def solver(gpu_path):
    """``(solve, device)``: ``solve(x, k, tau, **hooks)`` for one implementation."""
    kind, device = gpu_path
    if kind == "triton":
        return _gpu.sparse_solve, device
    return (lambda x, k, tau, **_: solve_sparse_nosync(x, k, tau)), device


def _tolerance(x: torch.Tensor, k, temperature, dtype: torch.dtype) -> float:
    """What the solve can promise in ``dtype``: rounding of ``w − t`` about a centre near the
    root and of the sums that give θ (a few ulps of ``k``; a tolerance growing with
    ``max|x|/τ`` once hid a solve about the top losing ``eps·|x|/τ``), plus the rounding of
    ``p`` into ``dtype``."""
    solve_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    budget = float(torch.as_tensor(k, dtype=torch.float64).max())
    return 16 * solve_eps * max(budget, 1.0) + 2 * torch.finfo(dtype).eps


def _cpu(value):
    return value.cpu() if torch.is_tensor(value) else value


def _check(solve, x, k, temperature, **hooks):
    p = solve(x, k, temperature, **hooks)
    assert p.shape == x.shape and p.dtype == x.dtype and p.device == x.device
    expected = sparse_topk_reference(x.double().cpu(), _cpu(k), _cpu(temperature))
    atol = _tolerance(x.cpu(), _cpu(k), _cpu(temperature), x.dtype)
    torch.testing.assert_close(p.double().cpu(), expected, atol=atol, rtol=0, equal_nan=True)
    return p


# --------------------------------------------------------------------- random rows


@pytest.mark.parametrize("temperature", [50.0, 1.0, 0.005])
def test_random_rows_with_per_slice_budgets(solver, temperature):
    solve, device = solver
    n = 37
    x = seeded_randn(6, n, seed=1).to(device)
    # fractional, integer, k > n/2, k = 0 and k = n, one slice each
    k = torch.tensor([1.0, 2.5, 18.5, 33.5, 0.0, n], dtype=torch.float64, device=device)
    p = _check(solve, x, k, temperature)
    assert torch.equal(p[4], torch.zeros(n, dtype=x.dtype, device=device))
    assert torch.equal(p[5], torch.ones(n, dtype=x.dtype, device=device))
    torch.testing.assert_close(p.sum(-1).cpu(), k.cpu(), atol=1e-10, rtol=0)
    if temperature <= 1:  # exactly sparse: entries below θ are exact zeros
        assert bool((p == 0).any(-1)[:4].all())


def test_per_slice_temperature_budget_batch_shape_and_non_contiguous(solver):
    solve, device = solver
    x = seeded_randn(3, 4, 20, seed=2).to(device).transpose(0, 1)  # (4, 3, 20), strided
    k = torch.rand(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 20
    tau = torch.logspace(-2, 1, 12, dtype=torch.float64).reshape(4, 3)
    _check(solve, x, k.to(device), tau.to(device))


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_rows_longer_than_a_block(solver, temperature):
    # n = 300 streamed in blocks of 128 (not a multiple), as rows longer than MAX_BLOCK are.
    solve, device = solver
    x = seeded_randn(2, 300, seed=4).to(device)
    k = torch.tensor([7.0, 212.5], dtype=torch.float64, device=device)
    _check(solve, x, k, temperature, block=128)


def test_row_of_3000_with_the_default_block(solver):
    solve, device = solver
    x = seeded_randn(1, 3000, seed=5, dtype=torch.float32).to(device)
    assert _gpu.MAX_BLOCK < 3000
    _check(solve, x, 40.0, 0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(solver, dtype):
    solve, device = solver
    x = (seeded_randn(3, 40, seed=6) * 2).to(dtype).to(device)
    k = torch.tensor([3.0, 20.0, 31.5], device=device)
    p = _check(solve, x, k, 0.3)
    # Σp = k up to the rounding of each p into the dtype (half an ulp of 1 each)
    atol = 40 * torch.finfo(dtype).eps
    torch.testing.assert_close(p.double().sum(-1).cpu(), k.double().cpu(), atol=atol, rtol=0)


# --------------------------------------------------------------------- edge cases


def _edge_rows(device):
    rows = [  # (x, k)
        ([0.3, -INF, 1.2, -INF, 0.5], 2.0),  # −inf masks
        ([-INF, 0.1, -INF, 0.2, 0.4], 3.5),  # budget beyond the finite entries
        ([INF, 0.0, 1.0, 0.5, -1.0], 2.5),  # one +inf, budget left to the rest
        ([INF, INF, INF, 0.5, -1.0], 2.0),  # more +inf than k: k/m each
        ([0.1, 0.2, math.nan, 0.3, 0.4], 2.0),  # NaN: the slice is NaN
        ([1.5, 1.5, 1.5, 1.5, 1.5], 2.0),  # all tied: k/n
        ([-INF, -INF, -INF, -INF, -INF], 0.0),  # all masked
        ([0.2, 0.7, 0.7, -0.4, 0.7], 1.5),  # partial ties
        ([3.0, 1.0, 2.0, 0.0, -1.0], 0.0),  # k = 0
        ([3.0, 1.0, 2.0, 0.0, -1.0], 5.0),  # k = n
        ([1e3, 1.0, 2.0, 0.0, -1.0], 1.0),  # one entry far above: exactly the top one
    ]
    x = torch.tensor([r[0] for r in rows], dtype=torch.float64, device=device)
    k = torch.tensor([r[1] for r in rows], dtype=torch.float64, device=device)
    return x, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cases_in_one_batch(solver, dtype):
    solve, device = solver
    x, k = _edge_rows(device)
    p = _check(solve, x.to(dtype), k, 0.7).double().cpu()
    assert torch.isnan(p[4]).all() and not torch.isnan(p[torch.arange(11) != 4]).any()
    eps = torch.finfo(dtype).eps
    third = torch.tensor([2 / 3, 2 / 3, 2 / 3, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(p[3], third, atol=eps, rtol=0)
    torch.testing.assert_close(p[5], torch.full((5,), 0.4, dtype=torch.float64), atol=eps, rtol=0)
    assert p[7][1] == p[7][2] == p[7][4]
    assert torch.equal(p[10], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))


def test_random_mix_of_edge_cases_agrees_with_the_public_operator(solver):
    solve, device = solver
    generator = torch.Generator().manual_seed(18)
    x = torch.randn(32, 12, dtype=torch.float64, generator=generator).round(decimals=1)
    special = torch.rand(32, 12, generator=generator)
    x = torch.where(special < 0.08, -INF, x)
    x = torch.where((special >= 0.08) & (special < 0.12), INF, x)
    x[torch.rand(32, generator=generator) < 0.1, 0] = math.nan
    k = torch.rand(32, dtype=torch.float64, generator=generator) * 12
    k[:4] = k[:4].round()
    expected = gradkit.sparse_topk(x, k, temperature=0.3)
    p = solve(x.to(device), k.to(device), 0.3).cpu()
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0, equal_nan=True)
    _check(solve, x.to(device), k.to(device), 0.3)


def test_nan_leaves_other_rows_as_if_alone(solver):
    solve, device = solver
    x = seeded_randn(3, 9, seed=7).to(device)
    x[1, 4] = math.nan
    p = solve(x, 2.0, 1.0)
    assert torch.isnan(p[1]).all()
    alone = solve(x[[0, 2]].contiguous(), 2.0, 1.0)
    torch.testing.assert_close(p[[0, 2]], alone, atol=4 * torch.finfo(x.dtype).eps, rtol=0)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_scales_and_offsets(solver, offset):
    solve, device = solver
    x = seeded_randn(3, 25, seed=8).to(device)
    _check(solve, x * 1e6 + offset, 4.5, 1e5)
    _check(solve, x * 1e-4 + offset, 4.5, 1e-5)


@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_kinks_that_coincide(solver, temperature):
    # Scores on a half-integer grid: many kinks w_i and w_j − 1 coincide, and ties abound.
    solve, device = solver
    x = (seeded_randn(16, 40, seed=16) * 3).round() / 2
    k = torch.rand(16, generator=torch.Generator().manual_seed(17), dtype=torch.float64) * 40
    k[::3] = k[::3].round()
    _check(solve, x.to(device), k.to(device), temperature)
    _check(solve, x.float().to(device), k.to(device), temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_temperatures_keep_the_budget_and_its_fraction(solver, dtype):
    # w about the row's top resolves only eps·|x|/τ units: p was off by 4e−4 in float32 at
    # τ = 1e−3 and the fraction of k was lost below 1e−6 (float64: 1e−12) before the solve
    # moved its centre to the located root and blended the ends of a bracket collapsed below
    # the resolution of x.  Ties, ±inf; budgets exact in both dtypes.
    solve, device = solver
    eps = torch.finfo(dtype).eps
    k = torch.tensor([1.25, 2.5, 7.75, 20.25, 3.75, 10.5, 40.75, 25.5], dtype=torch.float64)
    x = (seeded_randn(8, 50, seed=20) * 3).to(dtype)
    x[1, 7], x[5, 3], x[6, 0] = -INF, INF, x[6, 1]
    tiny = 1e-300 if dtype == torch.float64 else 1e-38
    for temperature in (1e-3, 1e-5, 1e-7, 1e-9, 1e-12, 1e-18, tiny):
        p = solve(x.to(device), k.to(device), temperature).double().cpu()
        expected = sparse_topk_reference(x.double(), k, temperature)
        atol = 16 * eps * float(k.max())
        torch.testing.assert_close(p, expected, atol=atol, rtol=0, msg=f"τ = {temperature}")


def test_empty_inputs(solver):
    solve, device = solver
    assert solve(torch.empty(3, 0, device=device), 0.0, 1.0).shape == (3, 0)
    assert solve(torch.empty(0, 5, device=device), 1.0, 1.0).shape == (0, 5)


def test_passes_are_bounded():
    need_triton_kernels("cpu")
    x = seeded_randn(8, 64, seed=9, dtype=torch.float32)
    iterations = torch.zeros(8, dtype=torch.int32)
    for temperature in (1e-3, 1.0, 1e3):
        _gpu.sparse_solve(x, 5.5, temperature, iterations=iterations)
        assert int(iterations.max()) <= _gpu.sparse_max_iterations(torch.float32)
        assert int(iterations.max()) <= _gpu.SPARSE_NEWTON_STEPS  # active-set Newton finishes


# --------------------------------------------------------------------- the vjp


def _closed_form(grad, p, tau):
    """``Jᵀg`` with ``J = (I_F − 1_F 1_Fᵀ/|F|)/τ`` built as a matrix per slice, and ``mean_F g``."""
    grads_x, grads_k = [], []
    taus = torch.as_tensor(tau, dtype=torch.float64).expand(p.shape[:-1]).reshape(-1)
    n = p.shape[-1]
    for g, q, t in zip(grad.reshape(-1, n), p.reshape(-1, n), taus, strict=True):
        free = ((q > 0) & (q < 1)).double()
        count = max(float(free.sum()), 1.0)
        jacobian = (torch.diag(free) - torch.outer(free, free) / count) / t
        grads_x.append(jacobian.T @ g)
        grads_k.append(free @ g / count)
    return torch.stack(grads_x).reshape(p.shape), torch.stack(grads_k).reshape(p.shape[:-1])


def test_vjp_against_the_closed_form_and_autograd(vjp_device):
    x = seeded_randn(5, 30, seed=10).to(vjp_device)
    k = torch.tensor([1.0, 2.5, 7.0, 0.0, 30.0], dtype=torch.float64)
    tau = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    grad = seeded_randn(5, 30, seed=11)
    p = _gpu.sparse_solve(x, k.to(vjp_device), tau.to(vjp_device))
    grad_x, grad_k = _gpu.sparse_vjp(grad.to(vjp_device), p, tau.to(vjp_device))
    expected_x, expected_k = _closed_form(grad, p.cpu(), tau)
    torch.testing.assert_close(grad_x.cpu(), expected_x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_k.cpu(), expected_k, atol=1e-12, rtol=1e-12)
    leaf = x.cpu().requires_grad_()
    k_leaf = k.clone().requires_grad_()
    gradkit.sparse_topk(leaf, k_leaf, temperature=tau).backward(grad)
    torch.testing.assert_close(grad_x.cpu(), leaf.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_k.cpu(), k_leaf.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_vjp_dtypes_blocks_and_nan(vjp_device, dtype):
    x = seeded_randn(3, 300, seed=12)
    x[2, 7] = math.nan
    p = sparse_topk_reference(x, 20.5, 0.2).to(dtype)
    grad = seeded_randn(3, 300, seed=13).to(dtype)
    grad_x, grad_k = _gpu.sparse_vjp(grad.to(vjp_device), p.to(vjp_device), 0.2, block=128)
    assert grad_x.dtype == dtype and grad_k.dtype == dtype
    expected_x, expected_k = sparse_topk_vjp(grad.double(), p.double(), 0.2)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(
        grad_x.double().cpu(), expected_x, atol=40 * eps, rtol=4 * eps, equal_nan=True
    )
    torch.testing.assert_close(grad_k.double().cpu(), expected_k, atol=4 * eps, rtol=4 * eps)
    assert torch.isnan(grad_x[2]).all() and grad_k[2] == 0


def test_vjp_empty(vjp_device):
    grad_x, grad_k = _gpu.sparse_vjp(*(torch.empty(3, 0, device=vjp_device),) * 2, 1.0)
    assert grad_x.shape == (3, 0) and torch.equal(grad_k.cpu(), torch.zeros(3))


def test_cuda_dispatch_kernel_and_fallback(monkeypatch):
    # The CUDA branch of solve_sparse_topk, run on CPU tensors: the Triton kernel when it is
    # usable, else the sync-free PyTorch solve; both equal the CPU operator.
    from gradkit.topk import _sparse

    need_triton_kernels("cpu")
    x = seeded_randn(5, 33, seed=19)
    k = torch.tensor([0.0, 1.5, 4.0, 20.0, 33.0], dtype=torch.float64)
    expected = _sparse.solve_sparse_topk(x, k, 0.2)
    torch.testing.assert_close(_sparse._solve_cuda(x, k, 0.2), expected, atol=1e-13, rtol=0)
    monkeypatch.setattr(_sparse, "_gpu_kernels", lambda: None)
    torch.testing.assert_close(_sparse._solve_cuda(x, k, 0.2), expected, atol=1e-13, rtol=0)


# ------------------------------------------------------------------ on CUDA: no host syncs


@pytest.mark.skipif(not CUDA, reason="needs a GPU (sync debug mode and CUDA graphs)")
def test_public_operator_on_cuda_without_host_synchronisation():
    x = seeded_randn(64, 40, seed=15, dtype=torch.float32)
    k = torch.full((64,), 3.5)
    tau = torch.full((64,), 0.5)
    expected = gradkit.sparse_topk(x, k, temperature=tau)
    cuda_x = x.cuda().requires_grad_()
    cuda_k, cuda_tau = k.cuda(), tau.cuda()
    gradkit.sparse_topk(cuda_x, cuda_k, temperature=cuda_tau)  # warm-up (compiles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = gradkit.sparse_topk(cuda_x, cuda_k, temperature=cuda_tau)
        p.backward(torch.ones_like(p))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(p.detach().cpu(), expected, atol=1e-5, rtol=0)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _gpu.sparse_solve(cuda_x.detach(), cuda_k, cuda_tau)
        with torch.cuda.graph(graph):
            captured = _gpu.sparse_solve(cuda_x.detach(), cuda_k, cuda_tau)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.testing.assert_close(captured.cpu(), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------- compiled for a GPU, without one


@pytest.mark.parametrize(
    ("x_dtype", "rows", "n"), [(torch.float32, 4096, 64), (torch.float64, 2, 3000)]
)
def test_sparse_kernels_compile_for_a_cuda_gpu(x_dtype, rows, n):
    triton = pytest.importorskip("triton", reason="triton is not installed")

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    module = _gpu._load_kernels(interpret=False)
    if module is None:
        pytest.skip(f"triton unusable: {_gpu.reason()}")
    per_program, block = _gpu.tiling(rows, n)
    data = triton_pointer(x_dtype)
    solve = triton_pointer(torch.float64 if x_dtype == torch.float64 else torch.float32)
    runtime = {"x_ptr": data, "out_ptr": data, "k_ptr": solve, "k_stride": "i32"}
    runtime.update({"tau_ptr": solve, "tau_stride": "i32", "iters_ptr": "*i32"})
    runtime.update({"rows": "i32", "n": "i32"})
    constants = _gpu.sparse_solve_constants(x_dtype, per_program, block, count=False)
    assert compile_for_sm90(module._sparse_solve_kernel, runtime, constants).asm["cubin"]
    runtime = {"g_ptr": data, "p_ptr": data, "gx_ptr": data, "gk_ptr": data}
    runtime.update({"tau_ptr": solve, "tau_stride": "i32", "rows": "i32", "n": "i32"})
    constants = _gpu.sparse_vjp_constants(x_dtype, per_program, block)
    assert compile_for_sm90(module._sparse_vjp_kernel, runtime, constants).asm["cubin"]
