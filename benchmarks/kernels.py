"""Two revisions of the fused CPU kernel side by side: ``python benchmarks/kernels.py --base REV``.

Builds ``src/gradkit/topk/_native.c`` as it stands and as it was at git revision ``REV``
(``git show``), both as the kernel cache builds it (its flags, ``-march=native``), in a private
temporary folder, and calls their entry points in alternation in one process, one thread each,
on the same tensors: soft_topk's and sparse_topk's solves (``x = spread·randn``, one budget for
all rows) and vjps, about 2 M elements a call (``--elements``).  Each cell is the least time
over the repeats (the kernel's own speed, what a busy machine disturbs least) and ``new ÷
base``; ``max abs Δ`` is the largest difference between the two kernels' outputs.  This times
the C code alone: no Python, no autograd (``overhead.py`` times those).  Flags: ``--repeats
N``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gradkit
from gradkit import _bench, _io
from gradkit.topk import _kernel_cache, _native

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/gradkit/topk/_native.c"
# (operator, n, k, spread, dtype): the solves timed, then the vjps (on the solves' p)
SOLVES = [
    *(("soft", 16, k, s, "float32") for k, s in [(8, 3), (8, 1), (1, 0.1), (1, 10), (8, 10)]),
    ("soft", 64, 6, 3, "float32"),
    ("soft", 64, 32, 1, "float32"),
    ("soft", 16, 8, 3, "float64"),
    ("soft", 1000, 10, 3, "float32"),
    ("soft", 1000, 100, 3, "float32"),
    *(("sparse", 16, k, s, "float32") for k, s in [(8, 3), (2, 1), (8, 0.1), (1, 0.1), (8, 10)]),
    ("sparse", 16, 8, 0.1, "float64"),
    ("sparse", 32, 4, 3, "float32"),
    ("sparse", 64, 6, 3, "float32"),
    # long rows (their plain loops, not the tiles)
    ("soft", 10_000, 1000, 3, "float32"),
    ("soft", 10_000, 1000, 20, "float32"),
    ("soft", 1000, 2, 10, "float32"),  # (small budgets of wide rows: the top-list start)
    ("soft", 10_000, 2, 10, "float64"),
    ("soft", 1000, 10, 10, "float32"),
    ("soft", 1000, 4, 10, "float32"),
    ("soft", 300, 2, 10, "float32"),
    ("soft", 100_000, 10_000, 10, "float32"),
    ("soft", 100_000, 10_000, 10, "float64"),
    ("sparse", 10_000, 1000, 3, "float32"),
    ("sparse", 100_000, 10, 1, "float32"),
    ("sparse", 10_000, 1, 10, "float32"),  # (the order-statistics window of small budgets)
    ("sparse", 10_000, 2, 10, "float64"),
    *(("sparse", n, k, s, "float32") for n, k, s in [(1000, 1, 3), (1000, 2, 10), (1000, 10, 1)]),
    ("sparse", 1000, 1, 0.3, "float32"),
    ("sparse", 1000, 10, 3, "float32"),
    ("sparse", 1000, 14, 10, "float32"),
    ("sparse", 256, 2, 3, "float32"),
    ("sparse", 1000, 2, 3, "float64"),
]
VJPS = [
    *((op, n, max(1, n // 4), 3.0, "float32") for op in ("soft", "sparse") for n in (8, 16, 64)),
    ("soft", 100_000, 10_000, 3.0, "float32"),
]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _source_at(revision: str, folder: Path) -> Path:
    """The kernel's source at ``revision``, written into ``folder``."""
    try:
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:{SOURCE}"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as error:
        raise ValueError(f"--base {revision!r}: git could not run ({error})") from None
    if shown.returncode != 0:
        raise ValueError(f"--base {revision!r}: no {SOURCE} there ({shown.stderr.strip()})")
    path = folder / "base_native.c"
    path.write_text(shown.stdout)
    return path


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _native._SIGNATURES.items():
        getattr(library, name).restype = restype
        getattr(library, name).argtypes = argtypes
    return library


