"""soft_topk as registered operators: opcheck, torch.compile(fullgraph=True), torch.export,
and forward-mode derivatives (jvp) checked against finite differences, eager and compiled.

Compilation is slow: the shapes are tiny and most tests use the ``aot_eager`` backend (Dynamo
and AOT autograd, the parts that trace the operator), one uses the default (inductor)."""

from __future__ import annotations

import importlib

import pytest
import torch
from support import reference_soft_topk, seeded_randn

from gradkit import SoftTopK, soft_topk, sparse_topk
from gradkit.topk import _native, _ops

pytestmark = pytest.mark.filterwarnings("ignore")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _budgets(rows: int, device="cpu") -> torch.Tensor:
    return torch.arange(1, rows + 1, dtype=torch.float64, device=device) % 5 + 0.5


# ---------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_solve(device, dtype):
    x = seeded_randn(4, 7, seed=1, dtype=dtype).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.gradkit.soft_topk.default, (x, None, 2.0, None, 0.5))
    k = _budgets(4, device).to(dtype).requires_grad_()
    tau = (seeded_randn(4, seed=2, dtype=dtype).abs() + 0.3).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.gradkit.soft_topk.default, (x, k, 0.0, tau, 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_slice_tau", [False, True])
def test_opcheck_vjp(device, per_slice_tau):
    x = seeded_randn(4, 7, seed=3).to(device)
    p = soft_topk(x, 3, temperature=0.7)
    grad = seeded_randn(4, 7, seed=4).to(device)
    tau_tensor = torch.full((4,), 0.7, dtype=torch.float64, device=device)
    args = (grad, p, tau_tensor, 1.0) if per_slice_tau else (grad, p, None, 0.7)
    torch.library.opcheck(torch.ops.gradkit.soft_topk_vjp.default, args)


def test_ops_compute_what_the_public_function_computes():
    x = seeded_randn(5, 9, seed=6)
    k = _budgets(5)
    tau = torch.linspace(0.2, 2.0, 5, dtype=torch.float64)
    p = torch.ops.gradkit.soft_topk(x, k, 0.0, tau, 1.0)
    expected = torch.stack([reference_soft_topk(x[i], k[i], float(tau[i])) for i in range(5)])
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)
    grad = seeded_randn(5, 9, seed=7)
    grad_x, grad_k = torch.ops.gradkit.soft_topk_vjp(grad, p, tau, 1.0)
    x_ = x.clone().requires_grad_()
    k_ = k.clone().requires_grad_()
    soft_topk(x_, k_, temperature=tau).backward(grad)
    torch.testing.assert_close(grad_x, x_.grad)
    torch.testing.assert_close(grad_k, k_.grad)


# ---------------------------------------------------------------------------------- compile


def _compare_compiled(fn, *inputs, backend="aot_eager", compiled=None):
    """Values and gradients of ``fn`` compiled (fullgraph) equal eager (``compiled``: ``fn``
    already compiled, to reuse one across calls)."""
    compiled = compiled or torch.compile(fn, fullgraph=True, backend=backend)
    eager_in = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    compiled_in = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    eager_out, compiled_out = fn(*eager_in), compiled(*compiled_in)
    torch.testing.assert_close(compiled_out, eager_out)
    weights = seeded_randn(*eager_out.shape, seed=11, dtype=eager_out.dtype)
    (eager_out * weights).sum().backward()
    (compiled_out * weights).sum().backward()
    for a, b in zip(eager_in, compiled_in, strict=True):
        if a.is_floating_point():
            assert b.grad is not None and torch.count_nonzero(a.grad) > 0
            torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("number k", {"k": 2, "temperature": 0.5}),
        ("number k, small tau", {"k": 3, "temperature": 0.05}),
        ("hard", {"k": 2, "hard": True}),
        ("dim 0", {"k": 1.5, "dim": 0}),
    ],
)
def test_compiled_module_matches_eager(case, kwargs):
    layer = SoftTopK(**kwargs)
    _compare_compiled(layer, seeded_randn(4, 6, seed=20))


@pytest.mark.parametrize("hard", [False, True])
def test_compiled_per_slice_k_and_learnable_temperature(hard):
    def fn(x, k, tau):
        return soft_topk(x, k, temperature=tau, hard=hard)

    x = seeded_randn(4, 6, seed=21)
    k = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    _compare_compiled(fn, x, k, torch.tensor(0.7, dtype=torch.float64))
    _compare_compiled(fn, x, k, torch.linspace(0.3, 1.2, 4, dtype=torch.float64))


