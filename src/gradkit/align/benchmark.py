"""Time the one-sweep alignment matrix against the naive loop of one backward per loss.

For each case (depth ``L``, width ``w``, batch ``B``, dtype) a random MLP
(:func:`~gradkit.align.networks.make_mlp`, linear, Gaussian init) with iid targets is
measured by

* ``fast``: :func:`gradkit.align.measure.alignment_matrix` — one reverse sweep carrying a
  stack of cotangents, weight gradients never formed (Gram identity);
* ``naive``: :func:`gradkit.align.reference.alignment_matrix_naive` — ``L`` calls of
  ``torch.autograd.grad``, every ``∂ℓ_j/∂φ_i`` flattened, cosines one by one (the baseline);

and, with ``--report``, the full :func:`~gradkit.align.measure.alignment_report` against
:func:`~gradkit.align.reference.alignment_report_naive`. Times are medians of wall time
(``time.perf_counter``) in one process, after one warm-up call; slow methods get fewer
repeats (``clamp(budget / t_first, 1, repeats)``; a warm-up call longer than the budget is
itself the one timing). Before timing,
each case checks that both methods agree (``max |ΔS|``).

Where the speed-up comes from, per pair ``(i, j ≥ i)`` of a width-``w`` layer: any exact
method must form ``∂ℓ_j/∂s_i`` (``B × w``) at ``B·w²`` multiply-adds. The naive loop also
forms the weight gradient ``∂ℓ_j/∂W_i`` (another ``B·w²``) and then streams that ``w²``-float
tensor through memory several times (flatten/concatenate, dot, norm); the sweep instead does
``B·w·min(B, w + 1)`` multiply-adds for the compressed gradient and touches ``O(B·w)`` memory,
with all pairs of a layer in one large matrix product. Its matrix-product work is therefore
``≈ 1.25/2`` of the naive loop's at the large size; the rest of the gain is memory traffic
and per-call overhead, so the measured ratio depends on the machine's memory bandwidth and
load.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _bench, _checks, _io, _runtime
from .measure import alignment_matrix, alignment_report
from .networks import make_mlp
from .reference import alignment_matrix_naive, alignment_report_naive
from .targets import make_targets

__all__ = [
    "DEFAULT_CASES",
    "QUICK_CASES",
    "Case",
    "add_arguments",
    "format_table",
    "main",
    "plot_times",
    "run",
    "run_benchmark",
    "times_figure",
]


@dataclass(frozen=True)
class Case:
    """One benchmark setting: depth ``L``, width ``w``, batch ``B``, dtype name."""

    depth: int
    width: int
    batch: int
    dtype: str = "float64"

    @property
    def name(self) -> str:
        return f"L={self.depth} w={self.width} B={self.batch} {self.dtype}"


DEFAULT_CASES = tuple(
    Case(depth, width, batch, dtype)
    for depth, width, batch in ((20, 100, 50), (100, 512, 128))
    for dtype in ("float64", "float32")
)
QUICK_CASES = (Case(6, 16, 8, "float64"), Case(20, 100, 50, "float64"))

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_CPU = torch.device("cpu")


def _synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a wait for the GPU, so wall time covers the work (no-op on CPU)."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def _time(fn: Callable[[], Any], first: float, repeats: int, budget_s: float) -> tuple[float, int]:
    """Median wall time of ``fn`` over ``clamp(budget/first, 1, repeats)`` calls.

    A method whose first (warm-up) call already took the whole budget is not called again:
    that call is its single timing (the large naive loop takes minutes).
    """
    if first >= budget_s:
        return first, 1
    count = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), count


def _inputs(case: Case, seed: int, device: torch.device):
    """The case's network, inputs and targets: drawn on the CPU, then moved to ``device``."""
    dtype = _DTYPES[case.dtype]
    net = make_mlp(case.depth, case.width, "linear", seed=seed, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.batch, case.width, generator=generator, dtype=torch.float64).to(dtype)
    targets = make_targets(net, x, "iid", seed=seed + 2)
    return net.to(device), x.to(device), [t.to(device) for t in targets]


