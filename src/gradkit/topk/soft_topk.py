"""Differentiable top-k: ``p_i = σ((x_i − θ)/τ)`` with the threshold ``θ`` solved so ``Σ p_i = k``.

The math (threshold solve, closed-form Jacobian) lives in :mod:`gradkit.topk._solve`; this
module holds the argument checking, the autograd ``Function`` and the public API.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor, nn

from . import _ops, _transforms
from ._checks import (
    check_k,
    check_temperature,
    check_temperature_type,
    check_x,
    normalize_dim,
)
from ._solve import soft_topk_vjp
from ._transforms import needs_derivative, nothing_to_record

__all__ = ["SoftTopK", "soft_topk"]

_OP = "soft_topk"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _column(tau: Tensor | float) -> Tensor | float:
    """``τ`` shaped to scale a ``(..., n)`` tensor: a number, or a ``(..., 1)`` tensor."""
    return tau.unsqueeze(-1) if isinstance(tau, Tensor) else tau


def _dp_dtau(p: Tensor, tau: Tensor | float) -> Tensor:
    """``∂p_i/∂τ = −(v_i/τ)(z_i − z̄)`` with ``z = (x − θ)/τ = logit p``, ``v = p(1 − p)`` and
    ``z̄ = Σ v z / Σ v`` (θ moves with τ to keep ``Σp = k``).  Differentiable twice: ``z`` is
    read off ``p`` where ``v > 0`` and is 0 (times ``v = 0``) elsewhere, never ``0·∞``."""
    v = (1 - p) * p
    live = v > 0
    z = torch.logit(torch.where(live, p, torch.full_like(p, 0.5)))
    total = v.sum(dim=-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    z_bar = (v * z).sum(dim=-1, keepdim=True) / total
    return -(v / _column(tau)) * (z - z_bar)


def _tangent(p: Tensor, tau, x_tangent, k_tangent, tau_tangent) -> Tensor:
    """``dp`` for the input tangents (any of them ``None``): ``J_x·ẋ + (∂p/∂k)·k̇ + (∂p/∂τ)·τ̇``.

    ``J_x = (diag(v) − v vᵀ/Σv)/τ`` is symmetric, so ``J_x·ẋ`` is the VJP formula; ``∂p/∂k =
    v/Σv``.  Differentiable ops only (forward AD and the traced composite use it).
    """
    v = (1 - p) * p
    total = v.sum(dim=-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    out = torch.zeros_like(p)
    if x_tangent is not None:
        centre = (x_tangent * v).sum(dim=-1, keepdim=True) / total
        out = out + v * (x_tangent - centre) / _column(tau)
    if k_tangent is not None:
        out = out + (v / total) * k_tangent.unsqueeze(-1)
    if tau_tangent is not None:
        out = out + _dp_dtau(p, tau) * tau_tangent.unsqueeze(-1)
    return out


class _SoftTopKFunction(torch.autograd.Function):
    """``p = soft_topk(x, k, τ)`` along the last dimension of ``x``.

    ``k`` and ``τ`` are numbers or tensors of shape ``x.shape[:-1]`` (``τ`` in ``x``'s compute
    dtype).  ``via_op``: reached from the registered operator's autograd kernel (a traced
    call), so the forward and the vjp call the operators; otherwise the Python kernels.  The
    backward is the closed form of :func:`~gradkit.topk._solve.soft_topk_vjp` (itself
    differentiable: double backward) and, for a tensor ``τ``, ``Σ_i g_i ∂p_i/∂τ``.
    """

    @staticmethod
    def forward(x: Tensor, k: Tensor | float, tau: Tensor | float, via_op: bool) -> Tensor:
        if via_op:
            with torch._C._AutoDispatchBelowAutograd():
                return torch.ops.gradkit.soft_topk(x, *_op_args(k, tau))
        return _ops.solve(x, k, tau)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, k, tau, via_op = inputs
        _save(ctx, k, tau, output)
        ctx.via_op = via_op
        ctx.out_dtype = output.dtype

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        p, tau = _saved(ctx)
        if p.dtype not in (torch.float32, torch.float64) or grad_output.dtype != p.dtype:
            compute_dtype = _compute_dtype(p.dtype)
            grad_output, p = grad_output.to(compute_dtype), p.to(compute_dtype)
        if ctx.via_op and not torch.is_grad_enabled():
            grad_x, grad_k = torch.ops.gradkit.soft_topk_vjp(
                grad_output, p, *_op_args(0.0, tau)[2:]
            )
        else:
            grad_x, grad_k = soft_topk_vjp(grad_output, p, tau)
        if grad_x.dtype != ctx.out_dtype:
            grad_x = _to_dtype_saturating(grad_x, ctx.out_dtype)
        if not (ctx.k_is_tensor and ctx.needs_input_grad[1]):
            grad_k = None
        grad_tau = None
        if ctx.tau_is_tensor and ctx.needs_input_grad[2]:
            grad_tau = (grad_output * _dp_dtau(p, tau)).sum(dim=-1)
        return grad_x, grad_k, grad_tau, None

    @staticmethod
    def jvp(ctx, x_tangent, k_tangent, tau_tangent, _) -> Tensor:
        p, tau = _saved(ctx)
        compute_dtype = _compute_dtype(p.dtype)
        p = p.to(compute_dtype)
        if x_tangent is not None:
            x_tangent = x_tangent.to(compute_dtype)
        k_tangent = (
            k_tangent.to(compute_dtype) if ctx.k_is_tensor and k_tangent is not None else None
        )
        tau_tangent = tau_tangent if ctx.tau_is_tensor else None
        tangent = _tangent(p, tau, x_tangent, k_tangent, tau_tangent)
        return _to_dtype_saturating(tangent, ctx.out_dtype)


def _save(ctx, k, tau, output: Tensor) -> None:
    """``setup_context`` of the top-k Functions (soft and sparse): whether ``k`` and ``τ`` are
    tensors, and ``p`` (with a tensor ``τ``) saved for backward and forward mode."""
    ctx.k_is_tensor = isinstance(k, Tensor)
    ctx.tau_is_tensor = isinstance(tau, Tensor)
    ctx.tau = None if ctx.tau_is_tensor else tau
    saved = (output, tau) if ctx.tau_is_tensor else (output,)
    ctx.save_for_backward(*saved)
    ctx.save_for_forward(*saved)


def _saved(ctx) -> tuple[Tensor, Tensor | float]:
    """``(p, τ)`` as :func:`_save` kept them."""
    saved = ctx.saved_tensors
    return saved[0], (saved[1] if ctx.tau_is_tensor else ctx.tau)


def _op_args(k, tau) -> tuple:
    """``(k_tensor, k, tau_tensor, tau)`` for the registered operators' schemas."""
    k_args = (k, 0.0) if isinstance(k, Tensor) else (None, float(k))
    tau_args = (tau, 1.0) if isinstance(tau, Tensor) else (None, float(tau))
    return k_args + tau_args


