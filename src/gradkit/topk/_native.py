"""Optional fused CPU kernels for :func:`gradkit.soft_topk` (``_native.c``), built on first use.

The PyTorch path (:mod:`gradkit.topk._solve`) is exact and general but pays, per solver pass,
four or five full-size ops and dozens of small per-slice ops.  ``_native.c`` solves one row
at a time while it sits in cache, with the same model-based Newton step: one pass stores
exponentials, then each evaluation is a multiply and a divide per entry.  It is plain C99 (no
Python or PyTorch headers): the first call compiles it with the system C compiler in well
under a second and caches the shared library under ``$GRADKIT_CACHE_DIR`` (default
``~/.cache/gradkit``), keyed by the source, the compiler and the CPU; later processes load
the cached file.  It is built with ``-fopenmp`` but linked to no OpenMP library, so that its
parallel loop runs on the OpenMP runtime PyTorch has loaded (a pthreads build is the
fallback).

Everything here is an optimisation with a fallback, never a requirement:

* no compiler, a failed build, ``GRADKIT_NATIVE=0``, a non-CPU tensor, a dtype other than
  float32/float64, ``torch.func`` transforms or ``torch.compile`` tracing: the PyTorch path
  runs instead;
* rows the kernel does not take on (``+inf`` or NaN entries, a bracket collapsed onto a jump
  of ``F``) come back with a nonzero status and are solved by the PyTorch path; ``−inf``
  (masked) entries it handles itself.

:func:`status` says whether the kernel is in use and, if not, why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "disabled", "plain_tensors", "solve", "status", "vjp"]

_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ["-O3", "-fPIC", "-std=c99"]
_ABI_VERSION = 3
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernel is not in use (None while it is, or untried)
_tried = False
_switched_off = 0  # nesting depth of `disabled()` blocks


def _cache_dir() -> Path:
    """``$GRADKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradkit`` or ``~/.cache/gradkit``; a
    per-user temporary directory where that is not writable (read-only homes on clusters)."""
    if os.environ.get("GRADKIT_CACHE_DIR"):
        return Path(os.environ["GRADKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    preferred = Path(base) / "gradkit"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"gradkit-{user}"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a library built for one CPU may not run on another
    (a cache directory shared over NFS), so the CPU is part of the cache key."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    """``$CC`` if set (``None`` if it names no executable), else ``cc`` or ``gcc`` on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


#: Build variants, tried in order.  "openmp": compiled with -fopenmp but linked against no
#: OpenMP library, so its parallel loops run on the OpenMP runtime PyTorch has already loaded
#: (torch's spinning worker threads would otherwise compete with threads of our own for the
#: same cores); it only loads where torch's runtime exports GOMP symbols.  "pthreads": its
#: own threads, anywhere.
_VARIANTS = {"openmp": ["-fopenmp"], "pthreads": ["-pthread", "-fopenmp-simd"]}


