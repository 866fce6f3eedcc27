"""``gradkit::sparse_topk`` and ``gradkit::sparse_topk_vjp`` as ``torch.library`` ops.

``torch.compile(fullgraph=True)`` and ``torch.export`` see each as one node (with a fake
implementation for shapes), and the compiled graph runs the real one, fused kernel included.
The autograd formula is registered on the op's ``Autograd`` key: an autograd ``Function``
with forward, backward (the vjp op; differentiable ops when the graph is kept), jvp and vmap;
under ``torch.func`` transforms (where a ``Function`` cannot be called from an operator, and
a traced one loses its tangents) :func:`composite`, differentiable ops around the op at
detached inputs, so that ``torch.func.jvp``/``grad``/``vmap`` compile with ``fullgraph=True``.

Eager calls do not go through the dispatcher: :func:`gradkit.sparse_topk` calls its own
``Function`` directly (cheaper, and ops cannot be called inside ``torch.func`` transforms),
and the ops only while tracing (:func:`tracing`).  The registration needs torch ≥ 2.4
(``torch.library.register_fake``); on older torch :data:`REGISTERED` is ``False`` and
compile falls back to tracing the ``Function``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _transforms
from ._checks import check_values
from ._sparse import (
    fused_vjp,
    solve_sparse_topk,
    sparse_topk_jvp,
    sparse_topk_vjp,
    temperature_grad,
)
from ._transforms import needs_derivative, nothing_to_record

__all__ = ["REGISTERED", "call_op", "composite", "tracing"]

_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
REGISTERED = hasattr(torch.library, "register_fake") and _below_autograd is not None


def tracing() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` is tracing (then the op is used)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return REGISTERED and (torch.compiler.is_compiling() or exporting())


def _split(value) -> tuple[Tensor | None, float]:
    return (value, 0.0) if isinstance(value, Tensor) else (None, float(value))


def call_op(x: Tensor, k, tau) -> Tensor:
    """``torch.ops.gradkit.sparse_topk`` with ``k`` and ``τ`` numbers or per-slice tensors."""
    k_tensor, k_number = _split(k)
    tau_tensor, tau_number = _split(tau)
    return torch.ops.gradkit.sparse_topk(x, k_tensor, k_number, tau_tensor, tau_number)


def composite(x: Tensor, k, tau) -> Tensor:
    """The operator as differentiable ops around the op at detached inputs, for ``torch.func``
    transforms inside ``torch.compile`` (:func:`gradkit.topk._transforms.composite`, with the
    Jacobian map :func:`~gradkit.topk._sparse.sparse_topk_jvp`: exact to fourth order in
    ``x``, ``k`` and ``τ``, and the map is linear in ``x`` and ``k`` on a free set)."""
    return _transforms.composite(call_op, sparse_topk_jvp, x, k, tau, x.dtype)


def _solve_impl(x, k_tensor, k, tau_tensor, tau):
    k = k_tensor if k_tensor is not None else k
    tau = tau_tensor if tau_tensor is not None else tau
    if not x.is_cuda:  # (reading the values back would synchronise the GPU)
        check_values(k, tau, x.shape[-1], "sparse_topk")
    # (contiguous, as the fake implementation says: x may be a permuted view, dim != -1)
    return solve_sparse_topk(x, k, tau).contiguous()


def _vjp_impl(grad, p, tau_tensor, tau):
    tau = tau_tensor if tau_tensor is not None else tau
    fused = fused_vjp(grad, p, tau)
    grad_x, grad_k = fused if fused is not None else sparse_topk_vjp(grad, p, tau)
    return grad_x.contiguous(), grad_k.contiguous()


class _OpFunction(torch.autograd.Function):
    """The autograd formula of ``gradkit::sparse_topk`` (its ``Autograd`` kernel)."""

    @staticmethod
    def forward(x, k_tensor, k, tau_tensor, tau):
        with _below_autograd():
            return torch.ops.gradkit.sparse_topk(x, k_tensor, k, tau_tensor, tau)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, k_tensor, _, tau_tensor, tau = inputs
        ctx.k_is_tensor = k_tensor is not None
        ctx.tau_is_tensor = tau_tensor is not None
        ctx.tau = tau
        saved = (output, tau_tensor) if ctx.tau_is_tensor else (output,)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        p = saved[0]
        tau_tensor = saved[1] if ctx.tau_is_tensor else None
        tau = tau_tensor if ctx.tau_is_tensor else ctx.tau
        if torch.is_grad_enabled():
            grad_x, grad_k = sparse_topk_vjp(grad, p, tau)
        else:
            grad_x, grad_k = torch.ops.gradkit.sparse_topk_vjp(grad, p, tau_tensor, ctx.tau)
        grad_tau = temperature_grad(grad_x, p) if ctx.tau_is_tensor else None
        return grad_x, (grad_k if ctx.k_is_tensor else None), None, grad_tau, None

    @staticmethod
    def jvp(ctx, x_tangent, k_tangent, _k, tau_tangent, _tau):
        saved = ctx.saved_tensors
        tau = saved[1] if ctx.tau_is_tensor else ctx.tau
        return sparse_topk_jvp(saved[0], tau, x_tangent, k_tangent, tau_tangent)

    @staticmethod
    def vmap(info, in_dims, x, k_tensor, k, tau_tensor, tau):
        def front(value, dim, shape=None):
            if value is None:
                return None
            value = (
                value.movedim(dim, 0)
                if dim is not None
                else value.expand(info.batch_size, *value.shape)
            )
            return value if shape is None else value.expand(shape)

        x = front(x, in_dims[0])
        k_tensor = front(k_tensor, in_dims[1], x.shape[:-1])
        tau_tensor = front(tau_tensor, in_dims[3], x.shape[:-1])
        return torch.ops.gradkit.sparse_topk(x, k_tensor, k, tau_tensor, tau), 0


def _autograd_kernel(x, k_tensor, k, tau_tensor, tau):
    """``gradkit::sparse_topk``'s autograd: the Function, or under ``torch.func`` transforms
    (where a Function cannot be called from an operator) the composite, or for inputs there
    that carry no derivative the solve itself."""
    if torch._C._are_functorch_transforms_active():
        if needs_derivative(x, k_tensor, tau_tensor):
            k_arg = k if k_tensor is None else k_tensor
            return composite(x, k_arg, tau if tau_tensor is None else tau_tensor)
    elif not nothing_to_record(x, k_tensor, tau_tensor):
        return _OpFunction.apply(x, k_tensor, k, tau_tensor, tau)
    with _below_autograd():
        return torch.ops.gradkit.sparse_topk(x, k_tensor, k, tau_tensor, tau)


def _register() -> torch.library.Library:
    # FRAGMENT: other modules (soft_topk's ops) define ops in the same namespace.
    lib = torch.library.Library("gradkit", "FRAGMENT")
    lib.define(
        "sparse_topk(Tensor x, Tensor? k_tensor, float k, Tensor? tau_tensor, float tau) -> Tensor"
    )
    lib.define(
        "sparse_topk_vjp(Tensor grad, Tensor p, Tensor? tau_tensor, float tau) -> (Tensor, Tensor)"
    )
    lib.impl("sparse_topk", _solve_impl, "CompositeExplicitAutograd")
    lib.impl("sparse_topk_vjp", _vjp_impl, "CompositeExplicitAutograd")
    lib.impl("sparse_topk", _autograd_kernel, "Autograd")

    @torch.library.register_fake("gradkit::sparse_topk", lib=lib)
    def _(x, k_tensor, k, tau_tensor, tau):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("gradkit::sparse_topk_vjp", lib=lib)
    def _(grad, p, tau_tensor, tau):
        return torch.empty_like(p, memory_format=torch.contiguous_format), p.new_empty(p.shape[:-1])

    return lib


_LIBRARY = _register() if REGISTERED else None