def _apply(x: Tensor, k: Tensor | float, tau: Tensor | float) -> Tensor:
    """``_SoftTopKFunction.apply(x, k, tau, False)``, minus torch's per-call argument binding.

    ``Function.apply`` re-binds default arguments with ``inspect.signature`` on every call
    (~40 µs: a tenth of the whole op at MoE-routing sizes).  All arguments here are
    positional and required, so this goes straight to what torch calls after that binding
    (eager calls only: under ``torch.func`` transforms :func:`_composite` runs instead).
    """
    unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)
    if unwrap_if_dead is None:
        return _SoftTopKFunction.apply(x, k, tau, False)
    if isinstance(k, Tensor):
        k = unwrap_if_dead(k)
    if isinstance(tau, Tensor):
        tau = unwrap_if_dead(tau)
    return super(torch.autograd.Function, _SoftTopKFunction).apply(unwrap_if_dead(x), k, tau, False)


def _composite(x: Tensor, k, tau) -> Tensor:
    """The operator as differentiable ops around a solve that is not differentiated.

    For calls under ``torch.func`` transforms, eager or traced: an ``autograd.Function``
    with a custom ``jvp`` cannot be traced by ``torch.compile`` inside them, and eagerly its
    ``jvp`` of a ``jvp`` (``jacfwd(jacfwd(f))``) comes out zero.  With ``p₀`` the solve at the
    detached inputs and ``Δ`` the (zero-valued) difference between the inputs and their
    detached copies, ``p(s) = p(x₀ + sΔ)`` follows ``dp/ds = J(p, τ(s))·Δ`` (``J``: the
    Jacobian map of :func:`_tangent`); one classical Runge–Kutta step from ``s = 0`` to ``1``
    has the value ``p₀`` exactly and the exact derivatives of every order up to four in
    ``x``, ``k`` and ``τ`` (its error is ``O(|Δ|⁵)``).
    """
    p = _transforms.composite(_solve_detached, _tangent, x, k, tau, _compute_dtype(x.dtype))
    return _to_dtype_saturating(p, x.dtype)


