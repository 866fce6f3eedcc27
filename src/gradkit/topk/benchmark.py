"""Time soft and sparse top-k forward+backward against the seed, torch.topk and a sigmoid pass.

Every number is a median wall time (``time.perf_counter``) of one call of
``out = f(x); out.backward(u)`` on CPU in float32, with a fixed upstream gradient ``u``, after
warm-up calls, all methods timed round-robin (in an order that rotates every round) in one
process so that their ratios share the same machine load:

* ``gradkit``: :func:`gradkit.soft_topk` (``τ = 1``), as a user gets it: with the fused CPU
  kernel where it is built (``gradkit.topk._native``; the table's header says whether);
* ``gradkit_torch``: the same with the kernel switched off (``GRADKIT_NATIVE=0``): PyTorch ops
  only, what a machine without a C compiler gets;
* ``seed``: the seed post's algorithm, :func:`gradkit.topk.reference.seed_topk` (64 bisection
  steps, per-element autograd for ``σ'``) — the baseline;
* ``sigmoid``: one ``torch.sigmoid`` forward+backward, the cost of one pass over memory;
* ``torch.topk``: hard top-k, forward only (no gradient exists) — the floor;
* ``sparse_topk``: :func:`gradkit.sparse_topk` at the same ``τ`` (the other operator: exact
  zeros and ones), as a user gets it;
* peers when installed (``pip install difftopk pytopk``): ``difftopk`` (a relaxed bitonic
  sorting network returning a ``(b, n, k)`` soft top-k matrix; its dense matrices need
  ``O(b·n²·log²n)`` memory, so it is skipped where that exceeds a budget) and ``pytopk``
  (``NoisedTopK``: the smoothed k-th largest *value* per row, 5 noise samples; a different
  output, listed for scale); ``budget_bisect`` (``pip install entmax``: the projection that
  ``sparse_topk`` computes, by 50 bisection steps on ``x/τ``).

Ratios reported per shape: ``speedup vs seed = seed / gradkit``, ``× sigmoid pass =
gradkit / sigmoid``, ``× torch.topk = gradkit / torch.topk``. The issue's targets are
``speedup vs seed ≥ 10`` and ``× sigmoid pass ≤ 10`` at every shape. Before timing, each
shape checks that gradkit and the seed agree (max ``|Δp|`` and ``|Δ∂L/∂x|``, and ``Σp − k``).

Slow methods get fewer repeats rather than being skipped: each method gets
``clamp(budget / t_first, 3, repeats)`` repeats, where ``t_first`` is its first call's time.

The JSON also keeps each method's fastest call and its median CPU time (``process_time``,
all threads), with the same ratios computed from those (``ratios_from_min``,
``ratios_from_cpu_time``). On a shared machine wall times swell whenever a thread is
descheduled; with ``--threads 1`` the CPU-time ratios are the steadier ones (and are printed
too), while with more threads CPU time also counts the workers' spinning.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .. import _bench, _checks, _io
from . import _native, benchmark_grid
from .reference import seed_topk
from .soft_topk import soft_topk
from .sparse_topk import sparse_topk

__all__ = [
    "DEFAULT_SHAPES",
    "QUICK_SHAPES",
    "TARGET_SIGMOID_PASSES",
    "TARGET_SPARSE_SIGMOID_PASSES",
    "TARGET_SPEEDUP_VS_SEED",
    "Shape",
    "add_arguments",
    "format_table",
    "main",
    "plot_ratios",
    "run",
    "run_benchmark",
]

#: The issue's targets: at least this many times faster than the seed …
TARGET_SPEEDUP_VS_SEED = 10.0
#: … and at most this many times the cost of one sigmoid forward+backward pass.
TARGET_SIGMOID_PASSES = 10.0
#: sparse_topk: at most this many sigmoid passes (issue 12).
TARGET_SPARSE_SIGMOID_PASSES = 3.0

#: ``--grid --op`` choices: one operator, or both (``soft`` then ``sparse``).
GRID_OPS = ("soft", "sparse", "both")

#: Minimum number of timed calls per method and shape, however slow the method.
MIN_REPEATS = 3
#: A one-thread measurement whose wall time exceeds its CPU time by this factor was descheduled.
NOISE_RATIO = 1.3
#: difftopk's dense sorting network is skipped where its estimated memory exceeds this.
DIFFTOPK_MEMORY_BUDGET_BYTES = 3 * 2**30


_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Shape:
    """One benchmark case: ``batch`` rows of ``n`` scores, soft top-``k`` over each row."""

    batch: int
    n: int
    k: int
    label: str

    @property
    def name(self) -> str:
        return f"{self.batch}×{self.n}, k={self.k}"


DEFAULT_SHAPES = (
    Shape(4096, 64, 2, "MoE routing"),
    Shape(256, 1000, 10, "classification"),
    Shape(64, 32000, 10, "vocabulary"),
    Shape(64, 32000, 1000, "vocabulary, large k"),
    Shape(8, 200000, 10, "long rows"),
)
QUICK_SHAPES = (
    Shape(32, 16, 2, "quick"),
    Shape(4, 64, 5, "quick"),
)

#: Method keys in table order, with their display names.
METHOD_NAMES = {
    "gradkit": "gradkit.soft_topk",
    "gradkit_torch": "gradkit, PyTorch ops only",
    "seed": "seed (baseline)",
    "sigmoid": "sigmoid pass (fwd+bwd)",
    "torch_topk": "torch.topk (hard, fwd only: floor)",
    "sparse_topk": "gradkit.sparse_topk",
    "difftopk": "difftopk (bitonic)",
    "pytopk": "pytopk NoisedTopK",
    "budget_bisect": "entmax budget_bisect",
}
#: Methods that are optional peers (measured when installed, skipped by ``--no-peers``).
PEERS = ("difftopk", "pytopk", "budget_bisect")


# --------------------------------------------------------------------------- methods


@dataclass
class _Prepared:
    """A method ready to time: ``step()`` runs one call; or a reason it cannot run."""

    step: Callable[[], None] | None
    skipped: str | None = None


def _forward_backward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """Return ``step()`` running ``forward(x).backward(u)`` with a fixed random ``u``."""
    leaf = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        upstream = torch.randn_like(forward(leaf))

    def step() -> None:
        leaf.grad = None
        forward(leaf).backward(upstream)

    return step


def _forward_only(forward: Callable[[torch.Tensor], Any], x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            forward(x)

    return step


def _import_quietly(name: str):
    """Import an optional peer; difftopk prints a torch_sparse notice on import."""
    with contextlib.redirect_stdout(io.StringIO()):
        return __import__(name)


def _difftopk_memory_bytes(shape: Shape) -> float:
    """Rough peak memory of difftopk's dense bitonic network forward+backward.

    Each of the ``L(L+1)/2`` layers (``L = ⌈log₂ n⌉``) keeps two ``(b, n, 2^L/2)`` float32
    mixing tensors for backward; 1.5× covers the temporaries (measured: 2.0 GB at 4096×64).
    """
    levels = max(1, math.ceil(math.log2(shape.n)))
    layers = levels * (levels + 1) // 2
    return 1.5 * 2 * layers * shape.batch * shape.n * (2**levels / 2) * 4


def _checked(step: Callable[[], None], device: torch.device) -> _Prepared:
    """A peer's step, or the reason it cannot run here (e.g. a peer that is CPU-only on a GPU:
    its error is reported as a skip, not a crash of the whole benchmark)."""
    if device.type == "cpu":
        return _Prepared(step)
    try:
        step()
    except (RuntimeError, TypeError, ValueError) as error:
        return _Prepared(None, f"fails on {device}: {str(error).splitlines()[0][:80]}")
    return _Prepared(step)


def _entmax_budget_bisect() -> Callable | None:
    """entmax's ``budget_bisect`` when entmax is installed, else ``None``."""
    try:
        from entmax import budget_bisect
    except ImportError:
        return None
    return budget_bisect


