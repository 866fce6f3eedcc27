"""soft_topk values against independent references, gradients, argument errors, the module."""

from __future__ import annotations

import math

import pytest
import torch
from support import reference_soft_topk
from support import seeded_randn as _randn
from torch.autograd import gradcheck, gradgradcheck

from gradkit import SoftTopK, soft_topk

# Every test here runs on both paths (see conftest.py).
pytestmark = pytest.mark.usefixtures("solver_path")


def mpmath_soft_topk(values: list[float], k: float, temperature: float) -> list[float]:
    """50-digit reference for one slice (bisection in mpmath, which torch's sympy brings)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        xs = [mpmath.mpf(v) for v in values]
        tau = mpmath.mpf(temperature)
        lo, hi = min(xs) - 60 * tau, max(xs) + 60 * tau
        for _ in range(300):
            mid = (lo + hi) / 2
            mass = sum(1 / (1 + mpmath.exp(-(v - mid) / tau)) for v in xs)
            if mass > k:
                lo = mid
            else:
                hi = mid
        theta = (lo + hi) / 2
        return [float(1 / (1 + mpmath.exp(-(v - theta) / tau))) for v in xs]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("k", [1, 2.5, 4, 7.25])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_matches_bisection_reference_float64(k, temperature):
    x = _randn(6, 9) * 3
    p = soft_topk(x, k, temperature=temperature)
    torch.testing.assert_close(p, reference_soft_topk(x, k, temperature), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(-1), torch.full((6,), float(k), dtype=torch.float64))


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.3), (2.5, 1.0), (4, 2.0)])
def test_matches_mpmath_reference(k, temperature):
    values = [0.3, -1.2, 2.5, 0.31, 1.7, -0.4]
    p = soft_topk(torch.tensor(values, dtype=torch.float64), k, temperature=temperature)
    expected = torch.tensor(mpmath_soft_topk(values, k, temperature), dtype=torch.float64)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_dim_equals_moving_the_axis_last(dim):
    x = _randn(4, 5, 6)
    k = 2.5
    expected = reference_soft_topk(x.movedim(dim, -1), k, 0.7).movedim(-1, dim)
    torch.testing.assert_close(
        soft_topk(x, k, dim=dim, temperature=0.7), expected, atol=1e-12, rtol=0
    )


def test_per_slice_k_tensor_broadcasts():
    x = _randn(3, 4, 8)
    k_rows = torch.tensor([1.0, 2.5, 4.0, 7.0], dtype=torch.float64)  # one per dim-1 index
    p = soft_topk(x, k_rows, dim=-1)
    torch.testing.assert_close(p.sum(-1), k_rows.expand(3, 4))
    torch.testing.assert_close(p, reference_soft_topk(x, k_rows.expand(3, 4)), atol=1e-12, rtol=0)
    # Integer tensors are accepted as budgets too.
    p_int = soft_topk(x, torch.tensor([1, 2, 4, 7]))
    torch.testing.assert_close(p_int.sum(-1), torch.tensor([1.0, 2, 4, 7]).double().expand(3, 4))


def test_float32_matches_float64():
    x = _randn(16, 300)
    for k, temperature in [(3, 0.1), (150, 1.0), (290.5, 2.0)]:
        p64 = soft_topk(x, k, temperature=temperature)
        p32 = soft_topk(x.float(), k, temperature=temperature)
        assert p32.dtype == torch.float32
        torch.testing.assert_close(p32.double(), p64, atol=2e-5, rtol=0)


def test_noncontiguous_input():
    x = _randn(7, 5).t()  # a transposed view
    torch.testing.assert_close(
        soft_topk(x, 2), reference_soft_topk(x.contiguous(), 2), atol=1e-12, rtol=0
    )


# -------------------------------------------------------------------------- gradients

SHAPES_AND_DIMS = [((7,), 0), ((7,), -1), ((3, 6), 0), ((3, 6), 1), ((3, 6), -1), ((2, 3, 5), 1)]


def _k_variants(x: torch.Tensor, dim: int):
    """Budgets of every form for the slices of x along dim: int, fraction, tensor, learnable."""
    n = x.shape[dim]
    batch = x.movedim(dim, -1).shape[:-1]
    k_tensor = torch.linspace(0.7, n - 0.7, max(1, math.prod(batch)), dtype=torch.float64)
    k_tensor = k_tensor.reshape(batch)
    return {
        "int": 2,
        "fraction": 1.5,
        "tensor": k_tensor,
        "tensor_grad": k_tensor.clone().requires_grad_(),
    }


@pytest.mark.parametrize(("shape", "dim"), SHAPES_AND_DIMS)
@pytest.mark.parametrize("k_form", ["int", "fraction", "tensor", "tensor_grad"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_gradcheck(shape, dim, k_form, temperature):
    x = (_randn(*shape, seed=len(shape) + dim) * 0.5).requires_grad_()
    k = _k_variants(x, dim)[k_form]
    inputs = (x, k) if isinstance(k, torch.Tensor) and k.requires_grad else (x,)

    def fn(x_, k_=k):
        return soft_topk(x_, k_, dim=dim, temperature=temperature)

    assert gradcheck(fn, inputs, check_forward_ad=True)
    if temperature == 1.0:  # second order: one temperature keeps the suite fast
        assert gradgradcheck(fn, inputs)


def test_gradient_with_respect_to_k_is_v_over_sum_v():
    x = _randn(2, 6)
    k = torch.tensor([1.5, 3.0], dtype=torch.float64, requires_grad=True)
    p = soft_topk(x, k, temperature=0.8)
    v = p.detach() * (1 - p.detach())
    (grad_k,) = torch.autograd.grad(p[:, 2].sum(), k)
    torch.testing.assert_close(grad_k, v[:, 2] / v.sum(-1))
    # A unit increase of the budget adds exactly one unit of mass.
    jac = torch.autograd.functional.jacobian(lambda kk: soft_topk(x, kk, temperature=0.8), k)
    torch.testing.assert_close(jac.sum(1), torch.eye(2, dtype=torch.float64))


def test_backward_matches_explicit_jacobian():
    x = _randn(5) * 2
    temperature = 0.6
    p = soft_topk(x, 2, temperature=temperature)
    v = p * (1 - p)
    expected = (torch.diag(v) - torch.outer(v, v) / v.sum()) / temperature
    jac = torch.autograd.functional.jacobian(lambda a: soft_topk(a, 2, temperature=temperature), x)
    torch.testing.assert_close(jac, expected)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("k", [-0.5, 9.5, math.nan, math.inf])
def test_bad_k_number_raises_value_error_naming_k_and_n(k):
    with pytest.raises(ValueError, match=r"k.*n") as info:
        soft_topk(_randn(3, 9, dtype=torch.float32), k)
    assert "9" in str(info.value)


@pytest.mark.parametrize("bad", [[-1.0, 2.0], [2.0, 10.0], [math.nan, 1.0]])
def test_bad_k_tensor_raises_value_error(bad):
    with pytest.raises(ValueError, match="k"):
        soft_topk(_randn(2, 9, dtype=torch.float32), torch.tensor(bad))


def test_k_tensor_with_wrong_shape_raises():
    with pytest.raises(ValueError, match="k"):
        soft_topk(_randn(2, 9, dtype=torch.float32), torch.ones(3))


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature_raises_value_error(temperature):
    with pytest.raises(ValueError, match="temperature"):
        soft_topk(_randn(4, dtype=torch.float32), 2, temperature=temperature)


def test_non_number_temperature_raises_type_error():
    with pytest.raises(TypeError, match="temperature"):
        soft_topk(_randn(4, dtype=torch.float32), 2, temperature="hot")


@pytest.mark.parametrize("x", [torch.arange(5), torch.ones(5, dtype=torch.bool), [1.0, 2.0]])
def test_non_floating_x_raises_type_error(x):
    with pytest.raises(TypeError, match="x"):
        soft_topk(x, 1)


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_bad_dim_raises_value_and_index_error(dim):
    x = _randn(3, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="dim"):
        soft_topk(x, 1, dim=dim)
    with pytest.raises(IndexError, match="dim"):
        soft_topk(x, 1, dim=dim)


def test_zero_dim_x_and_non_int_dim_raise():
    with pytest.raises(ValueError, match="dimension"):
        soft_topk(torch.tensor(1.0), 0)
    with pytest.raises(TypeError, match="dim"):
        soft_topk(_randn(3, dtype=torch.float32), 1, dim=0.5)


def test_hard_with_fractional_k_raises():
    with pytest.raises(ValueError, match="integer"):
        soft_topk(_randn(5, dtype=torch.float32), 1.5, hard=True)
    with pytest.raises(ValueError, match="integer"):
        soft_topk(_randn(2, 5, dtype=torch.float32), torch.tensor([1.0, 2.5]), hard=True)


# ----------------------------------------------------------------------------- module


def test_module_matches_function_and_repr():
    x = _randn(4, 10)
    layer = SoftTopK(3, dim=0, temperature=0.5)
    torch.testing.assert_close(layer(x), soft_topk(x, 3, dim=0, temperature=0.5))
    hard = SoftTopK(2, hard=True)
    torch.testing.assert_close(hard(x), soft_topk(x, 2, hard=True))
    assert "k=3" in repr(layer) and "temperature=0.5" in repr(layer)
    assert SoftTopK.__doc__ and "σ" in SoftTopK.__doc__
    with pytest.raises(ValueError, match="temperature"):
        SoftTopK(2, temperature=0)


def test_module_with_tensor_budgets():
    x = _randn(3, 6)
    budget = torch.tensor([1.0, 2.0, 3.5], dtype=torch.float64)
    layer = SoftTopK(budget)
    assert "k" in dict(layer.named_buffers())  # follows .to(device)
    torch.testing.assert_close(layer(x).sum(-1), budget)
    learnable = SoftTopK(torch.nn.Parameter(budget.clone()))
    assert "k" in dict(learnable.named_parameters())
    learnable(x)[:, 0].sum().backward()
    assert learnable.k.grad is not None and torch.isfinite(learnable.k.grad).all()


def test_docstring_teaches_the_operator():
    doc = soft_topk.__doc__
    for needle in ("σ((x_i − θ)/τ)", "Σ_i p_i = k", "Example", "hard", "−inf", "Complexity"):
        assert needle in doc


def test_docstring_examples_run():
    import doctest
    import importlib

    # (the attribute gradkit.topk.soft_topk is the function; fetch the module itself)
    module = importlib.import_module("gradkit.topk.soft_topk")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0
