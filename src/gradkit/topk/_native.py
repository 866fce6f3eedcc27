"""Optional fused CPU kernels for :func:`gradkit.soft_topk` and :func:`gradkit.sparse_topk`
(``_native.c``), built on first use.

The PyTorch path (:mod:`gradkit.topk._solve`) is exact and general but pays, per solver pass,
four or five full-size ops and dozens of small per-slice ops.  ``_native.c`` solves one row
at a time while it sits in cache, with the same model-based Newton step: one pass stores
exponentials, then each evaluation is a multiply and a divide per entry.  It is plain C99 (no
Python or PyTorch headers): the first call compiles it with the system C compiler in well
under a second and caches the shared library under ``$GRADKIT_CACHE_DIR`` (default
``~/.cache/gradkit``), keyed by the source, the compiler and the CPU; later processes load
the cached file.  A cache folder or file another user could write is never used, and a
library is loaded only if its digest matches the one recorded when it was built
(:mod:`gradkit.topk._kernel_cache` has the rules).  It is built with ``-fopenmp`` but
linked to no OpenMP library, so that its parallel loop runs on the OpenMP runtime PyTorch
has loaded (a pthreads build is the fallback).

Everything here is an optimisation with a fallback, never a requirement:

* no compiler, a failed, hung (``$GRADKIT_CC_TIMEOUT`` s) or remembered failed build, a
  library that does not load, ``GRADKIT_NATIVE=0``, a non-CPU tensor, a dtype other than
  float32/float64, ``torch.func`` transforms or ``torch.compile`` tracing: the PyTorch path
  runs instead;
* the ``soft_topk`` kernel solves every row itself, ``−inf`` (masked), ``+inf`` and NaN
  entries included (as the PyTorch path: ``0``, ``k/m`` each at most 1, a NaN slice); a row
  comes back with a nonzero status, and is solved by the PyTorch path, only when ``1/τ``
  overflows float64 or memory runs out (status 1) or its bracket collapsed onto a jump of
  ``F`` the dtype cannot resolve (status 3): float32 rows spanning more than 2²⁰ τ or with
  ``|x/τ|`` beyond float32's ``max/16`` are solved in float64, float64 rows spanning more
  than 2⁴⁶ τ or beyond ``max/16`` about their ⌈k⌉-th largest entry.  The ``sparse_topk``
  kernel solves ``−inf``, ``+inf`` and NaN entries too (as the PyTorch path) and leaves rows
  whose ``x/τ`` overflows (status 1) and unconverged rows (status 3) to the caller.

:func:`status` says whether the kernel is in use and, if not, why.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from . import _kernel_cache as cache

__all__ = ["available", "disabled", "plain_tensors", "solve", "status", "vjp"]

_ABI_VERSION = 4
_int64, _double, _pointer, _int = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
#: The kernel's C entry points: name -> (restype, argtypes), declared in one loop at load.
#: The solves return the number of rows they left unsolved (a nonzero status).
_SIGNATURES = {
    # (is_double, x, out, status, rows, n, k, budgets or NULL, 1/τ, threads)
    "gradkit_solve": (
        _int64,
        [_int, _pointer, _pointer, _pointer, _int64, _int64, _double, _pointer, _double, _int],
    ),
    # (is_double, grad, p, grad_x, grad_k, rows, n, 1/τ, threads)
    "gradkit_vjp": (
        _int64,
        [_int, _pointer, _pointer, _pointer, _pointer, _int64, _int64, _double, _int],
    ),
    # sparse_topk: (is_double, x, out, status, rows, n, k, budgets or NULL, τ, τs or NULL,
    # threads)
    "gradkit_sparse_solve": (
        _int64,
        [_int, _pointer, _pointer, _pointer, _int64, _int64, *(_double, _pointer) * 2, _int],
    ),
    # (is_double, grad, p, out, mean, rows, n, τ, τs or NULL, threads)
    "gradkit_sparse_vjp": (
        _int64,
        [_int, _pointer, _pointer, _pointer, _pointer, _int64, _int64, _double, _pointer, _int],
    ),
}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernel is not in use (None while it is, or untried)
_note: str | None = None  # why it is in use but not cached (an untrusted cache folder)
_tried = False  # set only once the outcome is known: later threads wait on `_lock` till then
_switched_off = 0  # nesting depth of `disabled()` blocks


def _reset() -> None:
    """Forget the loaded kernel (tests: the next call finds or builds it again)."""
    global _library, _reason, _note, _tried
    with _lock:
        _library, _reason, _note, _tried = None, None, None, False


def _load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; ``None`` (with a reason) if not.

    A thread that arrives while another builds waits for it, so every call of a process
    takes the same path (identical results across threads).
    """
    global _library, _reason, _note, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library, _reason, _note = _find_library()
            except Exception as error:  # an optimisation must never break the operator
                _library, _reason, _note = None, f"unexpected {type(error).__name__}: {error}", None
            _tried = True
    return _library


