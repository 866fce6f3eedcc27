"""The sync-free code of the CUDA paths, checked on CPU tensors: no operator that reads a
tensor back to the host (on a GPU: a synchronisation, and no CUDA-graph capture).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches host reads (those tests live in
``test_gpu_kernel.py`` and skip without a GPU).  Here a dispatch mode records every ATen call
that needs the data on the host: ``.item()``/``bool()``/``.tolist()``
(``_local_scalar_dense``), data-dependent shapes (``nonzero``, ``masked_select``, boolean
indexing, ``unique``), ``equal`` and ``is_nonzero``.  It runs the functions the CUDA branches
call (the sync-free solves, the differentiable vjps, the straight-through mask), over the
edge cases, so a host read added to any of them fails on a machine without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import seeded_randn
from torch.utils._python_dispatch import TorchDispatchMode

from gradkit.topk import _solve, _sparse
from gradkit.topk._solve_nosync import solve_nosync
from gradkit.topk.soft_topk import _hard_mask, _tangent

aten = torch.ops.aten
_HOST_READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_BOOL_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class _HostReads(TorchDispatchMode):
    """Records the ATen calls that read tensor data on the host."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS or (func in _BOOL_INDEXING and _bool_index(args, kwargs)):
            self.seen.append(str(func))
        return func(*args, **kwargs)


def _bool_index(args, kwargs) -> bool:
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _no_host_reads(function, *args):
    with _HostReads() as mode:
        out = function(*args)
    assert mode.seen == [], f"{function.__name__} read tensors on the host: {mode.seen}"
    return out


def test_the_detector_sees_host_reads():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x[x > 0]):
        with _HostReads() as mode:
            read()
        assert mode.seen, read


def _edge_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows, a row with −inf, +inf, NaN, ties; per-slice budgets incl. 0 and n."""
    x = (seeded_randn(8, 12, seed=41) * 3).to(dtype)
    x[1, :4] = -math.inf
    x[2, 0] = math.inf
    x[3, 5] = math.nan
    x[4] = 0.5
    x[5] *= 1e4  # a wide row (multisection)
    k = torch.tensor([2.0, 9.0, 3.5, 2.0, 5.0, 1.0, 0.0, 12.0], dtype=dtype)
    return x, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_soft_solve_without_host_reads(dtype):
    x, k = _edge_rows(dtype)
    p = _no_host_reads(solve_nosync, x, k, 2.0)
    expected = _solve.solve_soft_topk(x.double(), k.double(), 0.5)
    atol = 64 * torch.finfo(dtype).eps
    torch.testing.assert_close(p.double(), expected, atol=atol, rtol=0, equal_nan=True)
    per_slice_tau = torch.linspace(0.5, 4.0, 8, dtype=dtype)
    _no_host_reads(solve_nosync, x, k, per_slice_tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_solve_without_host_reads(dtype):
    x, k = _edge_rows(dtype)
    p = _no_host_reads(_sparse.solve_sparse_nosync, x, k, 0.5)
    expected = _sparse.solve_sparse_topk(x.double(), k.double(), 0.5)
    atol = 64 * torch.finfo(dtype).eps
    torch.testing.assert_close(p.double(), expected, atol=atol, rtol=0, equal_nan=True)


def test_differentiable_backward_formulas_without_host_reads():
    # What a CUDA backward runs (with grad enabled: the out-of-place, double-backward path),
    # and the tangent map of forward mode and the composite.
    x, k = _edge_rows(torch.float64)
    grad = seeded_randn(8, 12, seed=42)
    p = solve_nosync(x, k, 1.0)
    sparse_p = _sparse.solve_sparse_nosync(x, k, 1.0)
    tau = torch.full((8,), 0.7, dtype=torch.float64)
    with torch.enable_grad():
        _no_host_reads(_solve.soft_topk_vjp, grad, p, 0.7)
        _no_host_reads(_solve.soft_topk_vjp, grad, p, tau)
        _no_host_reads(_sparse.sparse_topk_vjp, grad, sparse_p, tau)
    _no_host_reads(_tangent, p, tau, grad, k, tau)


def test_straight_through_mask_without_host_reads():
    x, _ = _edge_rows(torch.float32)
    k = torch.tensor([2.0, 9.0, 3.0, 2.0, 5.0, 1.0, 0.0, 12.0])  # integers (hard=True)
    soft = solve_nosync(x, k, 1.0)
    mask = _no_host_reads(_hard_mask, x, k, soft, True)
    finite_rows = [0, 5, 6, 7]  # the torch.topk set of k[row] entries, as the CPU path gives
    ranks = torch.arange(12).expand(4, 12) < k[finite_rows].unsqueeze(-1)
    order = torch.topk(x[finite_rows], 12, dim=-1).indices
    expected = torch.zeros(4, 12).scatter(-1, order, ranks.float())
    torch.testing.assert_close(mask[finite_rows], expected)
    assert torch.isnan(mask[3]).all()  # the NaN slice stays NaN
