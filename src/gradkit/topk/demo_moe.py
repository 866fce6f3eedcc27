"""Mixture-of-experts routing on a toy task: softmax, hard top-k, soft_topk and sparse_topk.

``gradkit demo moe`` (or ``python benchmarks/moe.py``) trains the layer of
:mod:`gradkit.topk.moe` with each gating on the same seeds and prints test MSE, the median
training-step time and how many experts run per input; ``results.json`` and ``moe.png`` go
to a new run folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .. import _bench, _io
from .moe import GATINGS, MoEConfig, compare

__all__ = ["add_arguments", "format_summary", "main", "plot_summary", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradkit demo moe``."""
    defaults = MoEConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="Adam steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    parser.add_argument("--experts", type=int, default=defaults.experts, help="experts (8)")
    parser.add_argument("--k", type=int, default=defaults.k, help="experts per input (2)")
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="τ of the top-k gates"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="20 steps, one seed (smoke test)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/demo-moe-…)")
    parser.add_argument("--json", metavar="FILE", help="also write the results JSON to FILE")
    parser.add_argument("--no-plot", action="store_true", help="do not draw moe.png")


def format_summary(report: dict[str, Any]) -> str:
    """The per-gating medians as a table."""
    lines = [f"{'gating':<12} {'test MSE':>9} {'step ms':>9} {'experts/input':>14}"]
    for gating, row in report["summary"].items():
        lines.append(
            f"{gating:<12} {row['test_mse']:>9.4f} {row['step_ms_median']:>9.2f} "
            f"{row['experts_per_input_last_half']:>14.2f}"
        )
    return "\n".join(lines)


def plot_summary(report: dict[str, Any], path) -> Any:
    """Bars of test MSE and step time per gating."""
    plt = _io.pyplot()
    gatings = list(report["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for axis, key, title in (
        (axes[0], "test_mse", "test MSE (lower is better)"),
        (axes[1], "step_ms_median", "training step, median ms"),
    ):
        axis.bar(gatings, [report["summary"][g][key] for g in gatings], color="tab:blue")
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return _io.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    """Train every gating, print the table, write results.json and moe.png."""
    for name in ("steps", "experts", "k", "threads"):
        _bench.check_positive_int(f"--{name}", getattr(args, name))
    if not 0 < args.k < args.experts:
        raise ValueError(f"--k must satisfy 0 < k < experts = {args.experts}, got {args.k}")
    config = MoEConfig(
        experts=args.experts,
        k=args.k,
        temperature=args.temperature,
        steps=20 if args.quick else args.steps,
    )
    seeds = args.seeds[:1] if args.quick else args.seeds
    with _bench.torch_threads(args.threads):
        report = compare(config, seeds, GATINGS)
    report["environment"] = _bench.environment(args.threads)
    print(format_summary(report))
    run_dir = _io.new_run_dir("demo-moe", args.out)
    written = [_io.write_json(run_dir / "results.json", report)]
    if args.json:
        written.append(_io.write_json(args.json, report))
    if not args.no_plot:
        written.append(plot_summary(report, run_dir / "moe.png"))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/moe.py`` entry point."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/moe.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
