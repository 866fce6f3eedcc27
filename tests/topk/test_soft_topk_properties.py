"""Property tests (hypothesis) for soft_topk, and its behaviour under torch.func and compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from support import seeded_randn

from gradkit import soft_topk

# Every test here runs on both paths (see conftest.py).
pytestmark = pytest.mark.usefixtures("solver_path")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def slices(draw, min_n=1, max_n=12, bound=50.0):
    """A (rows, n) float64 tensor, a budget 0 ≤ k ≤ n, and a temperature."""
    rows = draw(st.integers(1, 3))
    n = draw(st.integers(min_n, max_n))
    x = draw(arrays(np.float64, (rows, n), elements=st.floats(-bound, bound)))
    k = draw(st.floats(0, n))
    temperature = draw(st.floats(0.05, 10))
    return torch.from_numpy(x), k, temperature


@SETTINGS
@given(slices())
def test_mass_equals_budget_and_values_in_unit_interval(case):
    x, k, temperature = case
    p = soft_topk(x, k, temperature=temperature)
    assert ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(
        p.sum(-1), torch.full(p.shape[:-1], k, dtype=torch.float64), atol=1e-9, rtol=0
    )


@SETTINGS
@given(slices(), st.randoms(use_true_random=False))
def test_permutation_equivariance(case, rng):
    x, k, temperature = case
    perm = list(range(x.shape[-1]))
    rng.shuffle(perm)
    p = soft_topk(x, k, temperature=temperature)
    torch.testing.assert_close(
        soft_topk(x[:, perm], k, temperature=temperature), p[:, perm], atol=1e-12, rtol=0
    )


@SETTINGS
@given(slices(), st.floats(-1000, 1000))
def test_invariance_to_a_constant_shift(case, shift):
    x, k, temperature = case
    p = soft_topk(x, k, temperature=temperature)
    # x + shift is rounded at ulp(1000) ≈ 1e−13: compare at that resolution.
    torch.testing.assert_close(
        soft_topk(x + shift, k, temperature=temperature), p, atol=1e-9, rtol=0
    )


@SETTINGS
@given(slices(min_n=2), st.data())
def test_monotone_in_each_entry(case, data):
    x, k, temperature = case
    i = data.draw(st.integers(0, x.shape[-1] - 1))
    bump = data.draw(st.floats(1e-3, 10))
    raised = x.clone()
    raised[:, i] += bump
    before = soft_topk(x, k, temperature=temperature)
    after = soft_topk(raised, k, temperature=temperature)
    others = [j for j in range(x.shape[-1]) if j != i]
    assert (after[:, i] >= before[:, i] - 1e-12).all()
    assert (after[:, others] <= before[:, others] + 1e-12).all()


@SETTINGS
@given(
    st.integers(2, 10).flatmap(
        lambda n: st.tuples(st.permutations(range(n)), st.integers(1, n - 1))
    )
)
def test_small_temperature_approaches_the_hard_mask(case):
    order, k = case
    x = torch.tensor(order, dtype=torch.float64) * 0.1  # distinct, gaps of 0.1
    p = soft_topk(x, k, temperature=1e-3)
    hard = torch.zeros_like(x).scatter(0, torch.topk(x, k).indices, 1.0)
    torch.testing.assert_close(p, hard, atol=1e-12, rtol=0)
    # and the soft value moves toward it as τ shrinks
    gaps = [(soft_topk(x, k, temperature=t) - hard).abs().max() for t in (1.0, 0.1, 0.02)]
    assert gaps[0] >= gaps[1] >= gaps[2]


@SETTINGS
@given(slices(bound=1e6))
def test_gradient_is_finite_and_sums_to_zero(case):
    x, k, temperature = case
    x = x.clone().requires_grad_()
    p = soft_topk(x, k, temperature=temperature)
    weights = torch.linspace(-1, 1, x.shape[-1], dtype=torch.float64)
    (p * weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    # Σ_i p_i = k whatever x is, so the gradient of the total mass is exactly zero.
    (grad_mass,) = torch.autograd.grad(soft_topk(x, k, temperature=temperature).sum(), x)
    torch.testing.assert_close(grad_mass, torch.zeros_like(grad_mass), atol=1e-9, rtol=0)


# --------------------------------------------------------------------- torch.func / compile


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("hard", [False, True])
def test_vmap_matches_eager(hard):
    x = _x(5, 3, 8)
    out = torch.func.vmap(lambda r: soft_topk(r, 2, temperature=0.7, hard=hard))(x)
    torch.testing.assert_close(out, soft_topk(x, 2, temperature=0.7, hard=hard))
    out = torch.func.vmap(lambda r: soft_topk(r, 2, dim=0), in_dims=1)(x)
    torch.testing.assert_close(out, soft_topk(x, 2, dim=0).movedim(1, 0))


def test_vmap_with_batched_and_unbatched_k():
    x = _x(5, 3, 8)
    k = torch.rand(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 6 + 1
    torch.testing.assert_close(torch.func.vmap(soft_topk)(x, k), soft_topk(x, k))
    k_shared = k[0]
    out = torch.func.vmap(soft_topk, in_dims=(0, None))(x, k_shared)
    torch.testing.assert_close(out, soft_topk(x, k_shared))
    out = torch.func.vmap(soft_topk, in_dims=(None, 0))(x[0], k)
    torch.testing.assert_close(out, soft_topk(x[0].expand(5, 3, 8), k))


def test_func_grad_vmap_grad_jacfwd_hessian_match_eager():
    x = _x(4, 8)
    weights = _x(8) + 1

    def loss(row):
        return (soft_topk(row, 3, temperature=0.6) * weights).sum()

    eager = []
    for row in x:
        row = row.clone().requires_grad_()
        loss(row).backward()
        eager.append(row.grad)
    eager = torch.stack(eager)
    torch.testing.assert_close(torch.func.grad(loss)(x[0]), eager[0])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(x), eager)
    jac_fwd = torch.func.jacfwd(lambda r: soft_topk(r, 3))(x[0])
    jac_rev = torch.func.jacrev(lambda r: soft_topk(r, 3))(x[0])
    torch.testing.assert_close(jac_fwd, jac_rev)
    hessian = torch.func.hessian(loss)(x[0])
    torch.testing.assert_close(hessian, torch.func.jacrev(torch.func.grad(loss))(x[0]))
    torch.testing.assert_close(hessian, hessian.T)


@pytest.mark.filterwarnings("ignore")
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    x = _x(3, 6)

    def fn(a):
        return soft_topk(a * 2, 2, temperature=0.5).pow(2).sum()

    compiled = torch.compile(fn, backend="aot_eager")
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    value_eager, value_compiled = fn(x_eager), compiled(x_compiled)
    value_eager.backward()
    value_compiled.backward()
    torch.testing.assert_close(value_compiled, value_eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_backward_accepts_a_batch_of_cotangents():
    # `is_grads_batched` vmaps the backward itself (as jacrev and batched vjps do): it must be
    # written with out-of-place ops, and equal one backward per cotangent.
    x = seeded_randn(4, 12).requires_grad_()
    p = soft_topk(x, 3, temperature=0.5)
    cotangents = seeded_randn(6, 4, 12, seed=1)
    batched = torch.autograd.grad(p, x, cotangents, is_grads_batched=True, retain_graph=True)[0]
    one_by_one = torch.stack(
        [torch.autograd.grad(p, x, c, retain_graph=True)[0] for c in cotangents]
    )
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-13)
