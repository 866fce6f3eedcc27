"""Fused Triton kernels for :func:`gradkit.soft_topk` and :func:`gradkit.sparse_topk` (forward
solve and vjp), with launchers.

Optional: needs ``triton`` (``pip install gradkit[gpu]``; CUDA builds of torch ship it).  The
kernels (:mod:`gradkit.topk._gpu_kernels`) solve the same problem as :mod:`gradkit.topk._solve`
with the same safeguarded model-based Newton and the same semantics, on the device, with no
host synchronisation: no ``.item()``, no data-dependent shapes, every per-row decision taken
inside the kernel, so a call can be captured in a CUDA graph.

Interface (used by the registered ops; keep it):

* :func:`available` — ``triton`` imports and can run here (a CUDA device, or Triton's
  interpreter mode).
* :func:`supports` — whether :func:`solve`/:func:`vjp` take this tensor (CUDA tensors when a
  GPU is usable; CPU tensors always run under Triton's interpreter, for tests).
* :func:`solve` ``(x, k, inv_tau) -> p`` and :func:`vjp` ``(grad, p, inv_tau) -> (grad_x,
  grad_k)``; ``k`` and ``inv_tau = 1/τ`` are numbers or per-slice tensors shaped
  ``x.shape[:-1]`` (anything broadcastable to it).  The caller validates ``k ∈ [0, n]`` and
  ``τ > 0``: checking values would need a host read.
* :func:`sparse_solve` ``(x, k, tau) -> p`` and :func:`sparse_vjp` ``(grad, p, tau) ->
  (grad_x, grad_k)``: the same for :func:`gradkit.sparse_topk`, with ``τ`` itself (not its
  inverse), a number or a per-slice tensor.

CPU tensors are run by Triton's interpreter (``TRITON_INTERPRET=1`` semantics, NumPy on the
host), whatever the environment says: the module is loaded a second time with the variable
set, because Triton decides between compiling and interpreting when ``@triton.jit`` runs.
That path exists for tests; it is slow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "MAX_BLOCK",
    "available",
    "max_iterations",
    "reason",
    "solve",
    "solve_constants",
    "sparse_max_iterations",
    "sparse_solve",
    "sparse_solve_constants",
    "sparse_vjp",
    "sparse_vjp_constants",
    "supports",
    "tiling",
    "vjp",
    "vjp_constants",
]

# Largest number of elements of a row one program holds at a time; longer rows are streamed.
MAX_BLOCK = 1024
# Largest tile (rows × block) of one program for short rows.
_TILE = 1024
_ROWS_MAX = 16
# Newton steps before bisection only, and the iteration cap (as _solve's careful phase).
NEWTON_STEPS = 12
# A bracket wider than this (in units of τ) is bisected in the floating-point ordering.
_WIDE_BRACKET = 64.0
# Brackets wider than this many units of τ (small temperatures) are first narrowed by up to
# _SECTIONS multisection passes of _PROBES evaluations each (9⁴ ≈ 6500 times narrower).
_WIDE_START = 16.0
_PROBES = 8
_SECTIONS = 4

# Compiler options: no contraction of a·b + c into one rounding (FMA), so that the compiled
# kernels round as the interpreted ones (and the tests) do.
_OPTIONS = {"enable_fp_fusion": False}

# The oldest Triton the kernels were tested with (torch 2.4's Triton 3.0 cannot interpret
# them): an older one leaves CUDA tensors to the sync-free PyTorch path.
OLDEST_TRITON = (3, 9)

_KERNEL_SOURCE = Path(__file__).with_name("_gpu_kernels.py")
_lock = threading.Lock()
_modules: dict[bool, ModuleType | None] = {}
_reasons: dict[bool, str] = {}


def max_iterations(dtype: torch.dtype) -> int:
    """Iteration cap of the solve in compute dtype ``dtype``: ``NEWTON_STEPS + bits + 2``
    (46 in float32, 78 in float64), after which bisection has exhausted the floats."""
    return NEWTON_STEPS + torch.finfo(dtype).bits + 2


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _load_kernels(interpret: bool) -> ModuleType | None:
    """The kernel module, decorated for compiling (``interpret=False``) or interpreting."""
    with _lock:
        if interpret in _modules:
            return _modules[interpret]
        name = "gradkit.topk._gpu_kernels" + ("_interpreted" if interpret else "")
        module = None
        try:
            import triton

            version = tuple(int(part) for part in triton.__version__.split(".")[:2])
            if version < OLDEST_TRITON:
                raise ImportError(
                    f"triton {triton.__version__} is older than "
                    f"{'.'.join(map(str, OLDEST_TRITON))}, the oldest tested"
                )
            spec = importlib.util.spec_from_file_location(name, _KERNEL_SOURCE)
            module = importlib.util.module_from_spec(spec)
            with _environment("TRITON_INTERPRET", "1" if interpret else "0"):
                spec.loader.exec_module(module)
            sys.modules[name] = module
        except Exception as error:  # ImportError, or a triton too old for these kernels
            _reasons[interpret] = f"triton unusable: {type(error).__name__}: {error}"
            module = None
        _modules[interpret] = module
        return module


def available() -> bool:
    """``triton`` imports and can run: a CUDA device is present, or ``TRITON_INTERPRET=1``."""
    if _load_kernels(interpret=False) is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def reason() -> str | None:
    """Why the kernels cannot run here (``None`` when they can)."""
    if _load_kernels(interpret=False) is None:
        return _reasons.get(False, "triton unusable")
    if not available():
        return "no CUDA device (and TRITON_INTERPRET is not set)"
    return None


def supports(x: Tensor) -> bool:
    """Whether :func:`solve` and :func:`vjp` take ``x``: a floating tensor on a CUDA device
    with triton usable, or on the CPU (run by Triton's interpreter: for tests)."""
    if not (isinstance(x, Tensor) and x.dtype.is_floating_point):
        return False
    if x.device.type == "cpu":
        return _load_kernels(interpret=True) is not None
    return x.device.type == "cuda" and _load_kernels(interpret=False) is not None


def _kernels_for(x: Tensor) -> ModuleType:
    module = _load_kernels(interpret=x.device.type == "cpu")
    if module is None or x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"soft_topk: the Triton kernels cannot run on a {x.device.type} tensor here "
            f"({_reasons.get(x.device.type == 'cpu', 'unsupported device')})"
        )
    return module


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_row(value, batch_shape: torch.Size, dtype: torch.dtype, device) -> tuple[Tensor, int]:
    """``value`` (number or tensor broadcastable to ``batch_shape``) as a flat per-row tensor
    and its stride (0: one value for every row).  No host read."""
    if not isinstance(value, Tensor):
        return torch.full((1,), float(value), dtype=dtype, device=device), 0
    value = value.detach().to(device=device, dtype=dtype)
    if value.numel() == 1:
        return value.reshape(1), 0
    return value.expand(batch_shape).reshape(-1).contiguous(), 1


