"""sparse_topk speed: ``python benchmarks/sparse.py [--quick] [--threads N] [--json FILE]``.

``gradkit bench topk`` times both operators at one ``τ`` in one table; this command
(``gradkit bench sparse``) is the sparse operator's own sweep over several ``τ``, with its
PyTorch-ops-only path.
Forward+backward time of :func:`gradkit.sparse_topk` beside one sigmoid pass (the floor of any
elementwise soft mask), :func:`gradkit.soft_topk`, the PyTorch-ops-only path, and entmax's
``budget_bisect`` (the same projection by 50 bisection steps) when entmax is installed.  Each
cell is the median over repeats of wall time and of CPU time (``process_time``: steadier on a
busy machine).  The measurement functions are library code; :func:`main` is the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import _bench, _io
from . import _native
from .benchmark import (
    DEFAULT_SHAPES,
    QUICK_SHAPES,
    Shape,
    _entmax_budget_bisect,
    _forward_backward,
    _own_forwards,
)

__all__ = ["METHODS", "add_arguments", "format_rows", "main", "measure_sparse", "run"]

#: Method keys, in table order, with display names.
METHODS = {
    "sparse_topk": "gradkit.sparse_topk",
    "sparse_torch": "sparse_topk, PyTorch ops only",
    "sigmoid": "sigmoid pass (fwd+bwd)",
    "soft_topk": "gradkit.soft_topk",
    "budget_bisect": "entmax budget_bisect",
}
TEMPERATURES = (0.01, 1.0)


def _forwards(shape: Shape, tau: float) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The methods as functions of the scores ``x`` (shape ``(batch, n)``)."""
    own = _own_forwards(shape.k, tau)

    def torch_only(x):
        with _native.disabled():
            return own["sparse_topk"](x)

    methods = {
        "sparse_topk": own["sparse_topk"],
        "sparse_torch": torch_only,
        "sigmoid": own["sigmoid"],
        "soft_topk": own["gradkit"],
    }
    bisect = _entmax_budget_bisect()
    if bisect is not None:
        methods["budget_bisect"] = lambda x: bisect(x / tau, budget=shape.k)
    return methods


def _median_times(step: Callable[[], None], repeats: int, budget_s: float) -> tuple[float, float]:
    """Median (wall, CPU) milliseconds of ``step`` over up to ``repeats`` calls in ``budget_s``."""
    step()  # warm-up (builds the kernel, fills caches)
    walls, cpus = [], []
    spent = 0.0
    while len(walls) < repeats and (len(walls) < 3 or spent < budget_s):
        wall, cpu = _bench.timed(step)
        walls.append(wall)
        cpus.append(cpu)
        spent += wall
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)


def measure_sparse(
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    temperatures: Sequence[float] = TEMPERATURES,
    *,
    threads: int | None = None,
    repeats: int = 20,
    budget_s: float = 1.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (shape, τ, method): median wall/CPU ms and the ratios to the sigmoid pass
    and to ``budget_bisect`` (``None`` where a method is missing), by wall and by CPU time."""
    threads = threads or torch.get_num_threads()
    rows = []
    with _bench.torch_threads(threads):
        for shape in shapes:
            x = torch.randn(shape.batch, shape.n, generator=torch.Generator().manual_seed(seed))
            for tau in temperatures:
                rows.extend(_measure_cell(shape, tau, x, repeats, budget_s))
    return rows


def _measure_cell(shape: Shape, tau: float, x, repeats: int, budget_s: float) -> list[dict]:
    times = {
        name: _median_times(_forward_backward(forward, x), repeats, budget_s)
        for name, forward in _forwards(shape, tau).items()
    }
    sigmoid, sigmoid_cpu = times["sigmoid"]
    bisect, bisect_cpu = times.get("budget_bisect", (None, None))
    return [
        {
            "shape": shape.name,
            "batch": shape.batch,
            "n": shape.n,
            "k": shape.k,
            "temperature": tau,
            "method": name,
            "wall_ms": wall,
            "cpu_ms": cpu,
            "vs_sigmoid": wall / sigmoid,
            "vs_sigmoid_cpu": cpu / sigmoid_cpu,
            "bisect_speedup": None if bisect is None else bisect / wall,
            "bisect_speedup_cpu": None if bisect is None else bisect_cpu / cpu,
        }
        for name, (wall, cpu) in times.items()
    ]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`measure_sparse`'s rows."""
    header = (
        f"{'shape':<22} {'τ':>6}  {'method':<30} {'wall ms':>9} {'cpu ms':>9} "
        f"{'×sigmoid':>9} {'bisect/this':>11} {'(cpu)':>6} {'(cpu)':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        speedup, speedup_cpu = (
            ("", "")
            if row["bisect_speedup"] is None
            else (f"{row['bisect_speedup']:.1f}", f"{row['bisect_speedup_cpu']:.1f}")
        )
        lines.append(
            f"{row['shape']:<22} {row['temperature']:>6g}  {METHODS[row['method']]:<30} "
            f"{row['wall_ms']:>9.3f} {row['cpu_ms']:>9.3f} {row['vs_sigmoid']:>9.2f} {speedup:>11} "
            f"{row['vs_sigmoid_cpu']:>6.2f} {speedup_cpu:>6}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``benchmarks/sparse.py``."""
    _bench.add_common_arguments(
        parser,
        unit="cell",
        repeats=(20, 3),
        budget=(1.0, 0.1),
        quick_help="tiny shapes and few repeats (a smoke test)",
    )
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=list(TEMPERATURES),
        help="τ values to measure (default: 0.01 1)",
    )


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write ``results.json`` in a new run folder."""
    quick = bool(args.quick)
    if args.threads is not None:
        _bench.check_positive_int("--threads", args.threads)
    rows = measure_sparse(
        QUICK_SHAPES if quick else DEFAULT_SHAPES,
        args.temperatures,
        threads=args.threads,
        repeats=args.repeats or (3 if quick else 20),
        budget_s=args.budget if args.budget is not None else (0.1 if quick else 1.0),
        seed=args.seed,
    )
    print(format_rows(rows))
    threads = args.threads or torch.get_num_threads()
    report = {
        "environment": {**_bench.environment(threads), "native_kernel": _native.status()},
        "rows": rows,
    }
    run_dir = _io.new_run_dir("bench-sparse", args.out)
    written = [_io.write_json(run_dir / "results.json", report)]
    if args.json:
        written.append(_io.write_json(args.json, report))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/sparse.py`` entry point."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/sparse.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
