"""Run the operator's tests on both forward/backward paths: the fused CPU kernel (when built)
and the PyTorch-ops path (which also serves everything the kernel leaves)."""

from __future__ import annotations

import pytest
import torch
from support import need_triton_kernels

from gradkit.topk import _native

_NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


@pytest.fixture(params=["native", "torch"])
def solver_path(request):
    """``native``: as a user gets it (the kernel where it applies); ``torch``: PyTorch ops only."""
    if request.param == "native" and not _native.available():
        pytest.skip(f"fused CPU kernel {_native.status()}")
    if request.param == "torch":
        with _native.disabled():
            yield request.param
    else:
        yield request.param


# ------------------------------------------------ the GPU paths (test_*gpu_kernel.py)


@pytest.fixture(
    params=[
        ("triton", "cpu"),
        pytest.param(("triton", "cuda"), marks=_NEEDS_GPU),
        ("nosync", "cpu"),
        pytest.param(("nosync", "cuda"), marks=_NEEDS_GPU),
    ],
    ids=lambda param: "-".join(param),
)
def gpu_path(request):
    """``(kind, device)``: the Triton kernels (``triton``) or the sync-free PyTorch path
    (``nosync``) on one device."""
    kind, device = request.param
    if kind == "triton":
        need_triton_kernels(device)
    return kind, device


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_NEEDS_GPU)])
def vjp_device(request):
    """A device the Triton vjp kernels run on."""
    need_triton_kernels(request.param)
    return request.param
