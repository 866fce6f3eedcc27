"""Where and how the lab's commands compute: threads, device, progress lines.

Threads. The lab's matrices are small (a 100-wide layer, a batch of 50), so extra threads
buy little and cost a lot when the machine is shared: OpenMP threads spin while they wait,
and a neighbour's threads take the same cores. ``--threads auto`` (the default) therefore
means **1 thread** per process; parallel work comes from ``--jobs`` (one process per sweep
cell). ``--threads N`` asks for ``N``. The README gives the measurements behind this choice.

Device. ``--device cpu|cuda|auto``: ``auto`` is ``cuda`` when PyTorch sees a GPU, else
``cpu``. Networks, inputs and targets are drawn on the CPU (so every device sees the same
numbers) and then moved.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ._checks import choice, integer, one_of_or

__all__ = [
    "DEVICES",
    "Meter",
    "add_device_argument",
    "add_threads_argument",
    "environment",
    "resolve_device",
    "resolve_threads",
    "use_threads",
]

DEVICES = ("cpu", "cuda", "auto")
# The default of --threads auto: see the module docstring and the README's "Threads".
AUTO_THREADS = 1
THREADS = one_of_or(integer("--threads", 1, 1024), {"auto": None})


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N|auto`` (``auto``: :data:`AUTO_THREADS` per process)."""
    parser.add_argument(
        "--threads",
        type=THREADS.argtype(),
        default=None,
        metavar="N",
        help=f"PyTorch threads per process [default: auto = {AUTO_THREADS}: the lab's small "
        "matrices gain little from threads and lose much on a shared machine]",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda|auto``."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where to compute: cpu, cuda, or auto (cuda when available) [default: cpu]",
    )


def resolve_threads(threads: int | str | None) -> int:
    """The thread count for ``--threads`` (``None``/``"auto"`` → :data:`AUTO_THREADS`)."""
    value = THREADS.parse(threads)
    return AUTO_THREADS if value is None else value


def use_threads(threads: int | str | None) -> int:
    """Set PyTorch's intra-op thread count for this process; return it."""
    count = resolve_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` as a :class:`torch.device`; a clear error without CUDA."""
    text = "cpu" if name is None else str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: PyTorch sees no CUDA device here "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        return torch.device(text)
    return torch.device(choice("--device", DEVICES)(text))


class Meter:
    """Progress lines ``desc i/total  elapsed, eta`` on stderr, one per :meth:`step`.

    Plain lines (no carriage returns) read well in a terminal, a CI log and a job scheduler's
    output file alike.
    """

    def __init__(self, total: int, desc: str, *, stream=None, done: int = 0):
        self.total, self.desc, self.done = int(total), desc, int(done)
        self.stream = sys.stderr if stream is None else stream
        self._start, self._counted = time.perf_counter(), 0

    def step(self, count: int = 1, note: str = "") -> None:
        self.done += count
        self._counted += count
        elapsed = time.perf_counter() - self._start
        left = self.total - self.done
        eta = elapsed / self._counted * left if self._counted else float("nan")
        tail = f"  {note}" if note else ""
        print(
            f"{self.desc} {self.done}/{self.total}  {elapsed:7.1f}s elapsed, eta {eta:7.1f}s{tail}",
            file=self.stream,
            flush=True,
        )


def environment(device: torch.device | str = "cpu") -> dict:
    """The machine facts a result file records: versions, CPU, threads, load, device."""
    import numpy as np

    from . import _bench

    env = {**_bench.environment(torch.get_num_threads()), "numpy": np.__version__}
    device = torch.device(device) if not isinstance(device, torch.device) else device
    env["device"] = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