def _switched_off_by_environment() -> bool:
    return os.environ.get("GRADKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _find_library() -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """``(library, reason it is not in use, note)``; never raises."""
    if _switched_off_by_environment():
        return None, "disabled by GRADKIT_NATIVE=0", None
    compiler, reason = cache.compiler_command()
    if compiler is None:
        return None, reason, None
    try:
        folder, private, problems = cache.cache_folder()
    except OSError as error:
        return None, f"no private folder to build in: {error}", None
    note = None
    if problems:
        where = "a private temporary folder, not cached" if private else str(folder)
        note = f"built in {where}: " + "; ".join(problems)
    try:
        library, failures = _first_variant(compiler, folder)
    finally:
        if private:
            cache.remove_private(folder)
    if library is None:
        return None, "build or load failed: " + "; ".join(failures), None
    return library, None, note


def _first_variant(compiler: list[str], folder: Path) -> tuple[ctypes.CDLL | None, list[str]]:
    """The first build variant that builds (or is cached) and loads, with the failures."""
    failures = []
    for variant in cache.VARIANTS:
        target = cache.library_path(folder, compiler, variant, _ABI_VERSION)
        try:
            return _built_and_loaded(compiler, variant, target), failures
        except cache.CompilerHang as error:  # the next variant would hang just the same
            for rest in cache.VARIANTS:
                cache.remember_failure(
                    cache.library_path(folder, compiler, rest, _ABI_VERSION), str(error)
                )
            return None, [*failures, f"{variant}: {error}"]
        except (OSError, RuntimeError, AttributeError) as error:
            failures.append(f"{variant}: {error}")
    return None, failures


def _built_and_loaded(compiler: list[str], variant: str, target: Path) -> ctypes.CDLL:
    """Load ``target``, building it first unless a verified copy exists."""
    remembered = cache.read_failure(target)
    if remembered is not None:
        raise RuntimeError(f"{remembered} (remembered in {target}.failed; delete it to retry)")
    if cache.verify(target) is not None:
        try:
            cache.build(compiler, variant, target)
        except cache.BuildError as error:
            if not isinstance(error, cache.CompilerHang):
                cache.remember_failure(target, str(error))
            raise
        problem = cache.verify(target)
        if problem is not None:
            raise RuntimeError(f"the library just built cannot be trusted: {problem}")
    return _open_library(target)


def _open_library(path: Path) -> ctypes.CDLL:
    """``dlopen`` a verified library, check its ABI and declare its entry points."""
    library = ctypes.CDLL(str(path))
    try:
        version_of = library.gradkit_abi_version
    except AttributeError:
        raise RuntimeError(f"{path.name} has no gradkit_abi_version symbol") from None
    version_of.restype = ctypes.c_int
    if version_of() != _ABI_VERSION:
        raise RuntimeError(f"stale library {path.name} (ABI version mismatch)")
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)  # AttributeError: a missing entry point
        function.restype, function.argtypes = restype, argtypes
    return library


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block, use the PyTorch path only (benchmarks and tests compare the two)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def status() -> str:
    """``"in use"``, or why the fused CPU kernel is not (building it first if needed).

    ``"in use (built in …: <why>)"`` when it had to be built outside an untrusted cache.
    """
    if _load() is None:
        return f"not in use: {_reason}"
    return "in use" if _note is None else f"in use ({_note})"


def available() -> bool:
    """Whether the fused CPU kernel is built and enabled."""
    return _load() is not None


# (torch's functorch queries, looked up once: plain_tensors runs on every call)
_FUNCTORCH = getattr(torch._C, "_functorch", None)
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def plain_tensors(*tensors: Tensor) -> bool:
    """Whether in-place and ``out=`` tricks are safe: no ``torch.func`` transform, no batched
    (``is_grads_batched``) or wrapped tensor, no ``torch.compile`` tracing."""
    if _FUNCTORCH is None or _TRANSFORMS_ACTIVE is None:
        return False
    if torch.compiler.is_compiling() or _TRANSFORMS_ACTIVE():
        return False
    for t in tensors:
        if _FUNCTORCH.is_legacy_batchedtensor(t) or _FUNCTORCH.is_functorch_wrapped_tensor(t):
            return False
    return True


def _eligible(*tensors: Tensor) -> bool:
    """Tensors the kernel can take: plain CPU float32/float64 ones, outside transforms (the
    callers make them contiguous: one copy is far cheaper than the PyTorch path)."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or _switched_off:
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype:
            return False
    return plain_tensors(*tensors) and _load() is not None


def _per_row_doubles(value: Tensor | float, rows: int, name: str) -> Tensor | None:
    """Per-row values as a contiguous float64 CPU tensor, or ``None`` for a single number."""
    if not isinstance(value, Tensor):
        return None
    flat = value.detach().to(device="cpu", dtype=torch.float64).reshape(-1).contiguous()
    if flat.numel() != rows:
        raise ValueError(f"{name}: expected {rows} per-row values, got {flat.numel()}")
    return flat


def _row_argument(value: Tensor | float, rows: int, name: str, default: float, keep: list):
    """A number-or-per-row argument as the kernel takes it, ``(number, pointer or None)``:
    ``(value, None)``, or ``(default, pointer)`` to per-row float64 values (kept alive in
    ``keep`` for the call)."""
    per_row = _per_row_doubles(value, rows, name)
    if per_row is None:
        return float(value), None
    keep.append(per_row)
    return default, per_row.data_ptr()


def _call(entry: str, tensors: tuple[Tensor, ...], rows: int, n: int, *arguments) -> int:
    """``entry(is_double, *tensor pointers, rows, n, *arguments, threads)``: the signature
    shared by the kernel's entry points (:data:`_SIGNATURES`); returns what it returns."""
    is_double = int(tensors[0].dtype == torch.float64)
    pointers = [t.data_ptr() for t in tensors]
    threads = torch.get_num_threads()
    return getattr(_library, entry)(is_double, *pointers, rows, n, *arguments, threads)


def _solve_call(entry: str, x: Tensor, value_arguments) -> tuple[Tensor, Tensor, int]:
    """Run a solve entry point on the rows of ``x``; ``value_arguments(rows, keep)`` gives its
    arguments after ``n``.  Returns ``(p, int32 status per row (flat), rows left unsolved)``."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    keep: list[Tensor] = []
    p = torch.empty_like(x)
    row_status = torch.empty(rows, dtype=torch.int32)
    unsolved = _call(entry, (x, p, row_status), rows, n, *value_arguments(rows, keep))
    return p, row_status, unsolved


def _vjp_call(entry: str, grad: Tensor, p: Tensor, value_arguments) -> tuple[Tensor, Tensor]:
    """Run a vjp entry point: ``(grad_x, grad_k)`` for the cotangent ``grad`` of ``p``."""
    grad, p = grad.contiguous(), p.contiguous()  # (an expanded cotangent gets materialised)
    n = p.shape[-1]
    rows = p.numel() // n
    keep: list[Tensor] = []
    out = torch.empty_like(p)
    grad_k = torch.empty(p.shape[:-1], dtype=p.dtype)
    _call(entry, (grad, p, out, grad_k), rows, n, *value_arguments(rows, keep))
    return out, grad_k


def solve(x: Tensor, k: float | Tensor, inv_tau: float) -> tuple[Tensor, Tensor, int] | None:
    """``p = σ((x − θ)/τ)`` with ``Σp = k`` along the last dimension, by the fused kernel.

    ``x`` has shape ``(..., n)``, any entries (``−inf``, ``+inf`` and NaN are solved here, as
    the PyTorch path solves them); ``k`` is a number with ``0 < k < n`` or a tensor of per-row
    budgets in ``[0, n]`` with shape ``x.shape[:-1]``.  Returns ``(p, status, unsolved)``:
    ``status`` is one int32 per row (flat, the rows of ``x`` in order), 0 solved, 1 ``|x/τ|``
    beyond ``max/16`` or out of memory, 3 a bracket collapsed onto a jump of ``F`` (nonzero:
    the caller must solve that row); ``unsolved`` is the number of nonzero statuses (0:
    nothing left to read).  ``None`` when the kernel cannot take ``x`` at all.
    """
    if not _eligible(x):
        return None
    return _solve_call(
        "gradkit_solve",
        x,
        lambda rows, keep: (*_row_argument(k, rows, "k", 0.0, keep), float(inv_tau)),
    )


def vjp(grad: Tensor, p: Tensor, temperature: float) -> tuple[Tensor, Tensor] | None:
    """The closed-form vector–Jacobian product (see :func:`~gradkit.topk._solve.soft_topk_vjp`)
    by the fused kernel: ``(∂L/∂x, ∂L/∂k)``, or ``None`` when the kernel cannot take it."""
    if grad.shape != p.shape or p.numel() == 0 or not _eligible(p, grad):
        return None
    return _vjp_call("gradkit_vjp", grad, p, lambda rows, keep: (1.0 / temperature,))


# ------------------------------------------------------------------ sparse_topk entry points


def sparse_solve(
    x: Tensor, k: float | Tensor, tau: float | Tensor
) -> tuple[Tensor, Tensor, int] | None:
    """``p = clip((x − θ)/τ, 0, 1)`` with ``Σp = k`` along the last dimension, by the kernel.

    ``k`` and ``τ`` are numbers or tensors of shape ``x.shape[:-1]``.  Returns ``(p, status,
    unsolved)``: ``status`` one int32 per row, flat (nonzero: not solved, the caller must solve
    that row), ``unsolved`` their number; or ``None`` when the kernel cannot take ``x`` at all.
    """
    if x.numel() == 0 or not _eligible(x):
        return None
    return _solve_call(
        "gradkit_sparse_solve",
        x,
        lambda rows, keep: (
            *_row_argument(k, rows, "k", 0.0, keep),
            *_row_argument(tau, rows, "tau", 1.0, keep),
        ),
    )


def sparse_vjp(grad: Tensor, p: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor] | None:
    """``(∂L/∂x, ∂L/∂k)`` of ``sparse_topk`` by the kernel (see
    :func:`~gradkit.topk._sparse.sparse_topk_vjp`), or ``None`` when it cannot take them."""
    if grad.shape != p.shape or p.numel() == 0 or not _eligible(p, grad):
        return None
    return _vjp_call(
        "gradkit_sparse_vjp",
        grad,
        p,
        lambda rows, keep: _row_argument(tau, rows, "tau", 1.0, keep),
    )
