"""Exactly sparse differentiable top-k: ``p = clip((x − θ)/τ, 0, 1)`` with ``Σ p = k``.

The math (exact threshold solve, closed-form Jacobian) lives in :mod:`gradkit.topk._sparse`;
the registered ``torch.library`` ops in :mod:`gradkit.topk._sparse_ops`; this module holds the
autograd ``Function``, the argument checking and the public API.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops
from ._checks import check_k, check_temperature, check_values, check_x, normalize_dim
from ._sparse import (
    fused_vjp,
    solve_sparse_topk,
    sparse_topk_jvp,
    sparse_topk_vjp,
    temperature_grad,
)
from .soft_topk import _hard_mask, _save, _saved, _to_dtype_saturating, _TopKModule

__all__ = ["SparseTopK", "sparse_topk"]

_OP = "sparse_topk"


class _SparseTopKFunction(torch.autograd.Function):
    """``p = sparse_topk(x, k, τ)`` along the last dimension; ``k`` and ``τ`` numbers or
    tensors of shape ``x.shape[:-1]``; ``x`` float32 or float64."""

    @staticmethod
    def forward(x: Tensor, k: Tensor | float, tau: Tensor | float) -> Tensor:
        if not x.is_cuda:  # (skipped in sparse_topk under transforms; on CUDA a host read)
            check_values(k, tau, x.shape[-1], _OP)
        return solve_sparse_topk(x, k, tau)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, k, tau = inputs
        _save(ctx, k, tau, output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        p, tau = _saved(ctx)
        grad_x, grad_k = _vjp(ctx, grad_output, p, tau)
        grad_tau = None
        if ctx.tau_is_tensor and ctx.needs_input_grad[2]:
            grad_tau = temperature_grad(grad_x, p)
        if not (ctx.k_is_tensor and ctx.needs_input_grad[1]):
            grad_k = None
        return grad_x, grad_k, grad_tau

    @staticmethod
    def jvp(ctx, x_tangent, k_tangent, tau_tangent) -> Tensor:
        p, tau = _saved(ctx)
        k_tangent = k_tangent if ctx.k_is_tensor else None
        tau_tangent = tau_tangent if ctx.tau_is_tensor else None
        return sparse_topk_jvp(p, tau, x_tangent, k_tangent, tau_tangent)

    @staticmethod
    def vmap(info, in_dims, x: Tensor, k, tau):
        # Slice by slice along the last dimension: the vmapped dimension is one more batch
        # dimension.  Move it to the front and run the op once.
        x_dim, k_dim, tau_dim = in_dims
        x = _batched(x, x_dim, info.batch_size)
        k = _batched(k, k_dim, info.batch_size, x.shape[:-1])
        tau = _batched(tau, tau_dim, info.batch_size, x.shape[:-1])
        return _SparseTopKFunction.apply(x, k, tau), 0


def _vjp(ctx, grad: Tensor, p: Tensor, tau) -> tuple[Tensor, Tensor]:
    """The vjp by the fused kernel when the graph is not kept, else by differentiable ops."""
    if not torch.is_grad_enabled():
        fused = fused_vjp(grad, p, tau)
        if fused is not None:
            return fused
    return sparse_topk_vjp(grad.to(p.dtype), p, tau)


def _batched(value, dim, batch: int, shape=None):
    if not isinstance(value, Tensor):
        return value
    value = value.movedim(dim, 0) if dim is not None else value.expand(batch, *value.shape)
    return value if shape is None else value.expand(shape)


def _apply(x: Tensor, k, tau) -> Tensor:
    """``_SparseTopKFunction.apply`` without torch's per-call argument binding (see
    :func:`gradkit.topk.soft_topk._apply`); the registered op under compile and export."""
    from . import _sparse_ops

    transformed = _ops.functorch_active()
    if _sparse_ops.tracing():
        # Traced torch.func transforms cannot trace the Function (its forward branches on
        # data) and lose the tangents of the op's autograd kernel: differentiable ops around
        # the op at detached inputs instead.
        return (_sparse_ops.composite if transformed else _sparse_ops.call_op)(x, k, tau)
    unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)
    if unwrap_if_dead is None or transformed or torch.compiler.is_compiling():
        return _SparseTopKFunction.apply(x, k, tau)
    k = unwrap_if_dead(k) if isinstance(k, Tensor) else k
    tau = unwrap_if_dead(tau) if isinstance(tau, Tensor) else tau
    return super(torch.autograd.Function, _SparseTopKFunction).apply(unwrap_if_dead(x), k, tau)


class _UpcastNoJvp(torch.autograd.Function):
    """``x.float()`` whose gradient goes back to half precision saturating (no inf); without
    a custom ``jvp``, so that ``torch.compile`` can trace it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.float()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _to_dtype_saturating(grad, ctx.dtype)


class _Upcast(_UpcastNoJvp):
    """:class:`_UpcastNoJvp` with forward-mode AD (eager)."""

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return tangent.float()


def _upcast(x: Tensor) -> Tensor:
    """``x`` in float32 for the solve, its gradient saturating back to ``x``'s dtype."""
    if not torch.compiler.is_compiling():
        return _Upcast.apply(x)
    # Traced: a Function with a custom jvp cannot be; under torch.func transforms (forward
    # mode) a plain cast.
    return x.float() if _ops.functorch_active() else _UpcastNoJvp.apply(x)