def _measure_case(
    case: Case,
    *,
    repeats: int,
    budget_s: float,
    seed: int,
    report: bool,
    device: torch.device = _CPU,
) -> list[dict[str, Any]]:
    net, x, targets = _inputs(case, seed, device)
    pairs = [("matrix", alignment_matrix, alignment_matrix_naive)]
    if report:
        pairs.append(("report", alignment_report, alignment_report_naive))
    rows = []
    for what, fast_fn, naive_fn in pairs:
        fast = _synchronized(lambda f=fast_fn: f(net, x, targets), device)
        naive = _synchronized(lambda f=naive_fn: f(net, x, targets), device)
        # Warm-up calls, also the agreement check and the first-call times that set repeats.
        start = time.perf_counter()
        out_fast = fast()
        first_fast = time.perf_counter() - start
        start = time.perf_counter()
        out_naive = naive()
        first_naive = time.perf_counter() - start
        s_fast = out_fast if what == "matrix" else out_fast["matrix"]
        s_naive = out_naive if what == "matrix" else out_naive["matrix"]
        max_diff = (s_fast - s_naive).nan_to_num(0).abs().max().item()
        t_fast, n_fast = _time(fast, first_fast, repeats, budget_s)
        t_naive, n_naive = _time(naive, first_naive, repeats, budget_s)
        rows.append(
            {
                **asdict(case),
                "case": case.name,
                "what": what,
                "fast_ms": 1e3 * t_fast,
                "naive_ms": 1e3 * t_naive,
                "speedup": t_naive / t_fast,
                "fast_repeats": n_fast,
                "naive_repeats": n_naive,
                "max_abs_diff": max_diff,
            }
        )
    return rows


def run_benchmark(
    cases: Sequence[Case] = DEFAULT_CASES,
    *,
    threads: int | None = None,
    repeats: int = 5,
    budget_s: float = 20.0,
    seed: int = 0,
    report: bool = False,
    show_progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Measure every case; return ``{config, environment, results}``.

    ``torch``'s thread count is set to ``threads`` (default: ``--threads auto``, see
    :mod:`gradkit._runtime`) during the measurement and restored afterwards. ``device`` is
    ``cpu``, ``cuda`` or ``auto``; GPU times wait for the GPU to finish.
    """
    threads = _bench.check_positive_int("threads", _runtime.resolve_threads(threads))
    device = _runtime.resolve_device(device)
    _bench.check_positive_int("repeats", repeats)
    if not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise ValueError(f"budget must be a number of seconds > 0, got {budget_s!r}")
    for case in cases:
        _checks.choice("dtype", tuple(_DTYPES))(case.dtype)
    with _bench.torch_threads(threads):
        items = _io.progress(cases, "bench align") if show_progress else cases
        results = [
            row
            for case in items
            for row in _measure_case(
                case, repeats=repeats, budget_s=budget_s, seed=seed, report=report, device=device
            )
        ]
    return {
        "config": {
            "cases": [asdict(case) for case in cases],
            "threads": threads,
            "repeats": repeats,
            "budget_s": budget_s,
            "seed": seed,
            "report": report,
            "device": str(device),
            "network": "make_mlp(depth, width, 'linear', init='gaussian'), iid targets",
        },
        "environment": _runtime.environment(device),
        "results": results,
    }


def format_table(result: dict[str, Any]) -> str:
    """The results as a markdown table."""
    lines = [
        "| what | L | width | batch | dtype | fast (ms) | naive (ms) | speedup | max abs ΔS |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for row in result["results"]:
        lines.append(
            f"| {row['what']} | {row['depth']} | {row['width']} | {row['batch']} | "
            f"{row['dtype']} | {row['fast_ms']:.1f} | {row['naive_ms']:.1f} | "
            f"{row['speedup']:.1f}× | {row['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def plot_times(result: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of fast and naive times per case (log scale), speed-up written on top."""
    return _io.save_figure(times_figure(result), path, dpi=120)