@pytest.mark.parametrize("op", [soft_topk, sparse_topk])
@pytest.mark.parametrize("hard", [False, True])
def test_compiled_with_changing_number_k_and_temperature(op, hard):
    # From its second value on, torch.compile passes a number argument as a symbolic float:
    # the argument checks must trace (no math.isfinite on it) and stay in force.
    compiled = torch.compile(
        lambda x, k, t: op(x, k, temperature=t, hard=hard), fullgraph=True, backend="aot_eager"
    )
    x = seeded_randn(4, 10, seed=24)
    for k, tau in ((2, 1.0), (3, 0.5), (4, 2.0), (1, 0.3)):
        torch.testing.assert_close(compiled(x, k, tau), op(x, k, temperature=tau, hard=hard))
    # (fullgraph: Dynamo reports the ValueError the eager call raises as its cause)
    for k, tau, message in ((2, -1.0, "temperature must be finite and > 0"), (11, 1.0, "k must")):
        with pytest.raises(Exception) as error:
            compiled(x, k, tau)
        assert message in str(error.value) + repr(error.value.__cause__)


@pytest.mark.parametrize("op", [soft_topk, sparse_topk])
@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_with_changing_shapes_matches_eager(op, dynamic):
    # New batch sizes and row lengths: recompiled with symbolic sizes (dynamic=None, from the
    # second shape on) or symbolic from the start (dynamic=True).
    def fn(x):
        return op(x, 2, temperature=0.5)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for seed, shape in enumerate([(4, 10), (6, 10), (8, 12), (3, 7)]):
        _compare_compiled(fn, seeded_randn(*shape, seed=40 + seed), compiled=compiled)


def test_compiled_with_inductor_float32():
    layer = SoftTopK(k=3, temperature=0.3)
    _compare_compiled(layer, seeded_randn(8, 16, seed=22, dtype=torch.float32), backend="inductor")


def test_no_graph_breaks():
    def fn(x, k, tau):
        return soft_topk(x, k, temperature=tau) + soft_topk(x, 2, hard=True)

    x = seeded_randn(3, 5, seed=23)
    explanation = torch._dynamo.explain(fn)(x, _budgets(3), torch.tensor(0.5, dtype=torch.float64))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.skipif(not _native.available(), reason=f"fused CPU kernel {_native.status()}")
def test_compiled_model_runs_the_fused_kernel(monkeypatch):
    calls = {"solve": 0, "vjp": 0}

    def counting(name, original):
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            calls[name] += result is not None
            return result

        return wrapped

    monkeypatch.setattr(_native, "solve", counting("solve", _native.solve))
    monkeypatch.setattr(_native, "vjp", counting("vjp", _native.vjp))
    layer = torch.compile(SoftTopK(k=2, temperature=0.5), fullgraph=True, backend="aot_eager")
    x = seeded_randn(4, 6, seed=24).requires_grad_()
    calls.update(solve=0, vjp=0)
    layer(x).pow(2).sum().backward()
    assert calls == {"solve": 1, "vjp": 1}


@pytest.mark.parametrize("name", ["soft_topk", "sparse_topk"])
def test_operator_records_nothing_for_inputs_without_gradient(name, monkeypatch):
    # An exported program run for inference calls the operator with grad mode on: inputs that
    # need no derivative go straight to the kernel, with no autograd.Function built around it.
    soft = importlib.import_module("gradkit.topk.soft_topk")._SoftTopKFunction
    sparse = importlib.import_module("gradkit.topk._sparse_ops")._OpFunction
    function = {"soft_topk": soft, "sparse_topk": sparse}
    built = []
    original = function[name].apply

    def counting(*args):
        built.append(1)
        return original(*args)

    monkeypatch.setattr(function[name], "apply", counting)
    op = getattr(torch.ops.gradkit, name)
    x = seeded_randn(4, 6, seed=31)
    tau = torch.full((4,), 0.5)
    plain = op(x, None, 2.0, tau, 1.0)
    assert built == [] and plain.grad_fn is None
    recorded = op(x.requires_grad_(), None, 2.0, tau, 1.0)
    assert built == [1] and recorded.grad_fn is not None
    torch.testing.assert_close(recorded.detach(), plain)


# ----------------------------------------------------------------------------------- export


