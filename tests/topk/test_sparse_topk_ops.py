"""sparse_topk as registered ops: torch.compile(fullgraph=True), torch.export, opcheck, jvp."""

from __future__ import annotations

import contextlib

import pytest
import torch
from support import seeded_randn

import gradkit
from gradkit.topk import _native, _sparse_ops

pytestmark = pytest.mark.skipif(
    not _sparse_ops.REGISTERED, reason="torch.library.register_fake needs torch ≥ 2.4"
)

WEIGHTS = torch.arange(8.0, dtype=torch.float64)


def _loss(x, k, tau, hard=False):
    return (gradkit.sparse_topk(x, k, temperature=tau, hard=hard) * WEIGHTS).sum()


def _grads(function, *inputs):
    inputs = [
        t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs
    ]
    function(*inputs).backward()
    return [t.grad for t in inputs if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(
    ("k", "tau", "hard"),
    [
        (3.0, 0.7, False),
        (torch.tensor([2.5, 3.0, 1.0, 4.0], dtype=torch.float64), 1.3, False),
        (3.0, torch.tensor(0.7, dtype=torch.float64), False),
        (3.0, 0.7, True),
    ],
)
def test_compile_fullgraph_matches_eager(k, tau, hard):
    torch._dynamo.reset()
    x = seeded_randn(4, 8, seed=1)
    explain = torch._dynamo.explain(lambda a, b, c: _loss(a, b, c, hard))(x, k, tau)
    assert explain.graph_break_count == 0
    compiled = torch.compile(lambda a, b, c: _loss(a, b, c, hard), fullgraph=True)
    for got, expected in zip(
        _grads(compiled, x, k, tau),
        _grads(lambda a, b, c: _loss(a, b, c, hard), x, k, tau),
        strict=True,
    ):
        torch.testing.assert_close(got, expected)


def test_export_matches_eager():
    module = gradkit.SparseTopK(k=2.5, temperature=0.5)
    x = seeded_randn(5, 8, seed=2)
    program = torch.export.export(module, (x,))
    assert "gradkit.sparse_topk" in program.graph_module.code
    other = seeded_randn(5, 8, seed=3)
    torch.testing.assert_close(program.module()(other), module(other))


@pytest.mark.parametrize("per_slice", [False, True])
def test_opcheck(per_slice):
    x = seeded_randn(4, 8, seed=4).requires_grad_()
    if per_slice:
        k = torch.tensor([1.0, 2.5, 3.0, 7.5], dtype=torch.float64, requires_grad=True)
        tau = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64, requires_grad=True)
        args = (x, k, 0.0, tau, 0.0)
    else:
        args = (x, None, 3.0, None, 0.7)
    torch.library.opcheck(torch.ops.gradkit.sparse_topk.default, args)
    p = gradkit.sparse_topk(x.detach(), 3.0, temperature=0.7)
    grad = seeded_randn(4, 8, seed=5)
    torch.library.opcheck(torch.ops.gradkit.sparse_topk_vjp.default, (grad, p, None, 0.7))


def test_op_gradcheck_and_jvp():
    """The op's own autograd formula (Autograd kernel), backward and forward mode."""
    x = seeded_randn(3, 8, seed=6)
    x = x + torch.linspace(0, 0.5, 8, dtype=torch.float64)  # distinct, away from kinks

    def op(a):
        return torch.ops.gradkit.sparse_topk(a, None, 3.0, None, 2.0)

    x.requires_grad_()
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))
    assert torch.autograd.gradcheck(
        op, (x,), check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False
    )


def test_jvp_matches_finite_differences_eager_and_compiled():
    x = seeded_randn(4, 8, seed=7)
    tangent = seeded_randn(4, 8, seed=8)

    def f(a):
        return gradkit.sparse_topk(a, 3.0, temperature=2.0)

    step = 1e-6
    finite = (f(x + step * tangent) - f(x - step * tangent)) / (2 * step)
    _, eager = torch.func.jvp(f, (x,), (tangent,))
    torch.testing.assert_close(eager, finite, atol=1e-7, rtol=0)
    assert eager.abs().sum() > 0
    if torch.__version__ < "2.13":  # compiling over torch.func needs torch >= 2.13
        return
    torch._dynamo.reset()
    _, compiled = torch.compile(lambda a, t: torch.func.jvp(f, (a,), (t,)))(x, tangent)
    torch.testing.assert_close(compiled, finite, atol=1e-7, rtol=0)


# ------------------------------------------------------------------ torch.func inside compile
_DYNAMO_FUNC = pytest.mark.skipif(
    torch.__version__ < "2.13", reason="compiling over torch.func transforms needs torch >= 2.13"
)


def _sparse_op(x, k, tau):
    return gradkit.sparse_topk(x, k, temperature=tau)


