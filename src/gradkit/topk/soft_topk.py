"""Differentiable top-k: ``p_i = σ((x_i − θ)/τ)`` with the threshold ``θ`` solved so ``Σ p_i = k``.

The math (threshold solve, closed-form Jacobian) lives in :mod:`gradkit.topk._solve`; this
module holds the argument checking, the autograd ``Function`` and the public API.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from ._solve import soft_topk_vjp, solve_soft_topk

__all__ = ["SoftTopK", "soft_topk"]


class DimError(ValueError, IndexError):
    """Bad ``dim`` argument: a :class:`ValueError`, and an :class:`IndexError` like torch's."""


class _SoftTopKFunction(torch.autograd.Function):
    """``p = soft_topk(x, k)`` along the last dimension of ``x``; ``k`` a float or a tensor.

    ``k`` (when a tensor) has shape ``x.shape[:-1]``.  The backward is the closed form of
    :func:`~gradkit.topk._solve.soft_topk_vjp`, itself differentiable (double backward).
    """

    @staticmethod
    def forward(x: Tensor, k: Tensor | float, temperature: float) -> Tensor:
        if isinstance(k, Tensor):
            _check_k_tensor(k, x.shape[-1])
        return solve_soft_topk(x, k, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, k, temperature = inputs
        ctx.temperature = temperature
        ctx.k_is_tensor = isinstance(k, Tensor)
        ctx.out_dtype = output.dtype
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (p,) = ctx.saved_tensors
        if p.dtype in (torch.float32, torch.float64) and grad_output.dtype == p.dtype:
            # The common case: no casts (each .to costs a dispatch even when it is a no-op).
            grad_x, grad_k = soft_topk_vjp(grad_output, p, ctx.temperature)
        else:
            compute_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            grad_x, grad_k = soft_topk_vjp(
                grad_output.to(compute_dtype), p.to(compute_dtype), ctx.temperature
            )
            grad_x = _to_dtype_saturating(grad_x, p.dtype)
        if not (ctx.k_is_tensor and ctx.needs_input_grad[1]):
            grad_k = None
        return grad_x, grad_k, None

    @staticmethod
    def jvp(ctx, x_tangent: Tensor | None, k_tangent: Tensor | None, _) -> Tensor:
        # The Jacobian in x, (diag(v) − v vᵀ/Σv)/τ, is symmetric: the JVP is the VJP formula.
        (p,) = ctx.saved_tensors
        compute_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        p = p.to(compute_dtype)
        if x_tangent is None:
            x_tangent = torch.zeros_like(p)
        tangent, _ = soft_topk_vjp(x_tangent.to(compute_dtype), p, ctx.temperature)
        if ctx.k_is_tensor and k_tangent is not None:
            v = p - p * p
            total = v.sum(dim=-1, keepdim=True)
            share = v / torch.where(total > 0, total, torch.ones_like(total))
            tangent = tangent + share * k_tangent.to(compute_dtype).unsqueeze(-1)
        return _to_dtype_saturating(tangent, ctx.out_dtype)

    @staticmethod
    def vmap(info, in_dims, x: Tensor, k: Tensor | float, temperature: float):
        # The op acts on the last dimension slice by slice, so a vmapped dimension is just one
        # more batch dimension: move it to the front and run the op once.
        x_dim, k_dim, _ = in_dims
        batch = info.batch_size
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(batch, *x.shape)
        if isinstance(k, Tensor):
            k = k.movedim(k_dim, 0) if k_dim is not None else k.expand(batch, *k.shape)
            k = k.expand(x.shape[:-1])
        return _SoftTopKFunction.apply(x, k, temperature), 0


def _apply(x: Tensor, k: Tensor | float, temperature: float) -> Tensor:
    """``_SoftTopKFunction.apply(x, k, temperature)``, minus torch's per-call argument binding.

    ``Function.apply`` re-binds default arguments with ``inspect.signature`` on every call
    (~40 µs: a tenth of the whole op at MoE-routing sizes).  All three arguments here are
    positional and required, so outside ``torch.func`` transforms and ``torch.compile`` this
    goes straight to what torch calls after that binding; otherwise it takes torch's path.
    """
    unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)
    if (
        unwrap_if_dead is None
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    ):
        return _SoftTopKFunction.apply(x, k, temperature)
    if isinstance(k, Tensor):
        k = unwrap_if_dead(k)
    return super(torch.autograd.Function, _SoftTopKFunction).apply(
        unwrap_if_dead(x), k, temperature
    )