def _tensors(case: tuple, elements: int) -> dict[str, torch.Tensor]:
    """The case's x, its p (by the installed operator), a cotangent, and output buffers."""
    op, n, k, spread, dtype = case
    generator = torch.Generator().manual_seed(n)
    rows = max(8, elements // n)
    x = torch.randn(rows, n, generator=generator, dtype=torch.float64).mul_(spread)
    x = x.to(_DTYPES[dtype])
    return {
        "x": x,
        "p": getattr(gradkit, f"{op}_topk")(x, k).contiguous(),
        "g": torch.randn(rows, n, generator=generator, dtype=torch.float64).to(x.dtype),
        "out": torch.empty_like(x),
        "aux": torch.empty(rows, dtype=torch.float64),  # (int32 statuses, or one c per row)
    }


def _call(library: ctypes.CDLL, case: tuple, entry: str, t: dict) -> Callable[[], object]:
    """One call of the case's entry point (``solve`` or ``vjp``) on ``t``, into ``t["out"]``."""
    op, n, k, _, dtype = case
    rows, wide = t["x"].shape[0], int(dtype == "float64")
    x, p, g, out, aux = (t[key].data_ptr() for key in ("x", "p", "g", "out", "aux"))
    if entry == "solve" and op == "soft":
        return lambda: library.gradkit_solve(wide, x, out, aux, rows, n, k, None, 1.0, 1)
    if entry == "solve":
        return lambda: library.gradkit_sparse_solve(
            wide, x, out, aux, rows, n, k, None, 1.0, None, 1
        )
    if op == "soft":
        return lambda: library.gradkit_vjp(wide, g, p, out, aux, rows, n, 1.0, 1)
    return lambda: library.gradkit_sparse_vjp(wide, g, p, out, aux, rows, n, 1.0, None, 1)


def _time(
    libraries: dict[str, ctypes.CDLL], case: tuple, entry: str, repeats: int, elements: int
) -> dict:
    """Least time of each kernel's call, in alternation, and their outputs' largest gap."""
    t = _tensors(case, elements)
    calls = {name: _call(library, case, entry, t) for name, library in libraries.items()}
    best = dict.fromkeys(calls, float("inf"))
    outputs = {}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
            outputs[name] = t["out"].double()
    op, n, k, spread, dtype = case
    gap = (outputs["new"] - outputs["base"]).abs().nan_to_num(0.0).max()
    return {
        **dict(op=op, entry=entry, n=n, k=k, spread=spread, dtype=dtype),
        "base_ms": 1e3 * best["base"],
        "new_ms": 1e3 * best["new"],
        "new_over_base": best["new"] / best["base"],
        "max_abs_difference": float(gap),
    }


def measure(base: str, repeats: int, elements: int = 2**21) -> list[dict]:
    """Build both kernels and time every case (``ValueError`` for a ``base`` without the
    kernel's source, :class:`gradkit.topk._kernel_cache.BuildError` if one does not build)."""
    with tempfile.TemporaryDirectory(prefix="gradkit-kernels-") as scratch:  # (0700: private)
        folder = Path(scratch)
        source = _source_at(base, folder)
        libraries = {
            "base": _load(_kernel_cache.build_from(source, folder, "base")),
            "new": _load(_kernel_cache.build_from(ROOT / SOURCE, folder, "new")),
        }
        cases = [(case, "solve") for case in SOLVES] + [(case, "vjp") for case in VJPS]
        return [
            _time(libraries, case, entry, repeats, elements)
            for case, entry in _io.progress(cases, "bench kernels: case")
        ]


def format_rows(rows: list[dict]) -> str:
    header = ["entry", "n", "k", "spread", "dtype", "base ms", "new ms", "new ÷ base", "max abs Δ"]
    cells = [
        [
            *(f"{r['op']} {r['entry']}", str(r["n"]), str(r["k"]), f"{r['spread']:g}", r["dtype"]),
            *(f"{r['base_ms']:.2f}", f"{r['new_ms']:.2f}", f"{r['new_over_base']:.2f}"),
            f"{r['max_abs_difference']:.2g}",
        ]
        for r in rows
    ]
    return _bench.markdown_table(header, cells)


def _base_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="REV", help="git revision to compare")


def main(argv: list[str] | None = None) -> int:
    args = _bench.parse_table_flags(
        argv,
        __doc__.splitlines()[0],
        {
            "--repeats": (15, "timed calls per kernel"),
            "--elements": (2**21, "elements per call (rows of at least 8)"),
        },
        _base_flag,
    )
    try:
        _bench.print_table(
            lambda: measure(args.base, args.repeats, args.elements),
            args.threads,
            f"torch {torch.__version__}, the kernel against {args.base}, least times",
            format_rows,
            args.json,
        )
    except (ValueError, _kernel_cache.BuildError) as error:
        print(f"benchmarks/kernels.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