class _Depth(threading.local):
    solving_detached = 0  # nesting depth of _solve_detached calls in this thread (eager)


_DEPTH = _Depth()


def _solve_detached(x: Tensor, k, tau) -> Tensor:
    """``gradkit::soft_topk`` at inputs that carry no derivative (see :func:`_composite`); the
    depth tells the operator's autograd kernel not to recurse into the composite."""
    if _ops.traced(x):
        return torch.ops.gradkit.soft_topk(x, *_op_args(k, tau))
    _DEPTH.solving_detached += 1
    try:
        return torch.ops.gradkit.soft_topk(x, *_op_args(k, tau))
    finally:
        _DEPTH.solving_detached -= 1


def _autograd_kernel(x, k_tensor, k, tau_tensor, tau):
    """``gradkit::soft_topk``'s autograd: the Function, or under ``torch.func`` transforms
    (where a Function cannot be called from an operator) the composite."""
    k_arg = k if k_tensor is None else k_tensor
    tau_arg = tau if tau_tensor is None else tau_tensor
    if torch._C._are_functorch_transforms_active():
        if not _DEPTH.solving_detached and needs_derivative(x, k_tensor, tau_tensor):
            return _composite(x, k_arg, tau_arg)
    elif not nothing_to_record(x, k_tensor, tau_tensor):
        return _SoftTopKFunction.apply(x, k_arg, tau_arg, True)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.gradkit.soft_topk(x, k_tensor, k, tau_tensor, tau)


_ops.LIBRARY.impl("soft_topk", _autograd_kernel, "Autograd")


def _run(x: Tensor, k, tau, traced: bool) -> Tensor:
    """The operator on the last dimension: eager → the Function; traced or under
    ``torch.func`` transforms → the registered operator, or both → :func:`_composite`."""
    functorch = _ops.functorch_active()
    if traced and functorch:
        # Traced torch.func transforms lose the tangents of an operator's autograd kernel
        # (compiled jvp); differentiable ops around a detached solve trace as they are.
        return _composite(x, k, tau)
    if traced or functorch:
        # (its autograd kernel picks the Function or, under torch.func, the composite)
        return torch.ops.gradkit.soft_topk(x, *_op_args(k, tau))
    return _apply(x, k, tau)


