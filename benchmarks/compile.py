"""Compiled versus eager ``soft_topk``: ``python benchmarks/compile.py [--threads N]``.

Times forward+backward, eagerly and under ``torch.compile(fullgraph=True)``, round-robin in one
process (float32, τ = 1, the README's five shapes), of three things:

* ``layer``: ``gradkit.SoftTopK`` alone (compiled: a graph of one ``gradkit::soft_topk`` node
  and, in backward, one ``gradkit::soft_topk_vjp`` node);
* ``model``: ``(SoftTopK(x) * w).sum()`` compiled as a whole, so that Inductor fuses the ops
  around the operator, as in a user's compiled model;
* ``floor``: ``(t * 2).sum()`` on an 8-element ``t``, a graph with no gradkit op and next to
  no work: what ``torch.compile`` itself adds per forward+backward call (guards,
  AOTAutograd's runtime wrappers) over eager code.  Both floor steps first copy ``x`` once,
  so that they start from caches as cold as the layer's (after a pass over a large tensor
  those wrappers cost about half as much again as with warm caches).

Issue 8 asks that compiled forward+backward cost no more than eager: both run the same
registered operators and kernels, so what is left of a difference is ``torch.compile``'s own
per-call cost, printed in the ``floor`` columns (``layer − floor`` is the compiled layer
without it).
"""

from __future__ import annotations

import sys

import torch

import gradkit
from gradkit import _bench

SHAPES = [(4096, 64, 2), (256, 1000, 10), (64, 32000, 10), (64, 32000, 1000), (8, 200000, 10)]


def _steps(rows: int, n: int, k: int) -> tuple[torch.Tensor, dict]:
    """The input and the six forward+backward steps (eager and compiled layer, model, floor)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=generator).mul_(3).requires_grad_()
    weight = torch.randn(rows, n, generator=generator)
    layer = gradkit.SoftTopK(k)
    compiled_layer = torch.compile(gradkit.SoftTopK(k), fullgraph=True)

    def model(inputs):
        return (layer(inputs) * weight).sum()

    def floor(inputs, _evicted):
        return (inputs * 2.0).sum()

    tiny = torch.randn(8, generator=generator, requires_grad=True)
    sink = torch.empty_like(x)

    compiled_model = torch.compile(model, fullgraph=True)
    compiled_floor = torch.compile(floor, fullgraph=True)
    losses = {
        "layer_eager": lambda: (layer(x) * weight).sum(),
        "layer_compiled": lambda: (compiled_layer(x) * weight).sum(),
        "model_eager": lambda: model(x),
        "model_compiled": lambda: compiled_model(x),
        "floor_eager": lambda: floor(tiny, sink.copy_(x)),
        "floor_compiled": lambda: compiled_floor(tiny, sink.copy_(x)),
    }

    def step(loss):
        def run() -> None:
            x.grad = tiny.grad = None
            loss().backward()

        return run

    return x, {name: step(loss) for name, loss in losses.items()}


def measure(rows: int, n: int, k: int, repeats: int) -> dict:
    """Median wall and CPU milliseconds of every step at one shape, and the ratios."""
    _, steps = _steps(rows, n, k)
    for step in steps.values():  # compile (round_robin's warm-up then builds and warms)
        step()
    out: dict = {"shape": f"{rows}x{n}", "k": k}
    for name, medians in _bench.round_robin(steps, repeats).items():
        out[f"{name}_wall_ms"] = medians["median_ms"]
        out[f"{name}_cpu_ms"] = medians["median_cpu_ms"]
    for clock in ("wall", "cpu"):
        floor = out[f"floor_compiled_{clock}_ms"] - out[f"floor_eager_{clock}_ms"]
        out[f"compile_floor_{clock}_ms"] = floor
        for what in ("layer", "model"):
            compiled, eager = out[f"{what}_compiled_{clock}_ms"], out[f"{what}_eager_{clock}_ms"]
            out[f"{what}_compiled_over_eager_{clock}"] = compiled / eager
            out[f"{what}_compiled_less_floor_over_eager_{clock}"] = (compiled - floor) / eager
    # (the names of the first version of this benchmark)
    out["compiled_over_eager_wall"] = out["layer_compiled_over_eager_wall"]
    out["compiled_over_eager_cpu"] = out["layer_compiled_over_eager_cpu"]
    return out


_COLUMNS = {  # header: (key, format) of the wall-clock figures
    "eager ms": ("layer_eager_wall_ms", ".3g"),
    "compiled ms": ("layer_compiled_wall_ms", ".3g"),
    "compiled/eager": ("layer_compiled_over_eager_wall", ".2f"),
    "model compiled/eager": ("model_compiled_over_eager_wall", ".2f"),
    "torch.compile floor ms": ("compile_floor_wall_ms", ".2f"),
    "layer (compiled − floor)/eager": ("layer_compiled_less_floor_over_eager_wall", ".2f"),
}


def format_rows(rows: list[dict]) -> str:
    cells = [
        [r["shape"], str(r["k"]), *(format(r[key], spec) for key, spec in _COLUMNS.values())]
        for r in rows
    ]
    return _bench.markdown_table(["shape", "k", *_COLUMNS], cells)


def main(argv: list[str] | None = None) -> int:
    args = _bench.parse_table_flags(
        argv, __doc__.splitlines()[0], {"--repeats": (30, "timed calls per method")}
    )
    _bench.print_table(
        lambda: [measure(b, n, k, args.repeats) for b, n, k in SHAPES],
        args.threads,
        f"torch {torch.__version__}, {args.threads} thread(s), wall-clock medians",
        format_rows,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
