"""The fused kernel built without AVX-512, on a machine that has it.

On AVX-512 builds some of the long-row scans run as vector loops with mask registers
(``ROW_SCANS`` in ``_native.c``); other builds run the generic loops.  The kernel cache builds
for the machine it runs on, so on an AVX-512 machine the generic loops would go untested: this
builds the kernel once more for ``-march=x86-64-v3`` (AVX2) and runs the paths that differ
against the float64 references, and against the installed build.
"""

from __future__ import annotations

import ctypes
import math
import platform

import pytest
import torch
from support import reference_soft_topk, seeded_randn

from gradkit.topk import _kernel_cache, _native, _sparse

_V3_FLAGS = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}  # (x86-64-v3 needs them)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (the cache key's ``flags`` line of /proc/cpuinfo)."""
    return set(_kernel_cache._cpu_signature().partition(":")[2].split())


pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64"
    or not _V3_FLAGS <= _cpu_flags()
    or _kernel_cache.compiler_command()[0] is None
    or not _native.available(),
    reason="needs an x86-64-v3 CPU, a C compiler and the fused kernel",
)


@pytest.fixture(scope="module")
def generic_build(tmp_path_factory) -> ctypes.CDLL:
    """``_native.c`` compiled for x86-64-v3 (no AVX-512), with the kernel's signatures."""
    folder = tmp_path_factory.mktemp("v3")
    compiler, _ = _kernel_cache.compiler_command()
    library = folder / "topk_v3.so"
    try:
        _kernel_cache._compile(
            compiler, "pthreads", folder, library, arches=(["-march=x86-64-v3"],)
        )
    except _kernel_cache.BuildError as error:  # (-march=x86-64-v3: GCC 11, Clang 12 and later)
        pytest.skip(f"no x86-64-v3 build here: {error}")
    return _native._open_library(library)


def _with_library(monkeypatch, library: ctypes.CDLL | None):
    """Route ``_native``'s entry points to ``library`` (``None``: the installed build)."""
    installed = _native._load()
    monkeypatch.setattr(_native, "_library", library if library is not None else installed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generic_loops_solve_wide_rows_of_small_budgets(generic_build, monkeypatch, dtype):
    # soft_topk: the top-list start and the near-set copy (rows of 300–5000 spanning tens of τ);
    # sparse_topk: the order-statistics window (rows of 300–5000, budgets below 16).
    for n, spread in [(300, 10.0), (1000, 20.0), (5000, 60.0)]:
        x = seeded_randn(4, n, seed=n, dtype=torch.float64) * spread
        x[3, ::4] = -math.inf
        x = x.to(dtype)
        for k in [1.0, 2.0, 4.5, 14.0]:
            _with_library(monkeypatch, generic_build)
            p, status, _ = _native.solve(x, k, 1.0)
            sparse, sparse_status, _ = _native.sparse_solve(x, k, 1.0)
            _with_library(monkeypatch, None)
            installed, _, _ = _native.sparse_solve(x, k, 1.0)
            assert bool((status == 0).all()) and bool((sparse_status == 0).all())
            live = x[:3].double()
            tolerance = 16 * torch.finfo(dtype).eps * float(live.abs().max()) + 1e-12 * n
            expected = reference_soft_topk(live, k)
            torch.testing.assert_close(p[:3].double(), expected, rtol=0, atol=tolerance)
            assert bool((p[3][x[3] == -math.inf] == 0).all())
            exact = _sparse.solve_sparse_nosync(x.double(), torch.full((4,), k).double(), 1.0)
            assert bool(((sparse.double() - exact).abs() <= 64 * torch.finfo(dtype).eps).all())
            assert torch.equal(sparse, installed)  # (the exact solve: the same bits)