def tiling(rows: int, n: int) -> tuple[int, int]:
    """``(ROWS, BLOCK)``: rows per program and elements per block (powers of two)."""
    block = min(max(16, 1 << (max(n, 1) - 1).bit_length()), MAX_BLOCK)
    per_program = max(1, min(_ROWS_MAX, _TILE // block, 1 << (max(rows, 1) - 1).bit_length()))
    return per_program, block


def _check(x: Tensor, name: str, op: str = "soft_topk") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: {name} must have at least one dimension, got a 0-d tensor")


@contextlib.contextmanager
def _host_arithmetic(x: Tensor) -> Iterator[None]:
    """Interpreted kernels compute with NumPy: let it follow IEEE quietly (as a GPU does)."""
    if x.device.type != "cpu":
        yield
        return
    import numpy as np

    with np.errstate(all="ignore"):
        yield


def solve(
    x: Tensor,
    k: float | Tensor,
    inv_tau: float | Tensor,
    *,
    block: int | None = None,
    iterations: Tensor | None = None,
) -> Tensor:
    """``p = σ((x − θ)/τ)`` with ``Σ p = k`` along the last dimension, on the device.

    Args:
        x: floating tensor ``(..., n)``; float16/bfloat16 are solved in float32.
        k: budget in ``[0, n]``: a number, or a tensor broadcastable to ``x.shape[:-1]``.
        inv_tau: ``1/τ`` (``> 0``): a number, or a tensor broadcastable to ``x.shape[:-1]``.
        block: elements per block (a power of two ≥ 16; default ``min(n, MAX_BLOCK)`` rounded
            up): rows longer than it are streamed in blocks (a test hook).
        iterations: an int32 tensor with one element per slice that receives how many Newton
            iterations each slice took (a test hook; passes over the row = iterations + 3).

    Returns ``p`` with ``x``'s shape and dtype, with :func:`gradkit.soft_topk`'s semantics:
    ``−inf`` entries get 0 (a budget beyond the finite entries selects them all), ``+inf``
    entries 1 (``k/m`` each when ``m > k`` of them), a slice with a NaN is NaN, exact ties
    ``k/n``, ``k = 0`` zeros and ``k = n`` ones.
    """
    return _launch_solve(
        "_solve_kernel", solve_constants, "soft_topk", x, k, inv_tau, block, iterations
    )


def _launch_solve(
    kernel: str, constants, op: str, x: Tensor, k, scale, block, iterations
) -> Tensor:
    """Run the solve kernel named ``kernel`` (soft or sparse) on the rows of ``x``, with
    ``constants(x.dtype, rows per program, block, count)`` its compile-time parameters,
    ``scale`` its per-row temperature argument (``1/τ`` or ``τ``), ``op`` the operator named
    in errors."""
    _check(x, "x", op)
    n = x.shape[-1]
    if x.numel() == 0:
        return torch.zeros_like(x)
    module = _kernels_for(x)
    dtype = _compute_dtype(x.dtype)
    rows = x.numel() // n
    x_rows = x.contiguous().view(rows, n)
    out = torch.empty_like(x_rows)
    k_rows, k_stride = _per_row(k, x.shape[:-1], dtype, x.device)
    tau_rows, tau_stride = _per_row(scale, x.shape[:-1], dtype, x.device)
    per_program, block = _program_shape(rows, n, block)
    count = iterations is not None
    counter = iterations if count else torch.empty(1, dtype=torch.int32, device=x.device)
    with _host_arithmetic(x):
        getattr(module, kernel)[(triton_cdiv(rows, per_program),)](
            x_rows, out, k_rows, k_stride, tau_rows, tau_stride, counter, rows, n,
            **constants(x.dtype, per_program, block, count), **_OPTIONS,
        )  # fmt: skip
    return out.view(x.shape)


def _program_shape(rows: int, n: int, block: int | None) -> tuple[int, int]:
    """``(rows per program, block)``: :func:`tiling`, or one row per program in blocks of the
    ``block`` a test asks for."""
    return tiling(rows, n) if block is None else (1, block)


def solve_constants(x_dtype: torch.dtype, rows_per_program: int, block: int, count: bool):
    """The compile-time parameters of ``_solve_kernel`` for inputs of dtype ``x_dtype``."""
    dtype = _compute_dtype(x_dtype)
    finfo = torch.finfo(dtype)
    return dict(
        ROWS=rows_per_program, BLOCK=block, CDT=_triton_dtype(dtype),
        IS_F64=dtype == torch.float64, EPS=finfo.eps, LIMIT=finfo.max / 16,
        NEWTON_STEPS=NEWTON_STEPS, MAX_ITERS=max_iterations(dtype), WIDE=_WIDE_BRACKET,
        WIDE_START=_WIDE_START, PROBES=_PROBES, SECTIONS=_SECTIONS, COUNT=count,
    )  # fmt: skip


def vjp_constants(p_dtype: torch.dtype, rows_per_program: int, block: int):
    """The compile-time parameters of ``_vjp_kernel`` for ``p`` of dtype ``p_dtype``."""
    return dict(
        ROWS=rows_per_program, BLOCK=block, CDT=_triton_dtype(_compute_dtype(p_dtype)),
        SATURATE=p_dtype in (torch.float16, torch.bfloat16), OUT_MAX=torch.finfo(p_dtype).max,
    )  # fmt: skip


def vjp(
    grad: Tensor, p: Tensor, inv_tau: float | Tensor, *, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """Vector–Jacobian product of :func:`solve` at its output ``p``, and the gradient in ``k``.

    With ``v = p(1 − p)``, ``S = Σv`` and ``c = Σ g·v / S`` (``0`` where ``S = 0``) per slice:
    ``grad_x = v⊙(g − c)/τ`` and ``grad_k = c``.  Returns ``(grad_x, grad_k)`` in ``p``'s dtype,
    shaped ``p.shape`` and ``p.shape[:-1]``; float16/bfloat16 are computed in float32 and
    saturate at the dtype's largest finite value (NaN stays NaN).  ``inv_tau`` is ``1/τ`` as a
    number or a per-slice tensor.  ``block`` as in :func:`solve`.
    """
    return _launch_vjp("_vjp_kernel", vjp_constants, "soft_topk", grad, p, inv_tau, block)


def _launch_vjp(
    kernel: str, constants, op: str, grad: Tensor, p: Tensor, scale, block
) -> tuple[Tensor, Tensor]:
    """Run the vjp kernel named ``kernel`` (soft or sparse): ``constants(p.dtype, rows per
    program, block)`` its compile-time parameters, ``scale`` its per-row temperature argument,
    ``op`` the operator named in errors."""
    _check(grad, "grad", op)
    _check(p, "p", op)
    if grad.shape != p.shape:
        raise ValueError(
            f"{op}: grad and p must have the same shape, got {tuple(grad.shape)} "
            f"and {tuple(p.shape)}"
        )
    n = p.shape[-1]
    grad_x = torch.empty_like(p, memory_format=torch.contiguous_format)
    grad_k = torch.empty(p.shape[:-1], dtype=p.dtype, device=p.device)
    if p.numel() == 0:
        return grad_x.zero_(), grad_k.zero_()
    module = _kernels_for(p)
    rows = p.numel() // n
    tau_rows, tau_stride = _per_row(scale, p.shape[:-1], _compute_dtype(p.dtype), p.device)
    per_program, block = _program_shape(rows, n, block)
    with _host_arithmetic(p):
        getattr(module, kernel)[(triton_cdiv(rows, per_program),)](
            grad.contiguous().view(rows, n), p.contiguous().view(rows, n),
            grad_x.view(rows, n), grad_k.view(rows), tau_rows, tau_stride, rows, n,
            **constants(p.dtype, per_program, block), **_OPTIONS,
        )  # fmt: skip
    return grad_x, grad_k


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# ------------------------------------------------------------------------------ sparse_topk
# Active-set Newton steps before bisection, for sparse_solve (see _gpu_kernels).
SPARSE_NEWTON_STEPS = 24


def sparse_max_iterations(dtype: torch.dtype) -> int:
    """Pass cap of :func:`sparse_solve` in compute dtype ``dtype``:
    ``SPARSE_NEWTON_STEPS + bits + 2`` (58 in float32, 90 in float64)."""
    return SPARSE_NEWTON_STEPS + torch.finfo(dtype).bits + 2


def sparse_solve_constants(x_dtype: torch.dtype, rows_per_program: int, block: int, count: bool):
    """The compile-time parameters of ``_sparse_solve_kernel`` for inputs of dtype ``x_dtype``."""
    dtype = _compute_dtype(x_dtype)
    finfo = torch.finfo(dtype)
    return dict(
        ROWS=rows_per_program, BLOCK=block, CDT=_triton_dtype(dtype),
        IS_F64=dtype == torch.float64, EPS=finfo.eps, LIMIT=finfo.max / 16,
        NEWTON_STEPS=SPARSE_NEWTON_STEPS, MAX_ITERS=sparse_max_iterations(dtype),
        WIDE=_WIDE_BRACKET, WIDE_START=_WIDE_START, PROBES=_PROBES, SECTIONS=_SECTIONS,
        COUNT=count,
    )  # fmt: skip


def sparse_vjp_constants(p_dtype: torch.dtype, rows_per_program: int, block: int):
    """The compile-time parameters of ``_sparse_vjp_kernel`` for ``p`` of dtype ``p_dtype``."""
    return dict(ROWS=rows_per_program, BLOCK=block, CDT=_triton_dtype(_compute_dtype(p_dtype)))


def sparse_solve(
    x: Tensor,
    k: float | Tensor,
    tau: float | Tensor,
    *,
    block: int | None = None,
    iterations: Tensor | None = None,
) -> Tensor:
    """``p = clip((x − θ)/τ, 0, 1)`` with ``Σ p = k`` along the last dimension, on the device.

    Args:
        x: floating tensor ``(..., n)``; float16/bfloat16 are solved in float32.
        k: budget in ``[0, n]``: a number, or a tensor broadcastable to ``x.shape[:-1]``.
        tau: the temperature ``τ > 0`` (not its inverse): a number, or a tensor broadcastable
            to ``x.shape[:-1]``.  The caller validates ``k`` and ``τ``.
        block, iterations: test hooks, as in :func:`solve` (``iterations`` receives the number
            of active-set passes of each slice).

    Returns ``p`` with ``x``'s shape and dtype and :func:`gradkit.sparse_topk`'s semantics:
    ``−inf`` entries 0, ``+inf`` entries 1 (``k/m`` each when ``m > k`` of them), a slice with
    a NaN is NaN, exact ties ``k/n``, ``k = 0`` zeros, ``k = n`` ones.  θ is the exact solve on
    the final active set.  No host synchronisation.
    """
    return _launch_solve(
        "_sparse_solve_kernel", sparse_solve_constants, "sparse_topk", x, k, tau, block, iterations
    )


def sparse_vjp(
    grad: Tensor, p: Tensor, tau: float | Tensor, *, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """Vector–Jacobian product of :func:`sparse_solve` at its output ``p``: with the free set
    ``F = {0 < p < 1}`` and ``m = mean_F g`` (0 where ``F`` is empty), ``grad_x = 1_F (g − m)/τ``
    (NaN where ``p`` is NaN) and ``grad_k = m``.  ``τ`` a number or per-slice tensor.  Returns
    ``(grad_x, grad_k)`` in ``p``'s dtype (computed in float32 for half dtypes)."""
    return _launch_vjp(
        "_sparse_vjp_kernel", sparse_vjp_constants, "sparse_topk", grad, p, tau, block
    )
