"""Plumbing shared by gradkit's benchmarks: thread count, machine description, flag checks.

The measurements themselves stay next to the code they measure (``gradkit.topk.benchmark``,
``gradkit.align.benchmark``); this module only keeps their common frame identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import _io

__all__ = [
    "add_common_arguments",
    "advice",
    "busy",
    "check_device",
    "check_positive_int",
    "cpu_model",
    "environment",
    "load_average",
    "load_flag",
    "markdown_table",
    "parse_table_flags",
    "print_table",
    "round_robin",
    "timed",
    "torch_threads",
]


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer ≥ 1, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


def check_device(device: str) -> torch.device:
    """``torch.device(device)`` for ``"cpu"`` or an available CUDA device, else a ``ValueError``
    naming the flag, the value and what is available."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be 'cpu' or 'cuda[:index]', got {device!r}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"--device must be 'cpu' or 'cuda[:index]', got {device!r}")
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
        raise ValueError(
            f"--device {device}: CUDA is not available (torch {torch.__version__}: {built})"
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return parsed


def timed(step: Callable[[], None], device: torch.device | None = None) -> tuple[float, float]:
    """Wall time (``perf_counter``) and CPU time of all threads (``process_time``) of a call.

    On a GPU the wall time is taken between two ``torch.cuda.synchronize`` calls, so it covers
    the kernels the call queued.  The CPU time does not count the time a thread waits while
    descheduled, so on a busy machine with one thread it is the steadier measure of the work.
    """
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def round_robin(
    steps: dict[str, Callable[[], None]], repeats: int, device: torch.device | None = None
) -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of each step (``median_ms``, ``median_cpu_ms``), and
    the least (``least_ms``, ``least_cpu_ms``), timed in alternation after one warm-up call
    each: ``repeats`` rounds, every other one in reverse order, so that a burst of load, and
    each step's place after another, fall on all alike."""
    for step in steps.values():
        step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for round_index in range(repeats):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(timed(steps[name], device))
    return {
        name: {
            "median_ms": 1e3 * statistics.median(wall for wall, _ in pairs),
            "median_cpu_ms": 1e3 * statistics.median(cpu for _, cpu in pairs),
            "least_ms": 1e3 * min(wall for wall, _ in pairs),
            "least_cpu_ms": 1e3 * min(cpu for _, cpu in pairs),
        }
        for name, pairs in times.items()
    }


def busy(load: float | None, threads: int) -> bool:
    """Whether a 1-minute load average of *other* processes leaves fewer free cores than the
    ``threads`` a measurement uses (with half a core of slack)."""
    return load is not None and load + threads > (os.cpu_count() or 1) + 0.5


def load_flag(
    before: float | None, after: float | None, threads: int, own_before: int = 0
) -> str | None:
    """A "machine busy" flag when the load average before a CPU measurement, or after it less
    the measurement's own ``threads``, says other processes competed for the cores.

    ``own_before`` is the thread count of a measurement of this same process that ran just
    before (the 1-minute average still holds about that much of it).
    """
    before_others = None if before is None else before - own_before
    after_others = None if after is None else after - threads
    if not (busy(before_others, threads) or busy(after_others, threads)):
        return None
    return (
        f"machine busy: 1-min load average {before:.1f} before the run, {after:.1f} after, "
        f"{os.cpu_count()} cores, {threads} thread(s)"
    )


def advice(threads: int, device: str) -> str:
    """What to do about a flagged run, given the flags it ran with."""
    if device != "cpu":
        return "re-run when the GPU is idle"
    if threads > 1:
        return "re-run when the machine is idle, or use --threads 1 (CPU-time ratios are steadier)"
    return "re-run when the machine is idle (e.g. pinned with taskset to a free core)"


def parse_table_flags(
    argv: list[str] | None,
    description: str,
    counts: dict[str, tuple[int, str]],
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The flags of the small single-table scripts in ``benchmarks/``: ``--threads`` (default
    1), the positive counts given as ``{"--flag": (default, help)}``, ``--json FILE`` and
    ``--overwrite``, all checked before any work (a bad one exits 2 with a usage error), and
    whatever ``more(parser)`` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    for flag, (default, text) in counts.items():
        parser.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    if more is not None:
        more(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    _io.add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    try:
        for flag in ("--threads", *counts):
            check_positive_int(flag, getattr(args, flag.lstrip("-").replace("-", "_")))
        _io.check_output_path(args.json, "--json", overwrite=args.overwrite)
    except ValueError as error:
        parser.error(str(error))
    return args


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of already formatted cells: the first column left-aligned, the others
    right-aligned (the small single-table scripts' ``format_rows``)."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(
    measure: Callable[[], list[dict]],
    threads: int,
    header: str,
    table: Callable[[list[dict]], str],
    json_path: str | None = None,
) -> list[dict]:
    """Run ``measure`` on ``threads`` torch threads; print ``header`` with the load averages
    around it, an UNRELIABLE line when they say other processes competed, and ``table(rows)``;
    write the rows and that load record to ``json_path`` when given.  Returns the rows.

    The frame of the small single-table scripts in ``benchmarks/`` (compile, overhead)."""
    load = load_average()
    with torch_threads(threads):
        rows = measure()
    after = load_average()
    print(f"{header}; load average before {load}, after {after}")
    flag = load_flag(load, after, threads)
    if flag:
        print(f"UNRELIABLE ({flag}): not a result; rerun on a quiet machine.")
    print(table(rows))
    if json_path:
        record = {"load_average_before": load, "load_average_after": after, "flag": flag}
        _io.write_json(json_path, {**record, "rows": rows})
    return rows


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_average() -> float | None:
    """The 1-minute load average (other processes' load), or ``None`` where unavailable."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set PyTorch's own CPU kernels use (``AVX512``, ``AVX2``, …): a
    sigmoid pass, the benchmarks' yardstick, is faster with wider vectors."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if callable(get) else "unknown"


def environment(threads: int) -> dict[str, Any]:
    """What a benchmark ran on: versions, CPU (and PyTorch's vector width), threads, time."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    unit: str,
    repeats: tuple[int, int],
    budget: tuple[float, float],
    quick_help: str,
) -> None:
    """The flags every ``gradkit bench`` command shares.

    ``repeats`` and ``budget`` are the (default, ``--quick``) values shown in the help; ``unit``
    names what one measurement is of ("shape", "case").
    """
    parser.add_argument("--json", metavar="FILE", help="also write the results JSON to FILE")
    parser.add_argument(
        "--out", metavar="DIR", help="run folder for results.json and the plot (default: runs/…)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the measurement (default: the machine's cores)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"max timed calls per method (default {repeats[0]}; quick {repeats[1]})",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds per method and {unit} that set its repeats "
        f"(default {budget[0]:g}; quick {budget[1]:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    _io.add_overwrite_argument(parser)
