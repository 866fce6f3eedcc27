"""Compiled versus eager ``soft_topk``: ``python benchmarks/compile.py [--threads N]``.

Times forward+backward of ``gradkit.SoftTopK`` eagerly and under
``torch.compile(fullgraph=True)`` on the README's five shapes (float32, τ = 1), round-robin
in one process, and prints the medians (wall and CPU time) and their ratio. Issue 8 asks that a
compiled model cost no more than eager code: both run the same registered operators.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import gradkit
from gradkit import _bench

SHAPES = [(4096, 64, 2), (256, 1000, 10), (64, 32000, 10), (64, 32000, 1000), (8, 200000, 10)]


def _step(layer, x: torch.Tensor, weight: torch.Tensor):
    def run() -> None:
        x.grad = None
        (layer(x) * weight).sum().backward()

    return run


def measure(rows: int, n: int, k: int, repeats: int) -> dict:
    """Median wall and CPU seconds of eager and compiled forward+backward at one shape."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=generator).mul_(3).requires_grad_()
    weight = torch.randn(rows, n, generator=generator)
    eager = gradkit.SoftTopK(k)
    compiled = torch.compile(gradkit.SoftTopK(k), fullgraph=True)
    steps = {"eager": _step(eager, x, weight), "compiled": _step(compiled, x, weight)}
    for step in steps.values():  # compile, build the kernel, warm the caches
        step()
        step()
    times: dict[str, list] = {name: [] for name in steps}
    for round_ in range(repeats):
        order = list(steps) if round_ % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(_bench.timed(steps[name]))
    out = {"shape": f"{rows}x{n}", "k": k}
    for name, samples in times.items():
        out[f"{name}_wall_ms"] = 1e3 * statistics.median(wall for wall, _ in samples)
        out[f"{name}_cpu_ms"] = 1e3 * statistics.median(cpu for _, cpu in samples)
    out["compiled_over_eager_wall"] = out["compiled_wall_ms"] / out["eager_wall_ms"]
    out["compiled_over_eager_cpu"] = out["compiled_cpu_ms"] / out["eager_cpu_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per method")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    _bench.check_positive_int("--threads", args.threads)
    _bench.check_positive_int("--repeats", args.repeats)
    load = _bench.load_average()
    with _bench.torch_threads(args.threads):
        rows = [measure(b, n, k, args.repeats) for b, n, k in SHAPES]
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average before: {load}")
    print("| shape | k | eager ms | compiled ms | compiled/eager (wall) | (CPU) |")
    print("|---|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['k']} | {r['eager_wall_ms']:.3g} | {r['compiled_wall_ms']:.3g}"
            f" | {r['compiled_over_eager_wall']:.2f} | {r['compiled_over_eager_cpu']:.2f} |"
        )
    if args.json:
        from gradkit import _io

        _io.write_json(args.json, {"load_average_before": load, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
