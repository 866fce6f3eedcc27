"""Run the operator's tests on both forward/backward paths: the fused CPU kernel (when built)
and the PyTorch-ops path (which also serves everything the kernel leaves)."""

from __future__ import annotations

import pytest

from gradkit.topk import _native


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