def _to_dtype_saturating(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast a float32 result down to half precision without overflowing to ±inf.

    Gradients scale as 1/τ; in float16 (max 65504) a small τ would otherwise turn a finite
    gradient into inf.  Saturating keeps training finite; NaN (a NaN slice) stays NaN.
    """
    if t.dtype != dtype and dtype in (torch.float16, torch.bfloat16):
        limit = torch.finfo(dtype).max
        t = t.clamp(-limit, limit)
    return t.to(dtype)


def _check_k_tensor(k: Tensor, n: int) -> None:
    if k.numel() == 0:
        return
    k_min, k_max = torch.aminmax(k.detach().to(torch.float64))
    if not (math.isfinite(k_min) and math.isfinite(k_max)):
        raise ValueError(f"soft_topk: k must be finite, got a k tensor containing {k_min}/{k_max}")
    if k_min < 0 or k_max > n:
        raise ValueError(
            f"soft_topk: k must lie in [0, n] = [0, {n}] (n = size of dim), "
            f"got k values in [{float(k_min)}, {float(k_max)}]"
        )


def _check_temperature(temperature) -> float:
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1 or temperature.requires_grad:
            raise TypeError(
                "soft_topk: temperature must be a positive number (a tensor temperature "
                "with requires_grad is not supported)"
            )
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"soft_topk: temperature must be a positive number, got {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"soft_topk: temperature must be finite and > 0, got temperature={temperature!r}"
        )
    return temperature


def _normalize_dim(dim, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"soft_topk: dim must be an int, got {dim!r}")
    if ndim == 0:
        raise DimError("soft_topk: x must have at least one dimension, got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise DimError(
            f"soft_topk: dim={dim} is out of range for a {ndim}-d x "
            f"(allowed: {-ndim} ≤ dim ≤ {ndim - 1})"
        )
    return int(dim) % ndim


def _hard_mask(x: Tensor, k: Tensor | float, soft: Tensor) -> Tensor:
    """The exact 0/1 top-k mask along the last dimension (same set as :func:`torch.topk`)."""
    if isinstance(k, Tensor):
        k_detached = k.detach()
        if not bool(torch.all(k_detached == torch.round(k_detached))):
            raise ValueError("soft_topk: hard=True needs an integer-valued k, got a fractional k")
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
    temperature: float = 1.0,
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
        temperature: ``τ > 0``, the softness, in the units of ``x`` (a Python number; a tensor
            temperature is not differentiated).
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
        ``O(n)`` time and memory per slice.  The forward takes a few passes over the data
        (1–3 solver passes at ``τ = 1``, 3–6 at small ``τ``; each ``w − t``, ``σ``, ``Σp``,
        ``Σp²``): safeguarded Newton steps on an exact two-tail model (cubically convergent)
        from a log-sum-exp start, or, for slices spread over many ``τ``, from order statistics
        (a partial sort of ``⌊k⌋ + 1`` values), converging to the dtype's precision; a
        bracket with float-ordering bisection bounds adversarial inputs to at most 78 passes
        (float64).  The backward is ``O(n)``: a few elementwise passes over ``p``
        (out-of-place, hence twice differentiable, when the graph is kept).
        ``hard=True`` adds a :func:`torch.topk`.

    Speed:
        On CPU, float32/float64 (and half, solved in float32) runs a fused C kernel (built on
        first use with the system C compiler, cached in ``~/.cache/gradkit``; set
        ``GRADKIT_NATIVE=0`` to switch it off) for every slice without ``+inf`` or NaN;
        those slices, GPU tensors, ``torch.func``/``torch.compile`` and double backward use
        PyTorch ops, with the same results to rounding.
        The kernel also solves relative to each slice's maximum (or its order statistics),
        which keeps full precision for scores with a large common offset.

    Raises:
        TypeError: ``x`` is not a floating tensor, or ``temperature``/``dim`` has a bad type.
        ValueError: ``k`` outside ``[0, n]`` or not finite, ``temperature`` not finite and
            positive, ``dim`` out of range, or a fractional ``k`` with ``hard=True``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"soft_topk: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"soft_topk: x must be a floating-point tensor, got dtype {x.dtype}")
    dim = _normalize_dim(dim, x.dim())
    temperature = _check_temperature(temperature)
    n = x.shape[dim]
    last = dim == x.dim() - 1
    x_last = x if last else x.movedim(dim, -1)
    batch_shape = x_last.shape[:-1]

    if isinstance(k, Tensor):
        if k.dtype.is_complex or k.dtype == torch.bool:
            raise TypeError(f"soft_topk: k must be a real number or real tensor, got {k.dtype}")
        try:
            k_arg = k.broadcast_to(batch_shape)
        except RuntimeError as error:
            raise ValueError(
                f"soft_topk: a tensor k must broadcast to x's shape without dim "
                f"{tuple(batch_shape)}, got k of shape {tuple(k.shape)}"
            ) from error
        if not k_arg.dtype.is_floating_point:
            k_arg = k_arg.to(x.dtype if x.dtype == torch.float64 else torch.float32)
    else:
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            raise TypeError(f"soft_topk: k must be a number or a tensor, got {k!r}")
        k_arg = float(k)
        if not math.isfinite(k_arg) or not 0 <= k_arg <= n:
            raise ValueError(f"soft_topk: k must lie in [0, n] = [0, {n}], got k={k!r}")
        if hard and k_arg != round(k_arg):
            raise ValueError(f"soft_topk: hard=True needs an integer k, got k={k!r}")

    p = _apply(x_last, k_arg, temperature)
    if hard:
        mask = _hard_mask(x_last.detach(), k_arg, p.detach())
        # Straight-through: value exactly `mask` (p − p is exactly 0), gradient that of p.
        p = mask + (p - p.detach())
    return p if last else p.movedim(-1, dim)


class SoftTopK(nn.Module):
    """Module form of :func:`soft_topk`: ``SoftTopK(k, dim, temperature, hard)(x)``.

    Selects a soft top-``k`` along ``dim``: ``p_i = σ((x_i − θ)/τ)`` with ``Σ_i p_i = k``.
    See :func:`soft_topk` for the math, the edge cases and the gradient.

    Example::

        >>> layer = SoftTopK(k=2, temperature=0.5)
        >>> p = layer(torch.randn(3, 10))
        >>> torch.allclose(p.sum(-1), torch.full((3,), 2.0))   # every row holds k
        True
    """

    def __init__(
        self, k: float | Tensor, dim: int = -1, temperature: float = 1.0, hard: bool = False
    ):
        super().__init__()
        if isinstance(k, Tensor) and not isinstance(k, nn.Parameter):
            self.register_buffer("k", k)  # moves with .to(device); a Parameter k is learnable
        else:
            self.k = k
        self.dim = dim
        self.temperature = _check_temperature(temperature)
        self.hard = bool(hard)

    def forward(self, x: Tensor) -> Tensor:
        return soft_topk(x, self.k, dim=self.dim, temperature=self.temperature, hard=self.hard)

    def extra_repr(self) -> str:
        k = self.k if not isinstance(self.k, Tensor) else f"tensor{tuple(self.k.shape)}"
        return f"k={k}, dim={self.dim}, temperature={self.temperature}, hard={self.hard}"