def _build(compiler: str, variant: str, target: Path) -> None:
    """Compile ``_native.c`` into ``target`` (atomically: a temp file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects = Path(scratch) / "topk.o"
        output = Path(scratch) / target.name
        error = ""
        for arch in (["-march=native"], []):  # not every compiler knows -march=native
            steps = [
                [
                    compiler,
                    *_FLAGS,
                    *arch,
                    *_VARIANTS[variant],
                    "-c",
                    str(_SOURCE),
                    "-o",
                    str(objects),
                ],
                [compiler, "-shared", str(objects), "-o", str(output), "-lm", "-pthread"],
            ]
            for command in steps:
                result = subprocess.run(command, capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    error = (result.stderr or result.stdout).strip()[-500:]
                    break
            else:
                os.replace(output, target)
                return
        raise RuntimeError(f"{compiler} failed: {error}")


def _load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; ``None`` (with a reason) if not."""
    global _library, _reason, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("GRADKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "disabled by GRADKIT_NATIVE=0"
            return None
        compiler = _compiler()
        if compiler is None:
            _reason = "no C compiler found (install gcc or clang, or point CC at one)"
            return None
        try:
            version = subprocess.run(
                [compiler, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError) as error:
            _reason = f"cannot run the C compiler {compiler}: {error}"
            return None
        failures = []
        library = None
        for variant in _VARIANTS:
            key = hashlib.sha256(
                b"\0".join(
                    part.encode()
                    for part in (
                        _SOURCE.read_text(encoding="utf-8"),
                        " ".join(_FLAGS + _VARIANTS[variant]),
                        compiler,
                        version,
                        _cpu_signature(),
                        sys.platform,
                    )
                )
            ).hexdigest()[:16]
            suffix = ".dylib" if sys.platform == "darwin" else ".so"
            target = _cache_dir() / f"topk_native_{variant}_{key}{suffix}"
            try:
                if not target.exists():
                    _build(compiler, variant, target)
                library = ctypes.CDLL(str(target))
                if library.gradkit_abi_version() != _ABI_VERSION:
                    raise RuntimeError("stale library (ABI version mismatch)")
                break
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                failures.append(f"{variant}: {error}")
                library = None
        if library is None:
            _reason = "build or load failed: " + "; ".join(failures)
            return None
        int64, double, pointer = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
        # (is_double, x, out, status, rows, n, k, budgets or NULL, 1/τ, threads)
        library.gradkit_solve.argtypes = [
            ctypes.c_int,
            pointer,
            pointer,
            pointer,
            int64,
            int64,
            double,
            pointer,
            double,
            ctypes.c_int,
        ]
        library.gradkit_solve.restype = ctypes.c_int
        library.gradkit_vjp.argtypes = [
            ctypes.c_int,
            pointer,
            pointer,
            pointer,
            pointer,
            int64,
            int64,
            double,
            ctypes.c_int,
        ]
        library.gradkit_vjp.restype = ctypes.c_int
        _declare_sparse(library)
        _library = library
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
    """``"in use"``, or why the fused CPU kernel is not (building it first if needed)."""
    return "in use" if _load() is not None else f"not in use: {_reason}"


def available() -> bool:
    """Whether the fused CPU kernel is built and enabled."""
    return _load() is not None


def plain_tensors(*tensors: Tensor) -> bool:
    """Whether in-place and ``out=`` tricks are safe: no ``torch.func`` transform, no batched
    (``is_grads_batched``) or wrapped tensor, no ``torch.compile`` tracing."""
    functorch = getattr(torch._C, "_functorch", None)
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch is None or active is None or active() or torch.compiler.is_compiling():
        return False
    return not any(
        functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t)
        for t in tensors
    )


def _eligible(*tensors: Tensor) -> bool:
    """Tensors the kernel can take: plain CPU float32/float64 ones, outside transforms (the
    callers make them contiguous: one copy is far cheaper than the PyTorch path)."""
    first = tensors[0]
    return (
        first.dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.dtype == first.dtype for t in tensors)
        and not _switched_off
        and plain_tensors(*tensors)
        and _load() is not None
    )


def solve(x: Tensor, k: float | Tensor, inv_tau: float) -> tuple[Tensor, Tensor] | None:
    """``p = σ((x − θ)/τ)`` with ``Σp = k`` along the last dimension, by the fused kernel.

    ``x`` has shape ``(..., n)`` (rows with ``+inf`` or NaN are left to the caller); ``k`` is
    a number with ``0 < k < n`` or a tensor of per-row budgets in ``[0, n]`` with shape
    ``x.shape[:-1]``.  Returns ``(p, status)`` with a per-row int32 ``status`` (nonzero: the
    row was not solved; the caller must solve it), or ``None`` when the kernel cannot take
    ``x`` at all.
    """
    if not _eligible(x):
        return None
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    budgets = None
    if isinstance(k, Tensor):
        budgets = k.detach().to(device="cpu", dtype=torch.float64).reshape(-1).contiguous()
        if budgets.numel() != rows:
            raise ValueError(f"k: expected {rows} per-row budgets, got {budgets.numel()}")
    p = torch.empty_like(x)
    row_status = torch.empty(x.shape[:-1], dtype=torch.int32)
    _library.gradkit_solve(
        int(x.dtype == torch.float64),
        x.data_ptr(),
        p.data_ptr(),
        row_status.data_ptr(),
        rows,
        n,
        0.0 if budgets is not None else float(k),
        budgets.data_ptr() if budgets is not None else None,
        float(inv_tau),
        torch.get_num_threads(),
    )
    return p, row_status