def _sparse_problem():
    """Distinct entries away from the kinks, per-slice k and τ (all carrying tangents)."""
    x = seeded_randn(4, 8, seed=20) + torch.linspace(0, 0.5, 8, dtype=torch.float64)
    k = torch.tensor([1.5, 3.0, 2.25, 6.0], dtype=torch.float64)
    tau = torch.tensor([0.7, 1.3, 2.0, 0.9], dtype=torch.float64)
    tangents = (
        seeded_randn(4, 8, seed=21),
        seeded_randn(4, seed=22),
        seeded_randn(4, seed=23),
    )
    return (x, k, tau), tangents


@_DYNAMO_FUNC
def test_compiled_jvp_fullgraph_matches_eager_and_finite_differences():
    torch._dynamo.reset()
    primals, tangents = _sparse_problem()
    step = 1e-6
    plus = _sparse_op(*(p + step * t for p, t in zip(primals, tangents, strict=True)))
    minus = _sparse_op(*(p - step * t for p, t in zip(primals, tangents, strict=True)))
    finite = (plus - minus) / (2 * step)
    assert finite.abs().max() > 0.1  # not a vacuous comparison

    def jvp(*args):
        return torch.func.jvp(_sparse_op, args[:3], args[3:])

    compiled = torch.compile(jvp, fullgraph=True, backend="aot_eager")
    value, tangent = compiled(*primals, *tangents)
    eager_value, eager_tangent = jvp(*primals, *tangents)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(tangent, eager_tangent)
    torch.testing.assert_close(tangent, finite, atol=1e-7, rtol=0)


@_DYNAMO_FUNC
@pytest.mark.parametrize("argnums", [0, (0, 1, 2)])
def test_compiled_grad_fullgraph_matches_eager(argnums):
    torch._dynamo.reset()
    primals, _ = _sparse_problem()
    weights = seeded_randn(8, seed=24)

    def loss(x, k, tau):
        return (_sparse_op(x, k, tau) * weights).sum()

    grad = torch.func.grad(loss, argnums=argnums)
    compiled = torch.compile(grad, fullgraph=True, backend="aot_eager")
    eager = torch.utils._pytree.tree_leaves(grad(*primals))
    got = torch.utils._pytree.tree_leaves(compiled(*primals))
    assert len(got) == len(eager) and eager[0].abs().sum() > 0
    for value, reference in zip(got, eager, strict=True):
        torch.testing.assert_close(value, reference)
    # and the eager torch.func gradient is the autograd one
    leaves = [p.clone().requires_grad_() for p in primals]
    loss(*leaves).backward()
    targets = [leaves[i] for i in ((argnums,) if isinstance(argnums, int) else argnums)]
    for value, leaf in zip(eager, targets, strict=True):
        torch.testing.assert_close(value, leaf.grad)


@_DYNAMO_FUNC
def test_compiled_vmap_of_grad_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = seeded_randn(5, 3, 8, seed=25)
    weights = seeded_randn(8, seed=26)

    def loss(row):
        return (gradkit.sparse_topk(row, 2.5, temperature=0.6) * weights).sum()

    transform = torch.func.vmap(torch.func.grad(loss))
    compiled = torch.compile(transform, fullgraph=True, backend="aot_eager")
    expected = transform(x)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(compiled(x), expected)


# ------------------------------------------------------- compile: layouts and half precision


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("op", [gradkit.soft_topk, gradkit.sparse_topk])
@pytest.mark.parametrize(("shape", "dim"), [((10, 4), 0), ((3, 10, 2), 1)])
def test_compile_with_dim_not_last_matches_eager(op, shape, dim, native):
    # Inductor checks the op's real output strides against its fake implementation: a
    # permuted view of x goes in, a contiguous p comes out, from the fused kernel or the
    # PyTorch-ops path (which keeps an input's layout).
    torch._dynamo.reset()
    with contextlib.nullcontext() if native else _native.disabled():
        _check_compiled_with_dim(op, shape, dim)


def _check_compiled_with_dim(op, shape, dim):
    x = seeded_randn(*shape, seed=30, dtype=torch.float32)
    weights = seeded_randn(*shape, seed=31, dtype=torch.float32)

    def loss(a):
        return (op(a, 2, dim=dim, temperature=0.5) * weights).sum()

    compiled = torch.compile(loss, fullgraph=True)
    (got,), (expected,) = _grads(compiled, x), _grads(loss, x)
    assert torch.count_nonzero(expected) > 0
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op", [gradkit.soft_topk, gradkit.sparse_topk])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_half_precision_matches_eager_and_saturates(op, dtype):
    # Half precision is solved in float32; the gradient (which scales as 1/τ) comes back
    # saturated at the dtype's largest value, not inf, compiled as eagerly.
    torch._dynamo.reset()
    x = seeded_randn(4, 10, seed=32, dtype=torch.float32).to(dtype)
    weights = seeded_randn(4, 10, seed=33, dtype=torch.float32)

    def loss(a):
        return (op(a, 2, temperature=1e-6).float() * weights).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), loss(x))
    (got,), (expected,) = _grads(compiled, x), _grads(loss, x)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)