def test_export_matches_eager():
    x = seeded_randn(4, 6, seed=30)
    for layer in (
        SoftTopK(k=2, temperature=0.5),
        SoftTopK(k=torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64), hard=True),
        SoftTopK(k=2, temperature=torch.nn.Parameter(torch.tensor(0.4, dtype=torch.float64))),
    ):
        program = torch.export.export(layer, (x,))
        assert "gradkit.soft_topk" in str(program.graph_module.code)
        torch.testing.assert_close(program.module()(x), layer(x))


def test_export_with_a_dynamic_batch():
    layer = SoftTopK(k=3, temperature=0.5, hard=True)
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        layer, (seeded_randn(6, 10, seed=31),), dynamic_shapes=({0: batch},)
    )
    x = seeded_randn(11, 10, seed=32)
    torch.testing.assert_close(program.module()(x), layer(x))


# -------------------------------------------------------------------------------------- jvp


def _problem():
    x = seeded_randn(3, 6, seed=40)
    k = torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)
    tau = torch.tensor([0.4, 0.9, 1.7], dtype=torch.float64)
    tangents = (seeded_randn(3, 6, seed=41), seeded_randn(3, seed=42), seeded_randn(3, seed=43))
    return (x, k, tau), tangents


def _op(x, k, tau):
    return soft_topk(x, k, temperature=tau)


def _finite_difference(fn, primals, tangents, step=1e-6):
    plus = fn(*(p + step * t for p, t in zip(primals, tangents, strict=True)))
    minus = fn(*(p - step * t for p, t in zip(primals, tangents, strict=True)))
    return (plus - minus) / (2 * step)


# Dynamo traces the query "is a torch.func transform active?" from torch 2.13 on (see
# gradkit.topk._ops.functorch_active); compiling over torch.func needs that.
_DYNAMO_FUNC = pytest.mark.skipif(
    torch.__version__ < "2.13", reason="compiling over torch.func transforms needs torch >= 2.13"
)


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=_DYNAMO_FUNC)])
def test_jvp_matches_finite_differences(mode):
    primals, tangents = _problem()
    expected = _finite_difference(_op, primals, tangents)
    assert expected.abs().max() > 0.1  # not a vacuous comparison

    def jvp(*args):
        return torch.func.jvp(_op, args[:3], args[3:])

    if mode == "compiled":
        jvp = torch.compile(jvp, fullgraph=True, backend="aot_eager")
    value, tangent = jvp(*primals, *tangents)
    torch.testing.assert_close(value, _op(*primals))
    torch.testing.assert_close(tangent, expected, atol=1e-8, rtol=1e-6)


def _nested_jvp(fn, primals, tangents, order):
    """The ``order``-th directional derivative of ``fn`` by nested ``torch.func.jvp``."""
    if order == 0:
        return fn(*primals)

    def inner(*args):
        return torch.func.jvp(fn, args, tangents)[1]

    return _nested_jvp(inner, primals, tangents, order - 1)


def _nested_backward(fn, primals, tangents, weights, order):
    """The same derivative contracted with ``weights``, by ``order`` reverse passes through
    the eager Function (its backward is differentiable: exact at any order)."""
    primals = [p.clone().requires_grad_() for p in primals]
    value = (fn(*primals) * weights).sum()
    for step in range(order):
        grads = torch.autograd.grad(value, primals, create_graph=step + 1 < order)
        value = sum((g * t).sum() for g, t in zip(grads, tangents, strict=True))
    return value


@pytest.mark.parametrize("order", [2, 3])
def test_forward_over_forward_derivatives_are_exact(order):
    # jacfwd(jacfwd(f)) used to give a silently zero second derivative.
    primals, tangents = _problem()
    weights = seeded_randn(3, 6, seed=46)
    got = (_nested_jvp(_op, primals, tangents, order) * weights).sum()
    expected = _nested_backward(_op, primals, tangents, weights, order)
    assert expected.abs() > 1e-3
    torch.testing.assert_close(got, expected.detach(), atol=1e-10, rtol=1e-9)
    if order == 2:
        step = 1e-4
        shifted = [
            _op(*(p + s * step * t for p, t in zip(primals, tangents, strict=True)))
            for s in (1, 0, -1)
        ]
        finite = ((shifted[0] - 2 * shifted[1] + shifted[2]) / step**2 * weights).sum()
        torch.testing.assert_close(got, finite, atol=1e-5, rtol=1e-4)


