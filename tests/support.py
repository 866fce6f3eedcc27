"""Helpers shared by the test modules (importable because pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path
from types import ModuleType

import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def reference_soft_topk(x: torch.Tensor, k, temperature: float = 1.0) -> torch.Tensor:
    """Independent float64 reference: 200 plain bisection steps on θ, last dimension.

    ``k`` is a number or a tensor of shape ``x.shape[:-1]``.  Finite inputs only.
    """
    x = x.double()
    k = torch.as_tensor(k, dtype=torch.float64).expand(x.shape[:-1]).unsqueeze(-1)
    lo = x.min(dim=-1, keepdim=True).values - 50 * temperature
    hi = x.max(dim=-1, keepdim=True).values + 50 * temperature
    for _ in range(200):
        mid = lo / 2 + hi / 2
        mass = torch.sigmoid((x - mid) / temperature).sum(dim=-1, keepdim=True)
        lo = torch.where(mass > k, mid, lo)
        hi = torch.where(mass > k, hi, mid)
    return torch.sigmoid((x - (lo / 2 + hi / 2)) / temperature)


def reference_soft_topk_centred(x: torch.Tensor, k, temperature: float) -> torch.Tensor:
    """Independent float64 reference for temperatures below the resolution of ``x``: plain
    bisection on ``t`` in ``σ((x − c)/τ − t)``, ``c`` each slice's ⌈k⌉-th largest entry (the
    root lies within a few units of it when ``k`` is fractional: ``k`` must be).

    ``k`` is a number or a tensor of shape ``x.shape[:-1]``.  Finite inputs only.
    """
    x = x.double()
    k = torch.as_tensor(k, dtype=torch.float64).expand(x.shape[:-1]).unsqueeze(-1)
    rank = torch.ceil(k).long().clamp(1, x.shape[-1]) - 1
    center = x.sort(dim=-1, descending=True).values.gather(-1, rank)
    u = (x - center) / temperature
    lo = u.amin(dim=-1, keepdim=True) - 50
    hi = u.amax(dim=-1, keepdim=True) + 50
    for _ in range(2200):  # from ±1e308 to the float64 resolution of the root
        mid = lo / 2 + hi / 2
        mass = torch.sigmoid(u - mid).sum(dim=-1, keepdim=True)
        lo = torch.where(mass > k, mid, lo)
        hi = torch.where(mass > k, hi, mid)
    return torch.sigmoid(u - (lo / 2 + hi / 2))


def cluster_at_the_root(rows: int, n: int, temperature: float, dtype, seed: int):
    """``randn·3`` rows with a tenth of their entries (at least 3) within a few τ of the third
    largest: many free entries, far (in τ) from 0 and from the slice's ends."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, dtype=torch.float64, generator=generator) * 3
    third = x.sort(-1, descending=True).values[:, 2:3]
    m = max(3, n // 10)
    x[:, -m:] = third + 2 * temperature * torch.randn(rows, m, dtype=torch.float64,
                                                       generator=generator)  # fmt: skip
    return x.to(dtype)


def seeded_randn(*shape, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``torch.randn`` from its own generator, so tests do not depend on each other's order."""
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def kernel_counts(library, name: str) -> tuple[int, int]:
    """The fused kernel's test counter ``name`` (``gradkit_soft_tile_counts``,
    ``gradkit_sparse_tile_counts``): its two counts since the last call, which resets them."""
    counts = (ctypes.c_int64 * 2)()
    function = getattr(library, name)
    function.restype = None
    function.argtypes = [ctypes.c_void_p]
    function(counts)
    return counts[0], counts[1]


def gradkit(argv: list[str]) -> int:
    """Run the ``gradkit`` command line in-process; return its exit code."""
    from gradkit.cli import main

    return main(argv)


def parse_flags(module: ModuleType, argv: list[str], prog: str = "gradkit") -> argparse.Namespace:
    """Parse ``argv`` with the flags that ``module.add_arguments`` declares."""
    parser = argparse.ArgumentParser(prog=prog)
    module.add_arguments(parser)
    return parser.parse_args(argv)


def assert_png(path: Path) -> None:
    """``path`` holds a real, non-trivial PNG image."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{Path(path).name} is not a PNG"
    assert len(data) > 5_000, f"{Path(path).name} is suspiciously small ({len(data)} bytes)"


def need_triton_kernels(device: str) -> None:
    """Skip unless the Triton kernels run on ``device`` here (interpreted on CPU tensors)."""
    import pytest

    from gradkit.topk import _gpu

    pytest.importorskip("triton", reason="triton is not installed (pip install gradkit[gpu])")
    if not _gpu.supports(torch.empty(1, device=device)):
        pytest.skip(f"Triton kernels cannot run here: {_gpu.reason()}")


def triton_pointer(dtype: torch.dtype) -> str:
    """Triton's signature type of a pointer to ``dtype``."""
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    return "*" + names.get(dtype, "fp64")


def compile_for_sm90(kernel, runtime: dict, constants: dict):
    """Compile the Triton ``kernel`` to a cubin for an sm_90 GPU (no GPU needed: Triton's
    bundled compiler and ptxas), with the launcher's compile-time parameters ``constants``
    and the signature types ``runtime`` of the other arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gradkit.topk import _gpu

    signature = {**runtime, **dict.fromkeys(constants, "constexpr")}
    names = list(signature)
    if names != kernel.arg_names:
        raise AssertionError(f"signature {names} != the kernel's {kernel.arg_names}")
    folded = {(names.index(name),): value for name, value in constants.items()}
    source = ASTSource(kernel, signature, constexprs=folded)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(_gpu._OPTIONS))