def vjp(grad: Tensor, p: Tensor, temperature: float) -> tuple[Tensor, Tensor] | None:
    """The closed-form vector–Jacobian product (see :func:`~gradkit.topk._solve.soft_topk_vjp`)
    by the fused kernel: ``(∂L/∂x, ∂L/∂k)``, or ``None`` when the kernel cannot take it."""
    if grad.shape != p.shape or not _eligible(p, grad):
        return None
    grad, p = grad.contiguous(), p.contiguous()  # (an expanded cotangent gets materialised)
    n = p.shape[-1]
    rows = p.numel() // n if n else 0
    if rows == 0 or n == 0:
        return None
    out = torch.empty_like(p)
    grad_k = torch.empty(p.shape[:-1], dtype=p.dtype)
    _library.gradkit_vjp(
        int(p.dtype == torch.float64),
        grad.data_ptr(),
        p.data_ptr(),
        out.data_ptr(),
        grad_k.data_ptr(),
        rows,
        n,
        1.0 / temperature,
        torch.get_num_threads(),
    )
    return out, grad_k


# ------------------------------------------------------------------ sparse_topk entry points


def _declare_sparse(library: ctypes.CDLL) -> None:
    """ctypes signatures of the sparse_topk kernels."""
    int64, double, pointer = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    # (is_double, x, out, status, rows, n, k, budgets or NULL, τ, τs or NULL, threads)
    library.gradkit_sparse_solve.argtypes = [
        *(ctypes.c_int, pointer, pointer, pointer, int64, int64),
        *(double, pointer, double, pointer, ctypes.c_int),
    ]
    library.gradkit_sparse_solve.restype = ctypes.c_int
    # (is_double, grad, p, out, mean, rows, n, τ, τs or NULL, threads)
    library.gradkit_sparse_vjp.argtypes = [
        *(ctypes.c_int, pointer, pointer, pointer, pointer, int64, int64),
        *(double, pointer, ctypes.c_int),
    ]
    library.gradkit_sparse_vjp.restype = ctypes.c_int


def _per_row_doubles(value: Tensor | float, rows: int) -> Tensor | None:
    """Per-row values as a contiguous float64 CPU tensor, or ``None`` for a single number."""
    if not isinstance(value, Tensor):
        return None
    flat = value.detach().to(device="cpu", dtype=torch.float64).reshape(-1).contiguous()
    if flat.numel() != rows:
        raise ValueError(f"expected {rows} per-row values, got {flat.numel()}")
    return flat


def sparse_solve(x: Tensor, k: float | Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor] | None:
    """``p = clip((x − θ)/τ, 0, 1)`` with ``Σp = k`` along the last dimension, by the kernel.

    ``k`` and ``τ`` are numbers or tensors of shape ``x.shape[:-1]``.  Returns ``(p, status)``
    (a nonzero per-row status: not solved, the caller must solve that row), or ``None`` when
    the kernel cannot take ``x`` at all.
    """
    if x.numel() == 0 or not _eligible(x) or not hasattr(_library, "gradkit_sparse_solve"):
        return None
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    budgets, taus = _per_row_doubles(k, rows), _per_row_doubles(tau, rows)
    p = torch.empty_like(x)
    row_status = torch.empty(x.shape[:-1], dtype=torch.int32)
    _library.gradkit_sparse_solve(
        int(x.dtype == torch.float64),
        x.data_ptr(),
        p.data_ptr(),
        row_status.data_ptr(),
        rows,
        n,
        0.0 if budgets is not None else float(k),
        budgets.data_ptr() if budgets is not None else None,
        1.0 if taus is not None else float(tau),
        taus.data_ptr() if taus is not None else None,
        torch.get_num_threads(),
    )
    return p, row_status


def sparse_vjp(grad: Tensor, p: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor] | None:
    """``(∂L/∂x, ∂L/∂k)`` of ``sparse_topk`` by the kernel (see
    :func:`~gradkit.topk._sparse.sparse_topk_vjp`), or ``None`` when it cannot take them."""
    if (
        grad.shape != p.shape
        or p.numel() == 0
        or not _eligible(p, grad)
        or not hasattr(_library, "gradkit_sparse_vjp")
    ):
        return None
    grad, p = grad.contiguous(), p.contiguous()
    n = p.shape[-1]
    rows = p.numel() // n
    taus = _per_row_doubles(tau, rows)
    out = torch.empty_like(p)
    grad_k = torch.empty(p.shape[:-1], dtype=p.dtype)
    _library.gradkit_sparse_vjp(
        int(p.dtype == torch.float64),
        grad.data_ptr(),
        p.data_ptr(),
        out.data_ptr(),
        grad_k.data_ptr(),
        rows,
        n,
        1.0 if taus is not None else float(tau),
        taus.data_ptr() if taus is not None else None,
        torch.get_num_threads(),
    )
    return out, grad_k