def _own_forwards(k: int, temperature: float) -> dict[str, Callable[[torch.Tensor], Any]]:
    """gradkit's operators and the baselines as functions of the scores."""
    return {
        "gradkit": lambda t: soft_topk(t, k, dim=-1, temperature=temperature),
        # The seed has no temperature: its demo scales the scores instead (σ((x − θ)/τ)).
        "seed": lambda t: seed_topk(t / temperature, k),
        "sigmoid": torch.sigmoid,
        "sparse_topk": lambda t: sparse_topk(t, k, dim=-1, temperature=temperature),
    }


def _prepare(
    method: str, shape: Shape, x: torch.Tensor, peers: bool, temperature: float = 1.0
) -> _Prepared:
    k = shape.k
    forwards = _own_forwards(k, temperature)
    if method in forwards:
        return _Prepared(_forward_backward(forwards[method], x))
    if method == "gradkit_torch":
        # The same operator with the fused CPU kernel switched off (GRADKIT_NATIVE=0): what
        # a machine without a C compiler, or an input the kernel leaves, gets.
        inner = _forward_backward(forwards["gradkit"], x)

        def step() -> None:
            with _native.disabled():
                inner()

        return _Prepared(step)
    if method == "torch_topk":
        return _Prepared(_forward_only(lambda t: torch.topk(t, k, dim=-1), x))
    if method not in PEERS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHOD_NAMES)}")
    if not peers:
        return _Prepared(None, "peers disabled (--no-peers)")
    return _prepare_peer(method, shape, x, temperature)


