"""``soft_topk`` as registered PyTorch operators (``torch.library``), for compile and export.

Two operators in the ``gradkit`` namespace act on the last dimension of ``x``::

    gradkit::soft_topk(Tensor x, Tensor? k_tensor, float k, Tensor? tau_tensor, float tau)
        -> Tensor
    gradkit::soft_topk_vjp(Tensor grad, Tensor p, Tensor? tau_tensor, float tau)
        -> (Tensor, Tensor)

* ``k_tensor`` (shape ``x.shape[:-1]``, floating), when given, holds one budget per slice and
  ``k`` is ignored; otherwise ``k`` is the budget of every slice.
* ``tau_tensor`` (shape ``x.shape[:-1]``, floating), when given, holds one temperature per
  slice and ``tau`` is ignored; otherwise ``tau`` is the temperature of every slice.
* ``soft_topk_vjp`` returns ``(∂L/∂x, ∂L/∂k)`` for the cotangent ``grad`` of ``p`` (same
  shape and dtype as ``p``), ``∂L/∂k`` with shape ``p.shape[:-1]``.

Tensors, not Python numbers, carry per-slice values, so nothing here reads device memory on
the host.  The autograd formula (an ``Autograd``-key kernel) is registered by
:mod:`gradkit.topk.soft_topk`, next to the ``autograd.Function`` it calls.  Eager calls of
:func:`gradkit.soft_topk` do not go through the dispatcher at all (:func:`solve` and
:func:`vjp` are called directly); traced calls (``torch.compile``, ``torch.export``) use
the operators, so a compiled graph holds one node per call and runs these kernels.

Other operator families register in the same namespace with their own
``torch.library.Library("gradkit", "FRAGMENT")``.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import _native
from ._checks import check_values
from ._solve import soft_topk_vjp, solve_soft_topk
from ._solve_nosync import solve_nosync

__all__ = ["LIBRARY", "gpu_status", "solve", "status", "traced", "vjp"]

LIBRARY = torch.library.Library("gradkit", "FRAGMENT")
LIBRARY.define(
    "soft_topk(Tensor x, Tensor? k_tensor, float k, Tensor? tau_tensor, float tau) -> Tensor"
)
LIBRARY.define(
    "soft_topk_vjp(Tensor grad, Tensor p, Tensor? tau_tensor, float tau) -> (Tensor, Tensor)"
)


def traced(x: Tensor) -> bool:
    """Whether this call is being traced (``torch.compile``, ``torch.export``, ``make_fx``):
    then the registered operators must be called, not their Python implementations."""
    return torch.compiler.is_compiling() or _exporting() or isinstance(x, _FakeTensor)


_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

# Dynamo traces the functorch query below in torch 2.13 (tested); torch 2.4's cannot (a graph
# break, so fullgraph fails). There a compiled call assumes no torch.func transform is active:
# compiling over torch.func.jvp of soft_topk/sparse_topk needs torch >= 2.13.
_DYNAMO_READS_FUNCTORCH = torch.__version__ >= "2.13"


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform is active (see :data:`_DYNAMO_READS_FUNCTORCH`)."""
    if not _DYNAMO_READS_FUNCTORCH and torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active()


try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
except ImportError:  # pragma: no cover

    class _FakeTensor:  # nothing is an instance
        pass


# ------------------------------------------------------------------------------ the GPU kernel


def _gpu_module():
    """``gradkit.topk._gpu`` when it and Triton import, else ``None`` (cached)."""
    global _GPU, _GPU_REASON
    if _GPU is False:
        try:
            importlib.import_module("triton")
            module = importlib.import_module("._gpu", __package__)
        except ImportError as error:
            _GPU, _GPU_REASON = None, f"{error}"
        else:
            missing = [name for name in ("solve", "vjp") if not hasattr(module, name)]
            _GPU = None if missing else module
            _GPU_REASON = f"gradkit.topk._gpu lacks {missing}" if missing else None
    return _GPU


_GPU = False  # not tried yet
_GPU_REASON: str | None = None


def gpu_status() -> str:
    """Which path a CUDA tensor takes, and why."""
    if _gpu_module() is not None:
        return "Triton kernel (gradkit.topk._gpu)"
    return f"PyTorch ops without host synchronisation (no Triton kernel: {_GPU_REASON})"


# --------------------------------------------------------------------------- implementations