def times_figure(result: dict[str, Any]):
    """The figure of :func:`plot_times` (not saved)."""
    plt = _io.pyplot()
    rows = result["results"]
    labels = [f"{r['what']}\n{r['case']}".replace(" float", "\nfloat") for r in rows]
    positions = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(rows)), 4.5))
    width = 0.38
    ax.bar(
        [p - width / 2 for p in positions],
        [r["naive_ms"] for r in rows],
        width,
        label="naive loop (one backward per loss)",
        color="tab:gray",
    )
    ax.bar(
        [p + width / 2 for p in positions],
        [r["fast_ms"] for r in rows],
        width,
        label="one reverse sweep",
        color="tab:blue",
    )
    for p, r in zip(positions, rows, strict=True):
        ax.text(p, r["naive_ms"] * 1.15, f"{r['speedup']:.1f}×", ha="center", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("wall time per call (ms, log)")
    ax.set_xticks(list(positions), labels, fontsize=8)
    threads = result["config"]["threads"]
    where = result["config"].get("device", "cpu")
    ax.set_title(
        f"alignment matrix: fast vs naive ({where}, {threads} thread{'s' * (threads != 1)})"
    )
    ax.legend(fontsize=8, loc="upper left")
    _bench_log_axis(ax, [r[k] for r in rows for k in ("fast_ms", "naive_ms")])
    fig.tight_layout()
    return fig


def _bench_log_axis(ax, values: list[float]) -> None:
    """Room above the tallest bar for its label and the legend; plain-number log ticks."""
    from .plots import readable_log_axis

    low, high = min(values), max(values)
    ax.set_yscale("log")
    ax.set_ylim(low / 3, high * 8)
    readable_log_axis(ax)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradkit bench align`` (also ``python benchmarks/align.py``)."""
    _bench.add_common_arguments(
        parser,
        unit="case",
        repeats=(5, 3),
        budget=(20.0, 1.0),
        quick_help="small cases only (a smoke test)",
    )
    # The lab's --threads (auto = 1; the README's numbers are one thread) replaces the bench
    # default of the machine's cores.
    for action in parser._actions:
        if "--threads" in action.option_strings:
            action.type = _runtime.THREADS.argtype()
            action.help = (
                f"torch threads during the measurement [default: auto = {_runtime.AUTO_THREADS}]"
            )
    _runtime.add_device_argument(parser)
    parser.add_argument(
        "--report",
        action="store_true",
        help="also time the full alignment_report against its naive reference",
    )


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    repeats = args.repeats if args.repeats is not None else (3 if quick else 5)
    budget = args.budget if args.budget is not None else (1.0 if quick else 20.0)
    _bench.check_positive_int("--repeats", repeats)
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"--budget must be a number of seconds > 0, got {budget!r}")
    return {
        "cases": QUICK_CASES if quick else DEFAULT_CASES,
        "threads": _runtime.resolve_threads(args.threads),
        "repeats": repeats,
        "budget_s": budget,
        "seed": args.seed,
        "report": bool(args.report),
        "device": _runtime.resolve_device(getattr(args, "device", "cpu")),
    }


def run(args: argparse.Namespace) -> int:
    """Run from parsed flags: print the table, write results.json (+ --json FILE) and a PNG
    into the run folder (``--out``, default ``runs/bench-align-<time>``)."""
    settings = _settings(args)
    _io.check_output_path(args.json, "--json")
    overwrite = bool(getattr(args, "overwrite", False))
    with _io.run_folder("bench-align", args.out, overwrite=overwrite) as out:
        result = run_benchmark(**settings)
        print(format_table(result))
        written = [_io.write_json(out / "results.json", result)]
        if args.json:
            written.append(_io.write_json(args.json, result))
        if not args.no_plot:
            written.append(plot_times(result, out / "bench_align.png"))
    print(f"wrote {', '.join(str(path) for path in written)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/align.py [flags]``: the same as ``gradkit bench align``."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/align.py", description=__doc__.strip().splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