def _prepare_peer(method: str, shape: Shape, x: torch.Tensor, temperature: float) -> _Prepared:
    """An optional peer's step, or why it is skipped (not installed, too much memory)."""
    k = shape.k
    if method == "budget_bisect":
        bisect = _entmax_budget_bisect()
        if bisect is None:
            return _Prepared(None, "not installed")
        return _checked(_forward_backward(lambda t: bisect(t / temperature, budget=k), x), x.device)
    try:
        module = _import_quietly(method)
    except ImportError:
        return _Prepared(None, "not installed")
    if method == "pytopk":
        smoothed_kth_value = module.NoisedTopK(k=k, epsilon=1.0, n_sample=5, dim=-1)
        return _checked(_forward_backward(smoothed_kth_value, x), x.device)
    need = _difftopk_memory_bytes(shape)
    if need > DIFFTOPK_MEMORY_BUDGET_BYTES:
        budget = DIFFTOPK_MEMORY_BUDGET_BYTES / 2**30
        return _Prepared(None, f"dense network needs ~{need / 2**30:,.0f} GiB > {budget:g}")
    network = module.DiffTopkNet("bitonic", shape.n, k, steepness=10.0)
    if hasattr(network, "to"):
        network = network.to(x.device)
    return _checked(_forward_backward(lambda t: network(t)[1], x), x.device)


# --------------------------------------------------------------------------- measuring