def _scaled(x: Tensor, tau: Tensor) -> Tensor:
    """``x/τ`` per slice (``τ`` of shape ``x.shape[:-1]``), finite entries capped at
    ``max/16`` as :func:`~gradkit.topk._solve.solve_soft_topk` caps ``1/τ``."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    limit = torch.finfo(dtype).max / 16
    w = x.to(dtype) * torch.reciprocal(tau.to(dtype)).unsqueeze(-1)
    return torch.where(torch.isinf(x), x.to(dtype), w.clamp(-limit, limit))


def solve(x: Tensor, k: Tensor | float, tau: Tensor | float) -> Tensor:
    """The forward value (no autograd): ``k`` and ``tau`` numbers or ``x.shape[:-1]`` tensors.

    Value checks of per-slice ``k``/``tau`` tensors run on CPU only (on a GPU they would be a
    host synchronisation).  CUDA tensors go to the Triton kernel when it is available.
    """
    check_values(k, tau, x.shape[-1], "soft_topk", cpu_only=True)
    # (no grad mode to set: this runs in an autograd.Function's forward or below autograd)
    if x.is_cuda:
        # The Triton kernel, else the same solve in PyTorch ops: neither reads the GPU back.
        gpu = _gpu_module()
        kernel = gpu.solve if gpu is not None and gpu.supports(x) else solve_nosync
        if isinstance(tau, Tensor):
            return kernel(_scaled(x, tau), k, 1.0).to(x.dtype)
        limit = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).max
        return kernel(x, k, min(1.0 / tau, limit / 16))
    if isinstance(tau, Tensor):
        return solve_soft_topk(_scaled(x, tau), k, 1.0).to(x.dtype)
    return solve_soft_topk(x, k, tau)


def vjp(grad: Tensor, p: Tensor, tau: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(∂L/∂x, ∂L/∂k)`` (no graph: a backward without ``create_graph``, or below autograd;
    ``grad`` and ``p`` of one dtype and shape)."""
    if p.is_cuda and _gpu_module() is not None and _GPU.supports(p):
        if isinstance(tau, Tensor):
            grad_x, grad_k = _GPU.vjp(grad, p, 1.0)
            return grad_x * torch.reciprocal(tau).unsqueeze(-1).to(grad_x.dtype), grad_k
        return _GPU.vjp(grad, p, 1.0 / tau)
    return soft_topk_vjp(grad, p, tau)


def _solve_op_impl(x, k_tensor, k, tau_tensor, tau):
    p = solve(x, k if k_tensor is None else k_tensor, tau if tau_tensor is None else tau_tensor)
    # Contiguous, as the fake implementation says: x may be a permuted view (dim != -1), whose
    # layout the PyTorch-ops path keeps.
    return p.contiguous()


def _vjp_op_impl(grad, p, tau_tensor, tau):
    with torch.no_grad():  # (the in-place and fused paths of soft_topk_vjp)
        grad_x, grad_k = vjp(grad, p, tau if tau_tensor is None else tau_tensor)
    return grad_x.contiguous(), grad_k.to(p.dtype).contiguous()


# (torch < 2.4 calls it impl_abstract)
_register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

LIBRARY.impl("soft_topk", _solve_op_impl, "CompositeExplicitAutograd")
LIBRARY.impl("soft_topk_vjp", _vjp_op_impl, "CompositeExplicitAutograd")


@_register_fake("gradkit::soft_topk", lib=LIBRARY)
def _solve_fake(x, k_tensor, k, tau_tensor, tau):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_register_fake("gradkit::soft_topk_vjp", lib=LIBRARY)
def _vjp_fake(grad, p, tau_tensor, tau):
    return torch.empty_like(p, memory_format=torch.contiguous_format), p.new_empty(p.shape[:-1])


def _batched_front(value, dim, batch: int):
    """A vmapped argument with its batch dimension first (``None`` args stay ``None``)."""
    if not isinstance(value, Tensor):
        return value
    return value.movedim(dim, 0) if dim is not None else value.expand(batch, *value.shape)


def _solve_vmap(info, in_dims, x, k_tensor, k, tau_tensor, tau):
    # The op acts slice by slice on the last dimension: a vmapped dimension is one more batch
    # dimension, moved to the front.
    batch = info.batch_size
    x = _batched_front(x, in_dims[0], batch)
    k_tensor = _batched_front(k_tensor, in_dims[1], batch)
    tau_tensor = _batched_front(tau_tensor, in_dims[3], batch)
    return torch.ops.gradkit.soft_topk(x, k_tensor, k, tau_tensor, tau), 0


def _vjp_vmap(info, in_dims, grad, p, tau_tensor, tau):
    batch = info.batch_size
    grad = _batched_front(grad, in_dims[0], batch)
    p = _batched_front(p, in_dims[1], batch)
    tau_tensor = _batched_front(tau_tensor, in_dims[2], batch)
    return torch.ops.gradkit.soft_topk_vjp(grad, p, tau_tensor, tau), (0, 0)


if hasattr(torch.library, "register_vmap"):
    torch.library.register_vmap("gradkit::soft_topk", _solve_vmap, lib=LIBRARY)
    torch.library.register_vmap("gradkit::soft_topk_vjp", _vjp_vmap, lib=LIBRARY)


def status() -> dict[str, str]:
    """Which backend runs ``soft_topk``, and why, for CPU tensors, CUDA tensors and traced
    (``torch.compile``/``torch.export``) calls.

    Example::

        >>> sorted(status())
        ['compile', 'cpu', 'cuda']
    """
    return {
        "cpu": (
            "fused C kernel"
            if _native.available()
            else f"PyTorch ops (fused C kernel {_native.status()})"
        ),
        "cuda": gpu_status() + ("" if torch.cuda.is_available() else " (no CUDA device here)"),
        "compile": (
            "registered ops gradkit::soft_topk and gradkit::soft_topk_vjp (one graph node "
            "each; they run the kernels above)"
        ),
    }
