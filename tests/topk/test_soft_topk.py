"""Tests for gradkit.soft_topk: values against an independent reference, gradients, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from gradkit import SoftTopK, soft_topk


def reference_soft_topk(x: torch.Tensor, k, temperature: float = 1.0) -> torch.Tensor:
    """Independent float64 reference: 200 plain bisection steps on θ over the last dim."""
    x = x.double()
    k = torch.as_tensor(k, dtype=torch.float64).expand(x.shape[:-1]).unsqueeze(-1)
    lo = x.min(dim=-1, keepdim=True).values - 50 * temperature
    hi = x.max(dim=-1, keepdim=True).values + 50 * temperature
    for _ in range(200):
        mid = (lo + hi) / 2
        mass = torch.sigmoid((x - mid) / temperature).sum(dim=-1, keepdim=True)
        lo = torch.where(mass > k, mid, lo)
        hi = torch.where(mass > k, hi, mid)
    return torch.sigmoid((x - (lo + hi) / 2) / temperature)


@pytest.mark.parametrize("k", [1, 2.5, 4, 7.25])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_matches_reference_float64(k, temperature):
    x = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = soft_topk(x, k, temperature=temperature)
    torch.testing.assert_close(p, reference_soft_topk(x, k, temperature), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(-1), torch.full((6,), float(k), dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2.5])
def test_gradcheck_and_gradgradcheck(k):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a: soft_topk(a, k, temperature=0.7), (x,))
    assert gradgradcheck(lambda a: soft_topk(a, k, temperature=0.7), (x,))


def test_edge_cases_are_finite():
    inf = math.inf
    x = torch.tensor([[1.0, -inf, 2.0, inf, 0.5], [1.0, 2.0, math.nan, 3.0, 4.0]])
    p = soft_topk(x, 2)
    assert p[0, 1] == 0 and p[0, 3] == 1
    torch.testing.assert_close(p[0].sum(), torch.tensor(2.0))
    assert torch.isnan(p[1]).all()


def test_module_matches_function():
    x = torch.randn(4, 10)
    torch.testing.assert_close(SoftTopK(3, temperature=0.5)(x), soft_topk(x, 3, temperature=0.5))