def sparse_topk(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    temperature: float | Tensor = 1.0,
    hard: bool = False,
) -> Tensor:
    r"""Exactly sparse differentiable top-k: a 0/1-clipped mask with ``Σ p = k`` per slice.

    For each slice ``x_1..x_n`` along ``dim``::

        p_i = clip((x_i − θ)/τ, 0, 1),      with θ such that  Σ_i p_i = k,

    the Euclidean projection of ``x/τ`` onto ``{0 ≤ p ≤ 1, Σ p = k}``.  Entries below ``θ``
    get exactly 0 (their computation can be skipped), entries above ``θ + τ`` exactly 1, and
    the ones in between (the free set ``F``) a linear ramp.  ``θ`` is exact: the solve ends
    with the closed-form root on the final active set.

    The Jacobian is closed form, ``O(n)`` per slice and itself differentiable::

        ∂p/∂x = (I_F − 1_F 1_Fᵀ/|F|)/τ,   ∂p/∂k = 1_F/|F|,   ∂p_i/∂τ = 1_F (mean_F p − p_i)/τ.

    Example::

        >>> x = torch.tensor([[3.0, 1.0, 2.2, -1.0]], requires_grad=True)
        >>> sparse_topk(x, k=2).detach()              # gaps ≥ τ: the hard mask
        tensor([[1., 0., 1., 0.]])
        >>> p = sparse_topk(x, k=2, temperature=2.0)
        >>> p.detach()
        tensor([[1.0000, 0.2000, 0.8000, 0.0000]])
        >>> (p * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
        >>> x.grad                                      # non-zero on the free set only
        tensor([[ 0.0000, -0.2500,  0.2500,  0.0000]])

    Args:
        x: floating tensor (float16, bfloat16, float32, float64) with at least one dimension.
        k: the budget per slice, a number with ``0 ≤ k ≤ n`` (fractional allowed) or a tensor
            broadcastable to ``x`` with ``dim`` removed; a tensor ``k`` that requires grad gets
            ``∂L/∂k = mean_F g``.
        dim: the dimension along which to select.
        temperature: ``τ > 0`` in the units of ``x``: a number, or a tensor broadcastable to
            ``x`` with ``dim`` removed (a scalar or one per slice) that may require grad.
        hard: if ``True`` the forward value is the exact 0/1 :func:`torch.topk` mask (``k``
            integer-valued) and the gradient is this operator's (straight-through).

    Returns:
        ``p`` with the shape, dtype and device of ``x``.

    Edge cases (as :func:`gradkit.soft_topk`):
        * ``k = 0`` gives zeros, ``k = n`` ones, both with zero gradient.
        * ``−inf`` entries get ``p = 0``; if ``k`` exceeds the number of entries above
          ``−inf``, those all get 1 and the slice sums to that number.
        * ``+inf`` entries get 1 and use up the budget; with ``m > k`` of them each gets
          ``k/m``.  Their own gradient is not meaningful.
        * A NaN in a slice makes that slice (only) NaN, values and gradient.
        * Equal entries get equal ``p``: a slice of ties gives ``k/n`` everywhere.
        * float16/bfloat16 are solved in float32; their gradients saturate at the dtype's
          largest finite value instead of overflowing.
        * On a kink (an entry exactly at ``θ`` or ``θ + τ``) the gradient is the one-sided one
          of the free set found.

    Raises:
        TypeError: ``x`` is not a dense floating tensor, or ``k``/``temperature``/``dim``
            has a bad type.
        ValueError: ``x`` on the meta device, ``k`` outside ``[0, n]`` or not finite,
            ``temperature`` not finite and positive or of a shape that does not broadcast,
            ``dim`` out of range, or a fractional ``k`` with ``hard=True``.
    """
    check_x(x, _OP)
    dim = normalize_dim(dim, x.dim(), _OP)
    last = dim == x.dim() - 1
    x_last = x if last else x.movedim(dim, -1)
    batch_shape = x_last.shape[:-1]
    tau = check_temperature(temperature, batch_shape, _OP)
    k_arg = check_k(k, x_last.shape[-1], batch_shape, x.dtype, hard, _OP)
    compute = x_last if x.dtype in (torch.float32, torch.float64) else _upcast(x_last)
    if isinstance(tau, Tensor):
        tau = tau.to(compute.dtype)
    if isinstance(k_arg, Tensor):
        k_arg = k_arg.to(compute.dtype)
    p = _apply(compute, k_arg, tau)
    p = p if p.dtype == x.dtype else p.to(x.dtype)
    if hard:
        sync_free = _ops.traced(x) or x.device.type != "cpu"  # no host read of k
        mask = _hard_mask(x_last.detach(), k_arg, p.detach(), sync_free)
        p = mask + (p - p.detach())  # straight-through: the mask's value, p's gradient
    return p if last else p.movedim(-1, dim)


class SparseTopK(_TopKModule):
    """Module form of :func:`sparse_topk`: ``SparseTopK(k, dim, temperature, hard)(x)``.

    A tensor ``k`` or ``temperature`` passed as an :class:`~torch.nn.Parameter` is learned.

    Example::

        >>> layer = SparseTopK(k=2, temperature=0.5)
        >>> p = layer(torch.randn(3, 10))
        >>> torch.allclose(p.sum(-1), torch.full((3,), 2.0))   # every row holds k
        True
    """

    _OP = _OP
    _function = staticmethod(sparse_topk)
