"""A learnable temperature: ``soft_topk(x, k, temperature=τ)`` with ``τ`` a tensor (one value,
or one per slice) that requires grad; and the errors of bad ``x``/``temperature`` tensors."""

from __future__ import annotations

import pytest
import torch
from support import reference_soft_topk, seeded_randn

from gradkit import SoftTopK, soft_topk


def _taus(*shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    return seeded_randn(*shape, seed=seed, dtype=dtype).abs() + 0.3


def _reference(x, k, tau) -> torch.Tensor:
    """Per-slice float64 bisection (independent of gradkit), last dimension."""
    rows = x.reshape(-1, x.shape[-1])
    k = torch.as_tensor(k, dtype=torch.float64).expand(x.shape[:-1]).reshape(-1)
    tau = torch.as_tensor(tau, dtype=torch.float64).expand(x.shape[:-1]).reshape(-1)
    out = [reference_soft_topk(r, float(b), float(t)) for r, b, t in zip(rows, k, tau, strict=True)]
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("per_slice", [False, True])
def test_value_matches_reference(solver_path, per_slice):
    x = seeded_randn(5, 9, seed=1)
    tau = _taus(5, seed=2) if per_slice else torch.tensor(0.45, dtype=torch.float64)
    p = soft_topk(x, 3, temperature=tau.requires_grad_())
    torch.testing.assert_close(p, _reference(x, 3, tau.detach()), atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_slice", [False, True])
def test_gradcheck_and_gradgradcheck(solver_path, per_slice):
    x = seeded_randn(3, 7, seed=3).requires_grad_()
    k = torch.tensor([1.0, 2.5, 5.0], dtype=torch.float64, requires_grad=True)
    tau = (
        _taus(3, seed=4) if per_slice else torch.tensor(0.6, dtype=torch.float64)
    ).requires_grad_()

    def fn(x, k, tau):
        return soft_topk(x, k, temperature=tau)

    assert torch.autograd.gradcheck(fn, (x, k, tau), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x, k, tau), check_fwd_over_rev=True)


def test_temperature_gradient_matches_finite_differences_of_the_reference():
    x = seeded_randn(4, 8, seed=5)
    weights = seeded_randn(4, 8, seed=6)
    tau = _taus(4, seed=7).requires_grad_()
    (soft_topk(x, 2.5, temperature=tau) * weights).sum().backward()
    step = 1e-5
    expected = torch.stack(
        [
            ((_reference(x[i], 2.5, t + step) - _reference(x[i], 2.5, t - step)) * weights[i]).sum()
            / (2 * step)
            for i, t in enumerate(tau.detach())
        ]
    )
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(tau.grad, expected, atol=1e-8, rtol=1e-6)


def test_a_scalar_temperature_gets_the_sum_of_the_per_slice_gradients():
    x = seeded_randn(4, 8, seed=8)
    weights = seeded_randn(4, 8, seed=9)
    scalar = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    per_slice = torch.full((4,), 0.8, dtype=torch.float64, requires_grad=True)
    (soft_topk(x, 3, temperature=scalar) * weights).sum().backward()
    (soft_topk(x, 3, temperature=per_slice) * weights).sum().backward()
    torch.testing.assert_close(scalar.grad, per_slice.grad.sum())


def test_broadcasting_with_dim_and_the_module():
    x = seeded_randn(2, 6, 3, seed=10)  # selection along dim=1: slices are (2, 3)
    tau = _taus(3, seed=11).requires_grad_()  # broadcasts to (2, 3)
    p = soft_topk(x, 2, dim=1, temperature=tau)
    expected = _reference(x.movedim(1, -1), 2, tau.detach().expand(2, 3)).movedim(-1, 1)
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)
    layer = SoftTopK(k=2, dim=1, temperature=torch.nn.Parameter(tau.detach().clone()))
    assert [name for name, _ in layer.named_parameters()] == ["temperature"]
    layer(x).pow(2).sum().backward()
    assert layer.temperature.grad.shape == (3,)
    assert torch.count_nonzero(layer.temperature.grad) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_temperature_gradients_are_finite(dtype):
    x = seeded_randn(3, 10, seed=12, dtype=dtype)
    tau = torch.tensor([0.05, 0.5, 5.0], dtype=dtype, requires_grad=True)
    p = soft_topk(x, 4, temperature=tau)
    assert p.dtype == dtype
    p.float().pow(2).sum().backward()
    assert tau.grad.dtype == dtype and torch.isfinite(tau.grad).all()
    expected = _reference(x.double(), 4, tau.detach().double())
    torch.testing.assert_close(p.double(), expected, atol=4 * torch.finfo(dtype).eps, rtol=0)


def test_edge_slices_get_zero_temperature_gradient():
    x = seeded_randn(4, 6, seed=13)
    x[1, :3] = -torch.inf  # masked entries
    x[2] = 0.5  # ties: p = k/n whatever τ is
    k = torch.tensor([0.0, 2.0, 2.0, 6.0], dtype=torch.float64)  # k = 0 and k = n
    tau = _taus(4, seed=14).requires_grad_()
    (soft_topk(x, k, temperature=tau) * seeded_randn(4, 6, seed=15)).sum().backward()
    assert torch.isfinite(tau.grad).all()
    # (ties: z − z̄ is zero up to the rounding of logit p)
    assert tau.grad[[0, 2, 3]].abs().max() < 1e-12 and tau.grad[1].abs() > 1e-3


# -------------------------------------------------------------------------------------- errors


def test_a_temperature_that_does_not_broadcast_names_the_shapes():
    x = seeded_randn(3, 5, seed=16)
    with pytest.raises(ValueError, match=r"temperature.*\(3,\).*\(2,\)"):
        soft_topk(x, 2, temperature=torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_tensor_values_are_checked(bad):
    tau = torch.tensor([0.5, bad, 1.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        soft_topk(seeded_randn(3, 5, seed=17), 2, temperature=tau)


def test_complex_or_bool_temperature_is_a_type_error():
    for tau in (torch.tensor(1 + 1j), torch.tensor(True)):
        with pytest.raises(TypeError, match="temperature"):
            soft_topk(seeded_randn(3, 5, seed=18), 2, temperature=tau)


def test_meta_and_sparse_x_give_a_clear_error():
    with pytest.raises(ValueError, match="soft_topk: x is on the meta device"):
        soft_topk(torch.empty(3, 5, device="meta"), 2)
    with pytest.raises(TypeError, match="soft_topk: x must be a dense"):
        soft_topk(seeded_randn(3, 5, seed=19).to_sparse(), 2)