def _to_dtype_saturating(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast a float32 result down to half precision without overflowing to ±inf.

    Gradients scale as 1/τ; in float16 (max 65504) a small τ would otherwise turn a finite
    gradient into inf.  Saturating keeps training finite; NaN (a NaN slice) stays NaN.
    """
    if t.dtype != dtype and dtype in (torch.float16, torch.bfloat16):
        limit = torch.finfo(dtype).max
        t = t.clamp(-limit, limit)
    return t.to(dtype)


def _temperature_arg(temperature, batch_shape: torch.Size, x: Tensor, traced: bool):
    """``τ`` for the operator: a float, or a tensor of shape ``batch_shape`` in ``x``'s compute
    dtype (a learnable or per-slice temperature; its values are checked here on CPU, and by
    the solve).

    A one-element tensor without gradient or tangent becomes a float on CPU in eager mode
    (the fastest path); elsewhere reading it would be a host sync or a graph break.
    """
    temperature = check_temperature_type(temperature, _OP)
    if isinstance(temperature, Tensor) and temperature.numel() == 1:
        temperature = temperature.reshape(())
        if not (traced or temperature.device.type != "cpu" or needs_derivative(temperature)):
            temperature = temperature.item()
    tau = check_temperature(temperature, batch_shape, _OP, cpu_only=True)
    return tau.to(_compute_dtype(x.dtype)) if isinstance(tau, Tensor) else tau


def _hard_mask(x: Tensor, k: Tensor | float, soft: Tensor, sync_free: bool) -> Tensor:
    """The exact 0/1 top-k mask along the last dimension (same set as :func:`torch.topk`).

    ``sync_free`` (traced calls, GPU tensors): per-slice budgets rank all ``n`` entries
    instead of the ``max k`` largest (no host read of ``k``; the integer check is skipped).
    """
    if isinstance(k, Tensor):
        k_detached = k.detach()
        if sync_free:
            k_max = x.shape[-1]
        else:
            if not bool(torch.all(k_detached == torch.round(k_detached))):
                raise ValueError(
                    "soft_topk: hard=True needs an integer-valued k, got a fractional k"
                )
            k_max = int(k_detached.max()) if k_detached.numel() else 0
        _, index = torch.topk(x, k_max, dim=-1, sorted=True)
        rank = torch.arange(k_max, device=x.device)
        chosen = (rank < k_detached.unsqueeze(-1)).to(soft.dtype)
    else:
        _, index = torch.topk(x, int(k), dim=-1, sorted=False)
        chosen = torch.ones(index.shape, dtype=soft.dtype, device=x.device)
    mask = torch.zeros(x.shape, dtype=soft.dtype, device=x.device).scatter(-1, index, chosen)
    # −inf entries are never selected; a slice with a NaN is NaN, as in the soft value.
    mask = torch.where(x == -math.inf, 0.0, mask).to(soft.dtype)
    return torch.where(torch.isnan(soft), soft, mask)


def soft_topk(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    temperature: float | Tensor = 1.0,
    hard: bool = False,
) -> Tensor:
    r"""Differentiable top-k membership: a soft 0/1 mask with exactly ``k`` ones per slice.

    For each slice ``x_1..x_n`` along ``dim``::

        p_i = σ((x_i − θ)/τ),      with θ the unique threshold such that  Σ_i p_i = k,

    where ``σ`` is the logistic sigmoid and ``τ = temperature``.  Entries well above ``θ`` get
    ``p ≈ 1``, entries well below get ``p ≈ 0``; as ``τ → 0`` the result tends to the hard
    top-k mask (for distinct values), and for large ``τ`` every ``p_i`` tends to ``k/n``.

    The Jacobian is closed form, with ``v_i = p_i(1 − p_i)``::

        ∂p_i/∂x_j = (δ_ij v_i − v_i v_j / Σ_l v_l) / τ,        ∂p_i/∂k = v_i / Σ_l v_l,

    so the backward pass costs ``O(n)`` per slice and is itself differentiable.

    ``temperature`` may be a tensor (a scalar, or one per slice) that requires grad: a
    learnable ``τ``, which receives the exact ``∂L/∂τ`` (see Args).

    Example::

        >>> x = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
        >>> p = soft_topk(x, k=2, temperature=0.5)
        >>> p
        tensor([[0.9566, 0.2874, 0.7487, 0.0073]])
        >>> torch.allclose(p.sum(-1), torch.tensor([2.0]))   # the budget, to float precision
        True
        >>> soft_topk(x, k=2, hard=True)               # forward: the torch.topk mask
        tensor([[1., 0., 1., 0.]])

    Args:
        x: floating tensor (float16, bfloat16, float32, float64) with at least one dimension.
        k: the budget per slice: a number with ``0 ≤ k ≤ n`` (``n = x.shape[dim]``; fractional
            budgets allowed), or a tensor broadcastable to ``x`` with ``dim`` removed (one
            budget per slice).  A floating tensor ``k`` that requires grad receives the
            gradient ``Σ_i g_i v_i / Σ v`` (learnable budgets).
        dim: the dimension along which to select.
        temperature: ``τ > 0``, the softness, in the units of ``x``: a number, or a tensor —
            one element, or one value per slice (broadcastable to ``x`` with ``dim``
            removed).  A tensor temperature that requires grad is learnable: it receives
            ``∂L/∂τ = Σ_i g_i ∂p_i/∂τ`` with ``∂p_i/∂τ = −(v_i/τ)(z_i − z̄)``,
            ``z = (x − θ)/τ``, ``z̄ = Σ v z / Σ v`` (θ moves with τ).
        hard: if ``True`` the forward value is the exact 0/1 top-k mask (the set chosen by
            :func:`torch.topk`, ties broken as it breaks them; ``k`` must be integer-valued),
            while the backward is the soft operator's gradient (straight-through).

    Returns:
        ``p`` with the shape, dtype and device of ``x``.

    Edge cases:
        * ``k = 0`` gives zeros and ``k = n`` ones, both with zero gradient.
        * ``−inf`` entries are never selected (``p = 0`` exactly): that is how to mask.  When
          ``k`` exceeds the number of entries above ``−inf``, those all get ``p = 1`` and the
          slice sums to that number, not ``k``.
        * ``+inf`` entries get ``p = 1`` and use up the budget: with ``m`` of them, the finite
          entries share ``k − m``.  If ``m > k`` they tie, each getting ``k/m``.
        * A NaN anywhere in a slice makes that slice (only) NaN.
        * Equal entries get equal ``p``: a slice of ties gives ``k/n`` everywhere.
        * Any scale of ``x/τ`` (1e−6 … 1e30) gives finite values and gradients; saturated
          slices (every ``p`` within rounding of 0 or 1) get a zero gradient.
        * float16/bfloat16 inputs are solved in float32 and returned in their own dtype; their
          gradients (which scale as 1/τ) saturate at the dtype's largest finite value
          instead of overflowing to inf.

    Complexity:
        ``O(n)`` time and memory per slice, forward and backward (which is itself
        differentiable).  The solve stops after a bounded number of passes whatever the data
        (at most 78 in float64, 46 in float32); ``hard=True`` adds a :func:`torch.topk`.

    Backends:
        The same values (to rounding) everywhere: a fused C kernel on CPU, a Triton kernel on
        CUDA where Triton is installed (else PyTorch ops, with no host synchronisation), and,
        under ``torch.compile``/``torch.export``, the registered ops ``gradkit::soft_topk`` and
        ``gradkit::soft_topk_vjp``; :func:`gradkit.topk.status` says which runs (README: speed).

    Raises:
        TypeError: ``x`` is not a dense floating tensor, or ``temperature``/``dim`` has a
            bad type.
        ValueError: ``x`` on the meta device, ``k`` outside ``[0, n]`` or not finite,
            ``temperature`` not finite and positive (tensor values are checked on CPU; on a
            GPU that would be a host synchronisation) or of a shape that does not broadcast,
            ``dim`` out of range, or a fractional ``k`` with ``hard=True``.
    """
    check_x(x, _OP)
    dim = normalize_dim(dim, x.dim(), _OP)
    n = x.shape[dim]
    last = dim == x.dim() - 1
    x_last = x if last else x.movedim(dim, -1)
    batch_shape = x_last.shape[:-1]
    traced = _ops.traced(x)
    tau = _temperature_arg(temperature, batch_shape, x, traced)
    k_arg = check_k(k, n, batch_shape, x.dtype, hard, _OP, cpu_only=True)

    p = _run(x_last, k_arg, tau, traced)
    if hard:
        sync_free = traced or x.device.type != "cpu"
        mask = _hard_mask(x_last.detach(), k_arg, p.detach(), sync_free)
        # Straight-through: value exactly `mask` (p − p is exactly 0), gradient that of p.
        p = mask + (p - p.detach())
    return p if last else p.movedim(-1, dim)


class _TopKModule(nn.Module):
    """The module form shared by :class:`SoftTopK` and ``SparseTopK``: a tensor ``k`` or
    ``temperature`` is a buffer (it moves with ``.to(device)``) unless it is an
    :class:`~torch.nn.Parameter`, which is learned."""

    _OP = _OP
    _function = staticmethod(soft_topk)

    def __init__(
        self,
        k: float | Tensor,
        dim: int = -1,
        temperature: float | Tensor = 1.0,
        hard: bool = False,
    ):
        super().__init__()
        temperature = check_temperature_type(temperature, self._OP)
        for name, value in (("k", k), ("temperature", temperature)):
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)
        self.dim = dim
        self.hard = bool(hard)

    def forward(self, x: Tensor) -> Tensor:
        return self._function(x, self.k, dim=self.dim, temperature=self.temperature, hard=self.hard)

    def extra_repr(self) -> str:
        def show(value):
            return f"tensor{tuple(value.shape)}" if isinstance(value, Tensor) else value

        return (
            f"k={show(self.k)}, dim={self.dim}, temperature={show(self.temperature)}, "
            f"hard={self.hard}"
        )


class SoftTopK(_TopKModule):
    """Module form of :func:`soft_topk`: ``SoftTopK(k, dim, temperature, hard)(x)``.

    Selects a soft top-``k`` along ``dim``: ``p_i = σ((x_i − θ)/τ)`` with ``Σ_i p_i = k``.
    See :func:`soft_topk` for the math, the edge cases and the gradient.  A tensor ``k`` or
    ``temperature`` passed as an :class:`~torch.nn.Parameter` is learned.

    Example::

        >>> layer = SoftTopK(k=2, temperature=0.5)
        >>> p = layer(torch.randn(3, 10))
        >>> torch.allclose(p.sum(-1), torch.full((3,), 2.0))   # every row holds k
        True
    """
