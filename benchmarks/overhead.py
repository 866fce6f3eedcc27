"""Per-call cost at small sizes: ``python benchmarks/overhead.py [--threads N] [--json FILE]``.

At router sizes (a few tokens, a few experts) a call does next to no arithmetic: what it
costs is the fixed work of the call itself (argument checks, the autograd ``Function``, the
kernel call, the backward's way through the autograd engine).  This times forward+backward,
round-robin in one process, at a few small shapes (float32, τ = 1, ``x = 3·randn``), of:

* ``soft_topk`` and ``sparse_topk`` (the fused CPU kernel where it is built);
* ``sigmoid``: one ``torch.sigmoid`` forward+backward, the unit of the speed tables;
* ``function``: a Python ``autograd.Function`` that does no work (``empty_like`` forward and
  backward), called as gradkit calls its own (without ``Function.apply``'s per-call argument
  binding): the least an operator written as a Python ``autograd.Function`` costs.

The table gives median microseconds per call and each operator's cost above the do-nothing
``Function`` (what is left to cut in gradkit's own Python and kernel).
"""

from __future__ import annotations

import sys

import torch

import gradkit
from gradkit import _bench

SHAPES = [(16, 8, 2), (256, 8, 2), (64, 64, 4), (4096, 64, 2)]
METHODS = ("soft_topk", "sparse_topk", "sigmoid", "function")


class _NoWork(torch.autograd.Function):
    """The do-nothing autograd ``Function`` (the floor of a Python-level operator)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(grad)


def _steps(rows: int, n: int, k: int) -> dict:
    """One forward+backward step per method, on the same input and cotangent."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=generator).mul_(3).requires_grad_()
    upstream = torch.randn(rows, n, generator=generator)
    forwards = {
        "soft_topk": lambda t: gradkit.soft_topk(t, k),
        "sparse_topk": lambda t: gradkit.sparse_topk(t, k),
        "sigmoid": torch.sigmoid,
        # (without Function.apply's per-call argument binding, as gradkit calls its own)
        "function": super(torch.autograd.Function, _NoWork).apply,
    }

    def step(forward):
        def run() -> None:
            x.grad = None
            forward(x).backward(upstream)

        return run

    return {name: step(forwards[name]) for name in METHODS}


def measure(rows: int, n: int, k: int, repeats: int, calls: int) -> dict:
    """Median wall and CPU microseconds per call of every method at one shape."""

    def batch(step):
        def run() -> None:
            for _ in range(calls):
                step()

        return run

    batches = {name: batch(step) for name, step in _steps(rows, n, k).items()}
    out: dict = {"shape": f"{rows}x{n}", "k": k}
    for name, medians in _bench.round_robin(batches, repeats).items():  # (µs per call)
        out[f"{name}_wall_us"] = 1e3 * medians["median_ms"] / calls
        out[f"{name}_cpu_us"] = 1e3 * medians["median_cpu_ms"] / calls
    for name in ("soft_topk", "sparse_topk"):
        for clock in ("wall", "cpu"):
            ours, floor = out[f"{name}_{clock}_us"], out[f"function_{clock}_us"]
            out[f"{name}_over_function_{clock}_us"] = ours - floor
            out[f"{name}_x_sigmoid_{clock}"] = ours / out[f"sigmoid_{clock}_us"]
    return out


_COLUMNS = {  # header: key of the wall-clock µs
    "soft_topk µs": "soft_topk_wall_us",
    "sparse_topk µs": "sparse_topk_wall_us",
    "sigmoid µs": "sigmoid_wall_us",
    "do-nothing Function µs": "function_wall_us",
    "soft_topk − Function µs": "soft_topk_over_function_wall_us",
    "sparse_topk − Function µs": "sparse_topk_over_function_wall_us",
}


def format_rows(rows: list[dict]) -> str:
    cells = [
        [r["shape"], str(r["k"]), *(f"{r[key]:.0f}" for key in _COLUMNS.values())] for r in rows
    ]
    return _bench.markdown_table(["shape", "k", *_COLUMNS], cells)


def main(argv: list[str] | None = None) -> int:
    args = _bench.parse_table_flags(
        argv,
        __doc__.splitlines()[0],
        {"--repeats": (15, "timed rounds per method"), "--calls": (20, "calls per timed round")},
    )
    _bench.print_table(
        lambda: [measure(b, n, k, args.repeats, args.calls) for b, n, k in SHAPES],
        args.threads,
        f"torch {torch.__version__}, {args.threads} thread(s), wall-clock medians per call",
        format_rows,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
