"""Plumbing shared by gradkit's benchmarks: thread count, machine description, flag checks.

The measurements themselves stay next to the code they measure (``gradkit.topk.benchmark``,
``gradkit.align.benchmark``); this module only keeps their common frame identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import _io

__all__ = [
    "add_common_arguments",
    "check_positive_int",
    "cpu_model",
    "environment",
    "load_average",
    "torch_threads",
]


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer ≥ 1, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


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


def environment(threads: int) -> dict[str, Any]:
    """What a benchmark ran on: versions, CPU, thread count, time."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
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