def test_nested_transforms_match_eager():
    x = seeded_randn(4, 6, seed=47)
    weights = seeded_randn(6, seed=48)
    tangent = seeded_randn(4, 6, seed=49)

    def row_loss(row):
        return (soft_topk(row, 2, temperature=0.6) * weights).sum()

    x_eager = x.clone().requires_grad_()
    (soft_topk(x_eager, 2, temperature=0.6) * weights).sum().backward()
    vmap, grad = torch.func.vmap, torch.func.grad
    torch.testing.assert_close(vmap(grad(row_loss))(x), x_eager.grad)
    torch.testing.assert_close(grad(lambda a: vmap(row_loss)(a).sum())(x), x_eager.grad)
    expected = _finite_difference(lambda a: soft_topk(a, 2, temperature=0.6), (x,), (tangent,))
    vmapped_jvp = vmap(
        lambda a, t: torch.func.jvp(lambda r: soft_topk(r, 2, temperature=0.6), (a,), (t,))[1]
    )
    torch.testing.assert_close(vmapped_jvp(x, tangent), expected, atol=1e-8, rtol=1e-6)
    hessian = torch.func.hessian(row_loss)(x[0])
    torch.testing.assert_close(torch.func.jacfwd(torch.func.jacfwd(row_loss))(x[0]), hessian)


@_DYNAMO_FUNC
def test_compiled_vmap_and_grad_match_eager():
    x = seeded_randn(5, 3, 6, seed=44)
    weights = seeded_randn(6, seed=45)

    def loss(row):
        return (soft_topk(row, 2, temperature=0.6) * weights).sum()

    vmapped = torch.compile(
        torch.func.vmap(torch.func.grad(loss)), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(vmapped(x), torch.func.vmap(torch.func.grad(loss))(x))


def test_the_operator_itself_is_differentiable_under_torch_func():
    primals, tangents = _problem()

    def direct(x, k, tau):
        return torch.ops.gradkit.soft_topk(x, k, 0.0, tau, 1.0)

    _, tangent = torch.func.jvp(direct, primals, tangents)
    torch.testing.assert_close(tangent, torch.func.jvp(_op, primals, tangents)[1])
    grad = torch.func.grad(lambda x: direct(x, *primals[1:]).pow(2).sum())(primals[0])
    expected = torch.func.grad(lambda x: _op(x, *primals[1:]).pow(2).sum())(primals[0])
    torch.testing.assert_close(grad, expected)


def test_status_names_every_backend():
    from gradkit.topk import status

    report = status()
    assert set(report) == {"cpu", "cuda", "compile"}
    assert ("fused C kernel" in report["cpu"]) == _native.available()
    assert "gradkit::soft_topk" in report["compile"]
    assert report["cuda"].startswith(_ops.gpu_status())


def test_torch_func_on_masked_and_infinite_entries_matches_eager():
    x = seeded_randn(3, 6, seed=50)
    x[0, :2] = -torch.inf
    x[1, 0] = torch.inf
    weights = seeded_randn(3, 6, seed=51)
    k = torch.tensor([2.0, 3.0, 1.5], dtype=torch.float64)

    def loss(a):
        return (soft_topk(a, k, temperature=0.7) * weights).sum()

    x_eager = x.clone().requires_grad_()
    loss(x_eager).backward()
    grad = torch.func.grad(loss)(x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, x_eager.grad)
    jacobian = torch.func.jacfwd(lambda a: soft_topk(a, k, temperature=0.7))(x)
    torch.testing.assert_close(torch.einsum("ij,ijkl->kl", weights, jacobian), x_eager.grad)


def test_vmap_rules_of_the_operators():
    x = seeded_randn(5, 3, 7, seed=60)
    k = _budgets(3)
    tau = torch.linspace(0.3, 1.5, 3, dtype=torch.float64)

    def solve(rows):
        return torch.ops.gradkit.soft_topk(rows, k, 0.0, tau, 1.0)

    expected = torch.stack([solve(rows) for rows in x])
    torch.testing.assert_close(torch.func.vmap(solve)(x), expected)
    grads = seeded_randn(5, 3, 7, seed=61)

    def vjp(grad):
        return torch.ops.gradkit.soft_topk_vjp(grad, expected[0], tau, 1.0)

    batched = torch.func.vmap(vjp)(grads)
    for i in range(5):
        torch.testing.assert_close(batched[0][i], vjp(grads[i])[0])
        torch.testing.assert_close(batched[1][i], vjp(grads[i])[1])