def _agreement(shape: Shape, x: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """Max differences between gradkit and the seed on ``x`` (forward, and VJP with one ``u``),
    and each operator's ``max |Σp − k|``."""
    upstream = torch.randn_like(x)
    results = {}
    for name, forward in (
        ("gradkit", lambda t: soft_topk(t, shape.k, dim=-1, temperature=temperature)),
        ("seed", lambda t: seed_topk(t / temperature, shape.k)),
    ):
        leaf = x.detach().clone().requires_grad_(True)
        p = forward(leaf)
        (gradient,) = torch.autograd.grad(p, leaf, upstream)
        results[name] = (p.detach(), gradient)
    (p_gradkit, g_gradkit), (p_seed, g_seed) = results["gradkit"], results["seed"]
    with torch.no_grad():
        sparse_sum = sparse_topk(x, shape.k, dim=-1, temperature=temperature).sum(-1)
    return {
        "max_abs_diff_p": (p_gradkit - p_seed).abs().max().item(),
        "max_abs_diff_grad": (g_gradkit - g_seed).abs().max().item(),
        "max_abs_sum_error_gradkit": (p_gradkit.sum(-1) - shape.k).abs().max().item(),
        "max_abs_sum_error_seed": (p_seed.sum(-1) - shape.k).abs().max().item(),
        "max_abs_sum_error_sparse": (sparse_sum - shape.k).abs().max().item(),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _plan_repeats(
    runnable: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    budget_s: float,
    device: torch.device,
) -> dict[str, int]:
    """Timed calls per method: slow methods get fewer (and no extra warm-up), never skipped."""
    planned: dict[str, int] = {}
    for method, step in runnable.items():
        first = _bench.timed(step, device)[0]  # the first call also warms up (allocator, vmap)
        extra_warmup = warmup - 1 if first < budget_s / 4 else 0
        for _ in range(max(0, extra_warmup)):
            first = min(first, _bench.timed(step, device)[0])
        planned[method] = max(MIN_REPEATS, min(repeats, int(budget_s / max(first, 1e-9))))
    return planned


def _time_round_robin(
    runnable: dict[str, Callable[[], None]], planned: dict[str, int], device: torch.device
) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each method's planned calls, methods interleaved.

    Round-robin, so a burst of load on the shared CPU hits all methods alike.  The order
    rotates every round: each method runs with cold caches (whatever ran before evicted them),
    and a fixed order would always put the same method after the heaviest one (pytopk's sorts,
    difftopk's dense network) and the same one after the lightest.
    """
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in runnable}
    order = list(runnable.items())
    for round_index in range(max(planned.values(), default=0)):
        shift = round_index % len(order)
        for method, step in order[shift:] + order[:shift]:
            if round_index < planned[method]:
                times[method].append(_bench.timed(step, device))
    return times


def _summarise(times: list[tuple[float, float]]) -> dict[str, Any]:
    ms = [1e3 * wall for wall, _ in times]
    cpu_ms = [1e3 * cpu for _, cpu in times]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "median_cpu_ms": statistics.median(cpu_ms),
        "repeats": len(ms),
    }


def _ratios(measured: dict[str, dict[str, Any]], statistic: str) -> dict[str, float | None]:
    """The reported ratios from one statistic (median, min or CPU ms) of each method."""

    def of(method: str) -> float | None:
        return measured.get(method, {}).get(statistic)

    gradkit_ms, sparse_ms = of("gradkit"), of("sparse_topk")
    return {
        "speedup_vs_seed": _ratio(of("seed"), gradkit_ms),
        "speedup_vs_seed_torch_ops": _ratio(of("seed"), of("gradkit_torch")),
        "x_sigmoid_pass": _ratio(gradkit_ms, of("sigmoid")),
        "x_torch_topk": _ratio(gradkit_ms, of("torch_topk")),
        "speedup_vs_difftopk": _ratio(of("difftopk"), gradkit_ms),
        "speedup_vs_pytopk": _ratio(of("pytopk"), gradkit_ms),
        "sparse_x_sigmoid_pass": _ratio(sparse_ms, of("sigmoid")),
        "sparse_speedup_vs_budget_bisect": _ratio(of("budget_bisect"), sparse_ms),
    }


def _descheduled(measured: dict[str, dict[str, Any]], device: torch.device) -> bool:
    """One thread on CPU: a wall time well above the CPU time means the thread was
    descheduled, so its ratios are not the operator's."""
    return (
        device.type == "cpu"
        and torch.get_num_threads() == 1
        and any(
            m["median_ms"] > NOISE_RATIO * m["median_cpu_ms"]
            for key, m in measured.items()
            if key in ("gradkit", "sparse_topk", "sigmoid", "seed") and "median_ms" in m
        )
    )


def _targets(ratios: dict[str, float | None]) -> dict[str, bool]:
    def at_most(value: float | None, bound: float) -> bool:
        return value is not None and value <= bound

    speedup = ratios["speedup_vs_seed"]
    return {
        "speedup_vs_seed_met": speedup is not None and speedup >= TARGET_SPEEDUP_VS_SEED,
        "x_sigmoid_pass_met": at_most(ratios["x_sigmoid_pass"], TARGET_SIGMOID_PASSES),
        "sparse_x_sigmoid_pass_met": at_most(
            ratios["sparse_x_sigmoid_pass"], TARGET_SPARSE_SIGMOID_PASSES
        ),
    }


def _measure_shape(
    shape: Shape,
    *,
    methods: Sequence[str],
    repeats: int,
    warmup: int,
    budget_s: float,
    peers: bool,
    generator: torch.Generator,
    temperature: float = 1.0,
    device: torch.device = _CPU,
) -> dict[str, Any]:
    x = torch.randn(shape.batch, shape.n, generator=generator, dtype=torch.float32).to(device)
    agreement = _agreement(shape, x, temperature)
    prepared = {m: _prepare(m, shape, x, peers, temperature) for m in methods}
    runnable = {m: p.step for m, p in prepared.items() if p.step is not None}
    planned = _plan_repeats(runnable, repeats, warmup, budget_s, device)
    times = _time_round_robin(runnable, planned, device)
    measured = {
        m: _summarise(times[m]) if m in times else {"skipped": prepared[m].skipped} for m in methods
    }
    ratios = _ratios(measured, "median_ms")
    return {
        "shape": [shape.batch, shape.n],
        "k": shape.k,
        "label": shape.label,
        "methods": measured,
        "ratios": ratios,
        # The same ratios from the fastest call of each method: on a shared CPU the minimum
        # is the least disturbed by other processes, so a large gap flags a noisy run.
        "ratios_from_min": _ratios(measured, "min_ms"),
        "ratios_from_cpu_time": _ratios(measured, "median_cpu_ms"),
        "targets": _targets(ratios),
        "agreement": agreement,
        "flagged": f"descheduled (wall time > {NOISE_RATIO:g} × CPU time)"
        if _descheduled(measured, device)
        else None,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _environment(
    threads: int, load_before: float | None, device: torch.device = _CPU
) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "gpu": gpu,
        **_bench.environment(threads),
        "gradkit": _version("gradkit"),
        "native_kernel": _native.status(),
        "difftopk": _version("difftopk"),
        "pytopk": _version("pytopk"),
        "entmax": _version("entmax"),
        "load_average_1min_before": load_before,
        "load_average_1min_after": _bench.load_average(),
    }


def run_benchmark(
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 2,
    budget_s: float = 1.5,
    seed: int = 0,
    peers: bool = True,
    quick: bool = False,
    temperature: float = 1.0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure every method at every shape; return ``{config, environment, results, summary}``.

    ``torch``'s thread count is set to ``threads`` (default: the machine's cores) for the
    measurement and restored afterwards.  ``device="cuda"`` runs every method on the GPU
    (timed between ``torch.cuda.synchronize`` calls).  ``summary["flags"]`` lists what makes
    the run unreliable (a busy machine, descheduled shapes); when it is not empty the targets
    are not judged (``None``).
    """
    torch_device = _bench.check_device(device)
    if threads is None:
        threads = os.cpu_count() or 1
    _check_settings(shapes, threads, repeats, warmup, budget_s, temperature)
    methods = list(METHOD_NAMES)
    load_before = _bench.load_average()  # other processes' load, before ours adds to it
    results = _measure_shapes(
        shapes,
        threads,
        seed,
        methods=methods,
        repeats=repeats,
        warmup=warmup,
        budget_s=budget_s,
        peers=peers,
        temperature=temperature,
        device=torch_device,
    )

    config = {
        "shapes": [asdict(s) for s in shapes],
        "dtype": "float32",
        "device": device,
        "temperature": temperature,
        "threads": threads,
        "repeats": repeats,
        "min_repeats": MIN_REPEATS,
        "warmup": warmup,
        "budget_s": budget_s,
        "seed": seed,
        "peers": peers,
        "quick": quick,
        **_CONFIG_CONSTANTS,
    }
    environment = _environment(threads, load_before, torch_device)
    summary = _summary(results, _flags(environment, results, torch_device))
    return {"config": config, "environment": environment, "results": results, "summary": summary}


def _measure_shapes(shapes: Sequence[Shape], threads: int, seed: int, **options) -> list[dict]:
    """:func:`_measure_shape` at every shape, on ``threads`` threads, seeded."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # peers draw noise from the global generator
    with _bench.torch_threads(threads):
        return [
            _measure_shape(shape, generator=generator, **options)
            for shape in _io.progress(shapes, "bench topk: shape")
        ]


_CONFIG_CONSTANTS = {
    "methods": METHOD_NAMES,
    "timing": "median of perf_counter wall times of forward+backward (torch.topk: forward)",
    "operators": ["soft_topk", "sparse_topk"],
}


def _check_settings(
    shapes: Sequence[Shape],
    threads: int,
    repeats: int,
    warmup: int,
    budget_s: float,
    temperature: float,
) -> None:
    """ValueError naming the first bad setting."""
    _bench.check_positive_int("threads", threads)
    _bench.check_positive_int("repeats", repeats)
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not budget_s > 0:
        raise ValueError(f"budget must be > 0 seconds, got {budget_s!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for shape in shapes:
        if not 0 < shape.k < shape.n:
            raise ValueError(f"shape {shape.name}: k must satisfy 0 < k < n")


def _summary(results: list[dict[str, Any]], flags: list[str]) -> dict[str, Any]:
    """The targets, judged at every shape unless the run is flagged (then ``None``)."""

    def everywhere(target: str) -> bool | None:
        return all(r["targets"][target] for r in results) if not flags else None

    return {
        "target_speedup_vs_seed": TARGET_SPEEDUP_VS_SEED,
        "target_x_sigmoid_pass": TARGET_SIGMOID_PASSES,
        "target_sparse_x_sigmoid_pass": TARGET_SPARSE_SIGMOID_PASSES,
        "flags": flags,
        "reliable": not flags,
        "speedup_vs_seed_met_everywhere": everywhere("speedup_vs_seed_met"),
        "x_sigmoid_pass_met_everywhere": everywhere("x_sigmoid_pass_met"),
        "sparse_x_sigmoid_pass_met_everywhere": everywhere("sparse_x_sigmoid_pass_met"),
    }


def _flags(environment: dict[str, Any], results: list, device: torch.device) -> list[str]:
    """What makes a run's wall times unreliable: other processes' load, descheduled shapes."""
    flags = []
    threads = environment["threads"]
    before = environment["load_average_1min_before"]
    after = environment["load_average_1min_after"]
    busy = _bench.load_flag(before, after, threads) if device.type == "cpu" else None
    if busy:
        flags.append(busy)
    noisy = [r for r in results if r.get("flagged")]
    if noisy:
        flags.append(
            f"{len(noisy)} of {len(results)} shapes descheduled "
            f"(wall time > {NOISE_RATIO:g} × CPU time)"
        )
    return flags


# --------------------------------------------------------------------------- reporting


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """Markdown tables of the timings, ratios and agreement checks, plus machine info."""
    env, summary = report["environment"], report["summary"]
    flags = summary.get("flags", [])
    lines = _header_lines(report, flags)
    lines += _timing_lines(report["results"])
    if env["threads"] == 1 or flags:
        lines += _cpu_ratio_lines(report["results"], env["threads"])
    lines += _agreement_lines(report["results"])
    if flags:
        lines += ["", "Targets not judged: the run is unreliable (see above)."]
        return "\n".join(lines)

    def verdict(key: str) -> str:
        return "met" if summary[key] else "NOT met"

    lines += [
        "",
        f"Target ≥ {TARGET_SPEEDUP_VS_SEED:g}× faster than the seed at every shape: "
        + verdict("speedup_vs_seed_met_everywhere"),
        f"Target ≤ {TARGET_SIGMOID_PASSES:g}× one sigmoid pass at every shape: "
        + verdict("x_sigmoid_pass_met_everywhere"),
        f"Target sparse_topk ≤ {TARGET_SPARSE_SIGMOID_PASSES:g}× one sigmoid pass at every "
        "shape: " + verdict("sparse_x_sigmoid_pass_met_everywhere"),
    ]
    return "\n".join(lines)


def _header_lines(report: dict[str, Any], flags: list[str]) -> list[str]:
    env = report["environment"]
    lines = [
        f"torch {env['torch']}, {env['threads']} thread(s), CPU: {env['cpu']} "
        f"({env['cpu_count']} cores, torch's CPU kernels {env.get('cpu_capability', '?')}), "
        f"Python {env['python']}; "
        f"device {report['config'].get('device', 'cpu')}{_gpu_name(report)}; float32, "
        f"τ = {report['config']['temperature']:g}, median ms of forward+backward; "
        f"fused CPU kernel {env.get('native_kernel', 'unknown')}",
    ]
    if flags:
        lines.append(
            "UNRELIABLE RUN: " + "; ".join(flags) + " — the wall-time ratios below are not the "
            "operator's; " + _bench.advice(env["threads"], report["config"].get("device", "cpu"))
        )
    return lines


#: Ratio columns of the timing table: (heading, key in ``ratios``, format, suffix).
_RATIO_COLUMNS = (
    ("speedup vs seed", "speedup_vs_seed", ".1f", "×"),
    ("(PyTorch ops only)", "speedup_vs_seed_torch_ops", ".1f", "×"),
    ("× sigmoid pass", "x_sigmoid_pass", ".1f", ""),
    ("× torch.topk", "x_torch_topk", ".1f", ""),
    ("sparse_topk × sigmoid pass", "sparse_x_sigmoid_pass", ".1f", ""),
    ("budget_bisect ÷ sparse_topk", "sparse_speedup_vs_budget_bisect", ".1f", "×"),
)


def _timing_lines(results: list[dict[str, Any]]) -> list[str]:
    """The per-method medians and the ratios, then one line per reason a cell is n/a."""
    lines = [
        "",
        "| shape (b×n) | k | "
        + " | ".join(f"{name} ms" for name in METHOD_NAMES.values())
        + " | "
        + " | ".join(heading for heading, *_ in _RATIO_COLUMNS)
        + " |",
        "|" + "---|" * (2 + len(METHOD_NAMES) + len(_RATIO_COLUMNS)),
    ]
    # method -> reason -> shapes, so each reason for an "n/a" cell is printed once.
    skipped: dict[str, dict[str, list[str]]] = {}
    for result in results:
        batch, n = result["shape"]
        cells = []
        for method in METHOD_NAMES:
            entry = result["methods"][method]
            if "median_ms" in entry:
                cells.append(f"{entry['median_ms']:.3g}")
            else:
                cells.append("n/a")
                reasons = skipped.setdefault(method, {})
                reasons.setdefault(entry["skipped"], []).append(f"{batch}×{n} k={result['k']}")
        ratios = result["ratios"]
        cells += [_cell(ratios.get(key), fmt) + suffix for _, key, fmt, suffix in _RATIO_COLUMNS]
        lines.append(f"| {batch}×{n} | {result['k']} | " + " | ".join(cells) + " |")
    for method, reasons in skipped.items():
        text = "; ".join(f"{', '.join(shapes)}: {why}" for why, shapes in reasons.items())
        lines += ["", f"n/a — {METHOD_NAMES[method]}: {text}"]
    return lines


def _cpu_ratio_lines(results: list[dict[str, Any]], threads: int) -> list[str]:
    """With one thread, CPU time excludes the waits of a descheduled thread: on a shared
    machine these ratios are the steadier ones (with more threads it counts spinning)."""
    spinning = "" if threads == 1 else " (with several threads it also counts spinning)"
    lines = [
        "",
        "Same ratios from the median CPU time (process_time), steadier on a busy machine"
        + spinning
        + ":",
        "",
        "| shape (b×n) | k | speedup vs seed | × sigmoid pass | × torch.topk "
        "| sparse_topk × sigmoid pass |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        ratios = result["ratios_from_cpu_time"]
        batch, n = result["shape"]
        lines.append(
            f"| {batch}×{n} | {result['k']} | {_cell(ratios['speedup_vs_seed'], '.1f')}×"
            f" | {_cell(ratios['x_sigmoid_pass'], '.1f')}"
            f" | {_cell(ratios['x_torch_topk'], '.1f')}"
            f" | {_cell(ratios.get('sparse_x_sigmoid_pass'), '.1f')} |"
        )
    return lines


def _agreement_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "| shape (b×n) | k | max abs Δp vs seed | max abs Δ∂L/∂x vs seed "
        "| max abs Σp−k gradkit | max abs Σp−k seed | max abs Σp−k sparse_topk |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        a = result["agreement"]
        batch, n = result["shape"]
        sparse = a.get("max_abs_sum_error_sparse")
        lines.append(
            f"| {batch}×{n} | {result['k']} | {a['max_abs_diff_p']:.2e} "
            f"| {a['max_abs_diff_grad']:.2e} | {a['max_abs_sum_error_gradkit']:.2e} "
            f"| {a['max_abs_sum_error_seed']:.2e} | {_cell(sparse, '.2e')} |"
        )
    return lines


def _gpu_name(report: dict[str, Any]) -> str:
    name = report["environment"].get("gpu")
    return f" ({name})" if name else ""


def plotted_ratios(report: dict[str, Any]) -> str | None:
    """Which ratios a plot may show: ``"ratios"`` (wall time) for a reliable run, the
    CPU-time ones for a flagged one-thread CPU run, ``None`` (no plot) otherwise."""
    if report["summary"].get("reliable", True):
        return "ratios"
    if report["environment"]["threads"] == 1 and report["config"].get("device") == "cpu":
        return "ratios_from_cpu_time"
    return None


def _bar_panel(axis, values: list, labels: list[str], target: float | None, relation: str):
    """One log-scale bar panel of ratios (``None``: no bar), with an optional target line."""
    from matplotlib import ticker

    heights = [v if v is not None else 0.0 for v in values]
    bars = axis.bar(range(len(values)), heights, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        axis.annotate(
            _cell(value, ".1f"),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if target is not None:
        axis.axhline(target, color="tab:red", linestyle="--", label=f"target {relation}{target:g}")
        axis.legend(fontsize=8)
    axis.set_xticks(range(len(values)), labels, fontsize=7)
    axis.set_yscale("log")
    # Bars start at 1 (a ratio of one) and the target line stays in view.
    shown = [v for v in values if v] + ([target] if target else []) + [1.0]
    axis.set_ylim(min(shown) / 2, max(shown) * 2)
    axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_ratios(report: dict[str, Any], path: str | Path) -> Path | None:
    """Bar plot of the four ratios per shape, with the targets drawn as dashed lines.

    A flagged run draws no wall-time numbers: on one CPU thread it plots the CPU-time ratios
    (and says so); otherwise it draws nothing and returns ``None``.
    """
    source = plotted_ratios(report)
    if source is None:
        return None
    plt = _io.pyplot()
    results = report["results"]
    labels = [f"{r['shape'][0]}×{r['shape'][1]}\nk={r['k']}" for r in results]
    panels = (
        ("speedup_vs_seed", "speedup vs seed (seed / gradkit)", TARGET_SPEEDUP_VS_SEED, "≥"),
        ("x_sigmoid_pass", "× sigmoid pass (gradkit / sigmoid)", TARGET_SIGMOID_PASSES, "≤"),
        ("x_torch_topk", "× torch.topk (gradkit / hard top-k fwd)", None, ""),
        (
            "sparse_x_sigmoid_pass",
            "sparse_topk × sigmoid pass",
            TARGET_SPARSE_SIGMOID_PASSES,
            "≤",
        ),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for axis, (key, title, target, relation) in zip(axes, panels, strict=True):
        _bar_panel(axis, [r[source][key] for r in results], labels, target, relation)
        axis.set_title(title, fontsize=9)
    env = report["environment"]
    device = report["config"].get("device", "cpu")
    figure.suptitle(
        f"gradkit soft_topk and sparse_topk, {device} float32, torch {env['torch']}, "
        f"{env['threads']} thread(s)"
        + ("" if source == "ratios" else " — machine busy: CPU-time ratios, not wall time"),
        fontsize=10,
    )
    figure.tight_layout()
    return _io.save_figure(figure, path)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradkit bench topk`` (also ``python benchmarks/topk.py``)."""
    _bench.add_common_arguments(
        parser,
        unit="shape",
        repeats=(30, 3),
        budget=(1.5, 0.2),
        quick_help="tiny shapes and few repeats (a smoke test)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="warm-up calls per method, first included"
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="skip difftopk/pytopk/entmax even when installed"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="τ of the soft top-k (the seed gets x/τ, its own way of scaling); default 1",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to run: cpu (default) or cuda[:index] (every method on the GPU)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="cost over a grid of n × k × spread, float32 and float64, one thread and all "
        "(with --threads: that count only); JSON and one heatmap PNG per op × dtype × threads",
    )
    parser.add_argument(
        "--op",
        choices=GRID_OPS,
        default="soft",
        help="with --grid: the operator(s) timed: soft (soft_topk, the default), sparse "
        "(sparse_topk) or both (about twice as long); the JSON is keyed by op",
    )
    parser.add_argument(
        "--spreads",
        nargs="+",
        type=_checks.number("--spreads", above=0).argtype(),
        default=None,
        metavar="S",
        help="with --grid: the spreads (std of x/τ) timed, instead of the issue's "
        + " ".join(f"{s:g}" for s in benchmark_grid.GRID_SPREADS),
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed flags: print the table, write JSON (and a PNG)."""
    overwrite = getattr(args, "overwrite", False)
    _io.check_output_path(args.json, "--json", overwrite=overwrite)  # before the long work
    _io.check_out_dir(args.out, overwrite=overwrite)
    if args.grid:
        return _run_grid(args, overwrite)
    if getattr(args, "op", "soft") != "soft":
        raise ValueError(f"--op {args.op} applies to --grid only (the shapes time both operators)")
    if getattr(args, "spreads", None) is not None:
        raise ValueError(
            "--spreads applies to --grid only (the shapes take randn; see --temperature)"
        )
    quick = bool(args.quick)
    repeats = args.repeats if args.repeats is not None else (3 if quick else 30)
    budget = args.budget if args.budget is not None else (0.2 if quick else 1.5)
    if args.threads is not None:
        _bench.check_positive_int("--threads", args.threads)
    report = run_benchmark(
        QUICK_SHAPES if quick else DEFAULT_SHAPES,
        threads=args.threads,
        repeats=repeats,
        warmup=args.warmup,
        budget_s=budget,
        seed=args.seed,
        peers=not args.no_peers,
        quick=quick,
        temperature=args.temperature,
        device=args.device,
    )
    print(format_table(report))
    run_dir = _io.new_run_dir("bench-topk", args.out, overwrite=overwrite)
    written = [_io.write_json(run_dir / "results.json", report)]
    if args.json:
        written.append(_io.write_json(args.json, report))
    if not args.no_plot:
        plot = plot_ratios(report, run_dir / "ratios.png")
        if plot is None:
            print("\nno plot: the run is flagged and its wall-time ratios are not drawn")
        else:
            written.append(plot)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _run_grid(args: argparse.Namespace, overwrite: bool) -> int:
    """``--grid``: measure each ``--op``, print the worst cells and tables, write one JSON
    keyed by op (``{"soft": report, "sparse": report}``) and one heatmap per op × setting
    (``grid_<op>_<dtype>_<threads>thread.png``)."""
    quick = bool(args.quick)
    if args.threads is not None:
        _bench.check_positive_int("--threads", args.threads)
    ops = ("soft", "sparse") if args.op == "both" else (args.op,)
    spreads = getattr(args, "spreads", None) or (
        benchmark_grid.QUICK_SPREADS if quick else benchmark_grid.GRID_SPREADS
    )
    reports = {}
    for op in ops:
        reports[op] = benchmark_grid.run_grid(
            ns=benchmark_grid.QUICK_NS if quick else benchmark_grid.GRID_NS,
            spreads=spreads,
            threads=None if args.threads is None else [args.threads],
            elements=benchmark_grid.QUICK_ELEMENTS if quick else benchmark_grid.GRID_ELEMENTS,
            repeats=args.repeats if args.repeats is not None else (3 if quick else 5),
            seed=args.seed,
            device=args.device,
            quick=quick,
            op=op,
        )
        print(benchmark_grid.format_grid(reports[op]) + "\n")
    run_dir = _io.new_run_dir("bench-topk-grid", args.out, overwrite=overwrite)
    written = [_io.write_json(run_dir / "results.json", reports)]
    if args.json:
        written.append(_io.write_json(args.json, reports))
    if not args.no_plot:
        for op, report in reports.items():
            for setting in report["settings"]:
                name = f"grid_{op}_{setting['dtype']}_{setting['threads']}thread.png"
                written.append(benchmark_grid.plot_grid(report, setting, run_dir / name))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradkit.topk.benchmark`` / ``python benchmarks/topk.py`` entry point."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/topk.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
