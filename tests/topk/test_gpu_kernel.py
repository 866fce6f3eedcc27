"""The GPU solve and vjp (Triton kernels, and the host-sync-free PyTorch path) against the
float64 reference, over the CPU kernel's edge cases.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter (``_gpu`` loads
an interpreted copy of the kernels for CPU tensors, whatever ``TRITON_INTERPRET`` says); with
one, the same tests also run compiled on CUDA tensors.  The interpreter is slow: shapes are
small.  ``solve_nosync`` (no triton needed) runs the same tests on every device.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import (
    compile_for_sm90,
    need_triton_kernels,
    reference_soft_topk,
    reference_soft_topk_centred,
    seeded_randn,
    triton_pointer,
)

from gradkit.topk import _gpu
from gradkit.topk._solve_nosync import solve_nosync

pytestmark = pytest.mark.gpu_kernel

INF = math.inf
CUDA = torch.cuda.is_available()


@pytest.fixture
def solver(gpu_path):
    """``(solve, device)``: ``solve(x, k, inv_tau, **hooks)`` for one implementation."""
    kind, device = gpu_path
    if kind == "triton":
        return _gpu.solve, device
    return (lambda x, k, inv_tau, **_: solve_nosync(x, k, inv_tau)), device


def _tolerance(x: torch.Tensor, k, inv_tau: float, dtype: torch.dtype) -> float:
    """What the solve can promise in ``dtype``: the mass tolerance ``8·eps·k`` and the
    rounding of ``w − t`` about a centre near the root (a few ulps of ``k``; a tolerance
    growing with ``max|x|/τ`` once hid a solve about 0 losing ``eps·|x|/τ``), plus the
    rounding of ``p`` into a half dtype."""
    solve_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    budget = float(torch.as_tensor(k, dtype=torch.float64).max())
    return 16 * solve_eps * max(budget, 1.0) + 2 * torch.finfo(dtype).eps


def _check_against_reference(solve, x, k, temperature, **hooks):
    p = solve(x, k, 1.0 / temperature, **hooks)
    assert p.shape == x.shape and p.dtype == x.dtype and p.device == x.device
    expected = reference_soft_topk(x.double().cpu(), k.cpu() if torch.is_tensor(k) else k,
                                   temperature)  # fmt: skip
    atol = _tolerance(x, k, 1.0 / temperature, x.dtype)
    torch.testing.assert_close(p.double().cpu(), expected, atol=atol, rtol=0)
    return p


# --------------------------------------------------------------------- random rows


@pytest.mark.parametrize(
    "temperature", [50.0, 1.0, 0.005], ids=["spread0.1", "spread5", "spread1000"]
)
def test_random_rows_with_per_slice_budgets(solver, temperature):
    solve, device = solver
    n = 37
    x = seeded_randn(6, n, seed=1).to(device)
    # fractional, integer, k > n/2, k = 0 and k = n, one slice each
    k = torch.tensor([1.0, 2.5, 18.5, 33.5, 0.0, n], dtype=torch.float64, device=device)
    p = _check_against_reference(solve, x, k, temperature)
    assert torch.equal(p[4], torch.zeros(n, dtype=x.dtype, device=device))
    assert torch.equal(p[5], torch.ones(n, dtype=x.dtype, device=device))
    torch.testing.assert_close(p.sum(-1).cpu(), k.cpu(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("k", [1, 20])
def test_one_budget_for_every_slice(solver, k):
    solve, device = solver
    x = (seeded_randn(4, 24, seed=2) * 3).to(device)
    _check_against_reference(solve, x, k, 0.5)


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_rows_longer_than_a_block(solver, temperature):
    # n = 300 streamed in blocks of 128 (not a multiple), as rows longer than MAX_BLOCK are.
    solve, device = solver
    x = seeded_randn(2, 300, seed=3).to(device)
    k = torch.tensor([7.0, 212.5], dtype=torch.float64, device=device)
    _check_against_reference(solve, x, k, temperature, block=128)


def test_row_of_3000_with_the_default_block(solver):
    solve, device = solver
    x = seeded_randn(1, 3000, seed=4, dtype=torch.float32).to(device)
    assert _gpu.MAX_BLOCK < 3000
    _check_against_reference(solve, x, 40.0, 0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(solver, dtype):
    solve, device = solver
    x = (seeded_randn(3, 40, seed=5) * 2).to(dtype).to(device)
    k = torch.tensor([3.0, 20.0, 31.5], device=device)
    p = _check_against_reference(solve, x, k, 0.3)
    # Σp = k up to the rounding of each p into the dtype (half an ulp of 1 each).
    atol = x.shape[-1] * torch.finfo(dtype).eps
    torch.testing.assert_close(p.double().sum(-1).cpu(), k.double().cpu(), atol=atol, rtol=0)


def test_per_slice_temperature_batch_shape_and_non_contiguous_input(solver):
    solve, device = solver
    base = seeded_randn(5, 2, 3, seed=6).to(device)
    x = base.permute(1, 2, 0)  # (2, 3, 5), not contiguous
    assert not x.is_contiguous()
    inv_tau = torch.tensor([[1.0, 4.0, 0.5], [2.0, 10.0, 1.0]], dtype=torch.float64)
    p = solve(x, 2.0, inv_tau.to(device))
    for i in range(2):
        for j in range(3):
            expected = reference_soft_topk(x[i, j].cpu(), 2.0, 1.0 / float(inv_tau[i, j]))
            torch.testing.assert_close(p[i, j].cpu(), expected, atol=1e-12, rtol=0)


def test_empty_inputs(solver):
    solve, device = solver
    assert solve(torch.empty(0, 5, device=device), 2.0, 1.0).shape == (0, 5)
    assert solve(torch.empty(3, 0, device=device), 0.0, 1.0).shape == (3, 0)


# ---------------------------------------------------------------------- edge cases


def _edge_rows(device):
    """Rows of n = 6 with −inf, +inf, NaN and ties, their budgets and their expected values
    (``None``: compare the finite entries with the reference at the budget left to them)."""
    nan = math.nan
    rows = [
        ([0.5, -INF, 2.0, -1.0, -INF, 0.3], 2.5, None),  # masked entries
        ([0.5, -INF, 2.0, -INF, -INF, -INF], 3.0, [1, 0, 1, 0, 0, 0]),  # budget > live count
        ([-INF] * 6, 2.0, [0] * 6),  # nothing selectable
        ([1.0, INF, 0.0, -1.0, 2.0, 0.5], 2.5, None),  # +inf uses up one unit of budget
        ([INF, 3.0, INF, INF, -INF, 1.0], 2.0, [2 / 3, 0, 2 / 3, 2 / 3, 0, 0]),  # m > k
        ([1.0, nan, 2.0, 3.0, 0.0, 1.0], 2.0, [nan] * 6),  # NaN: only this row
        ([3.7] * 6, 2.5, [2.5 / 6] * 6),  # all tied
        ([1.0, 2.0, 2.0, 0.5, 2.0, -3.0], 2.0, None),  # partial ties
        ([1.0, 2.0, 0.0, -1.0, 0.5, 0.25], 0.0, [0] * 6),  # k = 0
        ([1.0, 2.0, 0.0, -1.0, 0.5, 0.25], 6.0, [1] * 6),  # k = n
    ]
    x = torch.tensor([r[0] for r in rows], dtype=torch.float64, device=device)
    k = torch.tensor([r[1] for r in rows], dtype=torch.float64, device=device)
    return x, k, [r[2] for r in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cases_in_one_batch(solver, dtype):
    solve, device = solver
    x, k, expected_rows = _edge_rows(device)
    x = x.to(dtype)
    p = solve(x, k, 1 / 0.7).double().cpu()
    x, k = x.double().cpu(), k.cpu()
    for row, expected in enumerate(expected_rows):
        if expected is not None:
            torch.testing.assert_close(
                p[row], torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0,
                equal_nan=True,
            )  # fmt: skip
            continue
        finite = torch.isfinite(x[row])
        assert torch.all(p[row][x[row] == -INF] == 0) and torch.all(p[row][x[row] == INF] == 1)
        budget = float(k[row]) - int((x[row] == INF).sum())
        reference = reference_soft_topk(x[row][finite], budget, 0.7)
        torch.testing.assert_close(p[row][finite], reference, atol=1e-6, rtol=0)
    tied = p[7][[1, 2, 4]]
    assert tied[0] == tied[1] == tied[2]


def test_random_mix_of_edge_cases_agrees_with_the_public_operator(solver):
    # Random rows sprinkled with −inf, +inf, NaN and repeated values, random per-slice budgets
    # in [0, n]: the same values as gradkit.soft_topk (the CPU paths), slice by slice.
    from gradkit import soft_topk

    solve, device = solver
    generator = torch.Generator().manual_seed(18)
    x = torch.randn(32, 12, dtype=torch.float64, generator=generator).round(decimals=1)
    special = torch.rand(32, 12, generator=generator)
    x = torch.where(special < 0.08, -INF, x)
    x = torch.where((special >= 0.08) & (special < 0.12), INF, x)
    x[torch.rand(32, generator=generator) < 0.1, 0] = math.nan
    k = torch.rand(32, dtype=torch.float64, generator=generator) * 12
    k[:4] = k[:4].round()
    expected = soft_topk(x, k, temperature=0.3)
    p = solve(x.to(device), k.to(device), 1 / 0.3).cpu()
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0, equal_nan=True)


def test_nan_leaves_other_rows_as_if_alone(solver):
    solve, device = solver
    x = seeded_randn(3, 9, seed=7).to(device)
    x[1, 4] = math.nan
    p = solve(x, 2.0, 1.0)
    assert torch.isnan(p[1]).all()
    alone = solve(x[[0, 2]].contiguous(), 2.0, 1.0)
    torch.testing.assert_close(p[[0, 2]], alone, atol=4 * torch.finfo(x.dtype).eps, rtol=0)


@pytest.mark.parametrize("scale", [1e-6, 1e10, 1e30])
def test_extreme_scales(solver, scale):
    solve, device = solver
    x = (seeded_randn(2, 20, seed=8) * scale).to(torch.float32).to(device)
    p = solve(x, 5.0, 1.0)
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    mass = p.double().sum(-1).cpu()
    torch.testing.assert_close(mass, torch.full((2,), 5.0, dtype=torch.float64), atol=1e-4, rtol=0)
    if scale >= 1e10:  # saturated: the hard mask
        top = torch.zeros_like(x).scatter(-1, x.topk(5, -1).indices, 1.0)
        assert torch.equal(p, top)


@pytest.mark.parametrize(("offset", "temperature"), [(1e4, 0.01), (100.0, 0.001)])
def test_large_common_offset_keeps_full_precision(solver, offset, temperature):
    # w is taken relative to a centre near the root: the offset costs no resolution (an
    # absolute w would lose eps·offset/τ, here up to 0.1 of p).
    solve, device = solver
    x = (seeded_randn(2, 50, seed=16, dtype=torch.float32) + offset).to(device)
    p = solve(x, 5.0, 1.0 / temperature)
    expected = reference_soft_topk(x.double().cpu(), 5.0, temperature)
    atol = 64 * torch.finfo(torch.float32).eps * 5
    torch.testing.assert_close(p.double().cpu(), expected, atol=atol, rtol=0)


def test_mixed_magnitudes_and_capped_temperature(solver):
    solve, device = solver
    x = torch.tensor([[1e30, -1e30, 0.0, 0.5, -0.3]], dtype=torch.float64, device=device)
    p = solve(x, 2.2, 1.0).cpu()
    assert p[0, 0] == 1 and p[0, 1] == 0
    expected = reference_soft_topk(x[0, 2:].cpu(), 1.2)
    torch.testing.assert_close(p[0, 2:], expected, atol=1e-12, rtol=0)
    # |x|/τ = 1e40 > max/16 in float32: 1/τ is capped (every gap stays saturated).
    y = (seeded_randn(3, 20, seed=17) * 1e10).to(torch.float32).to(device)
    p = solve(y, 4.5, 1e30)
    top = torch.zeros_like(y).scatter(-1, y.topk(4, -1).indices, 1.0)
    fifth = y.topk(5, -1).indices[:, 4:]
    expected = top.scatter(-1, fifth, 0.5)
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_at_the_resolution_limit_share_the_remainder(solver, dtype):
    # x/τ: the entry one ulp above the others is 119 (float32) or 222 (float64) units of τ
    # above, resolvable; the two tied entries share the rest of the budget exactly, though
    # no representable θ puts it there (the bracket collapses; its ends are blended).
    solve, device = solver
    ulp = torch.finfo(dtype).eps
    temperature = 1e-9 if dtype == torch.float32 else 1e-18
    x = torch.tensor([[1.0, 1.0 + ulp, 1.0, 0.0, -1.0]], dtype=dtype, device=device)
    p = solve(x, 1.5, 1.0 / temperature)
    expected = torch.tensor([[0.25, 1.0, 0.25, 0.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(p.cpu(), expected, atol=4 * ulp, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_temperatures_keep_full_precision(solver, dtype):
    # Rows spanning 10⁵–10¹⁹ units of τ: w about 0 resolves only eps·|x|/τ units (p off by up
    # to 0.08 in float32 at τ = 1e−6, 6e−8 in float64 at 1e−9 before the solve moved its
    # centre to the located root); below the resolution of x the collapsed bracket's ends are
    # blended.  Budgets exact in both dtypes, their fractions on single entries.
    solve, device = solver
    eps = torch.finfo(dtype).eps
    k = torch.tensor([1.25, 2.5, 7.75, 20.25, 3.75, 10.5, 40.75, 25.5], dtype=torch.float64)
    for temperature in (1e-5, 1e-6, 1e-7, 1e-9, 1e-12, 1e-18):
        x = (seeded_randn(8, 50, seed=19) * 3).to(dtype)
        p = solve(x.to(device), k.to(device), 1.0 / temperature).double().cpu()
        expected = reference_soft_topk_centred(x, k, temperature)
        atol = 16 * eps * float(k.max())
        torch.testing.assert_close(p, expected, atol=atol, rtol=0, msg=f"τ = {temperature}")


def test_small_temperatures_take_few_iterations():
    # Multisection narrows wide brackets before Newton; counted in iterations, not seconds.
    need_triton_kernels("cpu")
    x = seeded_randn(4, 64, seed=9)
    k = torch.tensor([1.0, 2.0, 16.5, 32.0], dtype=torch.float64)
    for temperature in (1.0, 0.01, 0.001):
        iterations = torch.zeros(4, dtype=torch.int32)
        _gpu.solve(x, k, 1 / temperature, iterations=iterations)
        assert int(iterations.max()) <= 8, (temperature, iterations.tolist())


def test_solve_matches_the_public_operator(solver):
    from gradkit import soft_topk

    solve, device = solver
    x = seeded_randn(3, 50, seed=10).to(device)
    expected = soft_topk(x.cpu(), 7.5, temperature=0.2)
    torch.testing.assert_close(solve(x, 7.5, 5.0).cpu(), expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- vjp


def _closed_form(grad, p, temperature):
    v = p * (1 - p)
    total = v.sum(-1, keepdim=True)
    c = torch.where(total > 0, (grad * v).sum(-1, keepdim=True) / total.clamp_min(1e-300), 0.0)
    return v * (grad - c) / temperature, c.squeeze(-1)


def _reference_with_autograd(x, k, temperature):
    """The reference made differentiable: one Newton correction of its (detached) threshold,
    whose derivative at the root is the implicit one, ``dθ = τ·(Σ v dz)/Σv``."""
    with torch.no_grad():
        p0 = reference_soft_topk(x, k, temperature)
        theta = x - temperature * torch.log(p0 / (1 - p0))  # every entry gives the same θ
        theta = theta.mean(-1, keepdim=True)
    z = (x - theta) / temperature
    mass = torch.sigmoid(z).sum(-1, keepdim=True)
    slope = (torch.sigmoid(z) * torch.sigmoid(-z)).sum(-1, keepdim=True) / temperature
    theta = theta + (mass - k.unsqueeze(-1)) / slope
    return torch.sigmoid((x - theta) / temperature)


def test_vjp_against_closed_form_and_autograd_of_the_reference(vjp_device):
    x = seeded_randn(4, 30, seed=11)
    k = torch.tensor([2.0, 7.5, 15.0, 22.0], dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    p = _reference_with_autograd(x, k, 0.4)
    g = seeded_randn(4, 30, seed=12)
    expected_x, expected_k = torch.autograd.grad(p, (x, k), g)
    p = p.detach()
    closed_x, closed_k = _closed_form(g, p, 0.4)
    torch.testing.assert_close(closed_x, expected_x, atol=1e-10, rtol=0)
    torch.testing.assert_close(closed_k, expected_k, atol=1e-10, rtol=0)
    grad_x, grad_k = _gpu.vjp(g.to(vjp_device), p.to(vjp_device), 1 / 0.4)
    torch.testing.assert_close(grad_x.cpu(), closed_x, atol=1e-13, rtol=0)
    torch.testing.assert_close(grad_k.cpu(), closed_k, atol=1e-13, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_vjp_dtypes_blocks_and_saturated_rows(vjp_device, dtype):
    p = torch.sigmoid(seeded_randn(3, 300, seed=13) * 2)
    p[2] = (p[2] > 0.5).double()  # saturated: Σv = 0, exact zero gradient
    g = seeded_randn(3, 300, seed=14)
    inv_tau = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    p_d, g_d = p.to(dtype), g.to(dtype)
    expected_x, expected_k = _closed_form(g_d.double(), p_d.double(), 1 / inv_tau.unsqueeze(-1))
    grad_x, grad_k = _gpu.vjp(g_d.to(vjp_device), p_d.to(vjp_device), inv_tau.to(vjp_device),
                              block=128)  # fmt: skip
    assert grad_x.dtype == dtype and grad_k.shape == (3,)
    atol = 8 * torch.finfo(dtype).eps * 3
    torch.testing.assert_close(grad_x.double().cpu(), expected_x, atol=atol, rtol=0)
    torch.testing.assert_close(grad_k.double().cpu(), expected_k, atol=atol, rtol=0)
    assert torch.equal(grad_x[2].cpu(), torch.zeros(300, dtype=dtype))


def test_vjp_half_saturates_and_empty(vjp_device):
    p = torch.full((1, 2), 0.5, dtype=torch.float16, device=vjp_device)
    g = torch.tensor([[1.0, -1.0]], dtype=torch.float16, device=vjp_device)
    grad_x, _ = _gpu.vjp(g, p, 1e8)
    assert torch.isfinite(grad_x).all() and grad_x.abs().max() == torch.finfo(torch.float16).max
    empty = torch.empty(3, 0, device=vjp_device)
    grad_x, grad_k = _gpu.vjp(empty, empty, 1.0)
    assert grad_x.shape == (3, 0) and torch.equal(grad_k.cpu(), torch.zeros(3))


# ------------------------------------------------------------------ no host syncs


@pytest.mark.skipif(not CUDA, reason="needs a GPU (sync debug mode and CUDA graphs)")
def test_no_host_synchronisation_and_cuda_graph_capture(solver):
    solve, device = solver
    if device != "cuda":
        pytest.skip("CUDA only")
    x = seeded_randn(64, 40, seed=15, dtype=torch.float32).cuda()
    k = torch.full((64,), 3.5, device="cuda")
    expected = solve(x, k, 2.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        solve(x, k, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        solve(x, k, 2.0)  # warm-up (compiles the kernel) outside the capture
        with torch.cuda.graph(graph):
            captured = solve(x, k, 2.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.testing.assert_close(captured, expected)


# ------------------------------------------------------- compiled for a GPU, without one


@pytest.mark.parametrize(
    ("x_dtype", "rows", "n"),
    [(torch.float32, 4096, 64), (torch.float64, 2, 3000)],
)
def test_kernels_compile_for_a_cuda_gpu(x_dtype, rows, n):
    # Interpreted runs skip Triton's compiler (types of loop-carried values, constexpr
    # folding, lowering of the reductions): compile both kernels as the launcher would.
    triton = pytest.importorskip("triton", reason="triton is not installed")

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    module = _gpu._load_kernels(interpret=False)
    if module is None:
        pytest.skip(f"triton unusable: {_gpu.reason()}")
    assert isinstance(module._solve_kernel, triton.runtime.JITFunction)
    per_program, block = _gpu.tiling(rows, n)
    data = triton_pointer(x_dtype)
    solve = triton_pointer(torch.float64 if x_dtype == torch.float64 else torch.float32)
    runtime = {"x_ptr": data, "out_ptr": data, "k_ptr": solve, "k_stride": "i32"}
    runtime.update({"tau_ptr": solve, "tau_stride": "i32", "iters_ptr": "*i32"})
    runtime.update({"rows": "i32", "n": "i32"})
    constants = _gpu.solve_constants(x_dtype, per_program, block, count=False)
    assert compile_for_sm90(module._solve_kernel, runtime, constants).asm["cubin"]
    runtime = {"g_ptr": data, "p_ptr": data, "gx_ptr": data, "gk_ptr": data}
    runtime.update({"tau_ptr": solve, "tau_stride": "i32", "rows": "i32", "n": "i32"})
    constants = _gpu.vjp_constants(x_dtype, per_program, block)
    assert compile_for_sm90(module._vjp_kernel, runtime, constants).asm["cubin"]
