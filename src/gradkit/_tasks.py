"""Run independent tasks serially, in local processes, or on a Ray cluster.

:func:`run_tasks` yields ``(index, result)`` as each task finishes, so the caller can write a
finished task's result at once (a sweep writes one file per cell). Every executor calls the
same module-level function on the same task, so results are the same as a serial run's:

* ``jobs=1`` (default): in this process, in order;
* ``jobs=N``: ``N`` local processes (``concurrent.futures`` with the ``spawn`` start method,
  so a worker never inherits a half-initialised PyTorch);
* ``executor="ray"``: Ray tasks; ``address=None`` starts a local Ray with ``jobs`` CPUs,
  ``address="HOST:PORT"`` (or ``"auto"``) joins a running cluster. Ray is the optional extra
  ``gradkit[ray]``.

Results travel back to the caller, which writes them: cluster nodes need no shared disk.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from ._checks import choice, integer

__all__ = ["EXECUTORS", "JOBS", "add_jobs_argument", "run_tasks"]

EXECUTORS = ("local", "ray")
#: ``--jobs``: how many tasks run at once (local processes, or the CPUs of a local Ray).
JOBS = integer("--jobs", 1, 4096)


def add_jobs_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--jobs N`` (default 1), checked by :data:`JOBS`; ``what``: what runs, N at a time."""
    parser.add_argument("--jobs", type=JOBS.argtype(), default=1, help=f"{what} [default: 1]")


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    jobs: int = 1,
    executor: str = "local",
    address: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(tasks[index]))`` in order of completion.

    ``fn`` must be a module-level function and each task picklable (for processes and Ray).
    Closing the iterator early (or Ctrl-C) cancels the tasks not yet started.
    """
    choice("--executor", EXECUTORS)(executor)
    if address is not None and executor != "ray":
        raise ValueError("--address is for --executor ray")
    if executor == "ray":
        return _ray(_import_ray(), fn, tasks, jobs, address)
    if jobs == 1 or len(tasks) <= 1:
        return ((i, fn(task)) for i, task in enumerate(tasks))
    return _processes(fn, tasks, jobs)


def _processes(fn, tasks, jobs: int) -> Iterator[tuple[int, Any]]:
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context)
    try:
        pending = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError(
            '--executor ray needs Ray, an optional extra: pip install "gradkit[ray]"'
        ) from None
    return ray


def _ray(ray, fn, tasks, jobs: int, address: str | None) -> Iterator[tuple[int, Any]]:
    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            options["num_cpus"] = jobs
        else:
            options["address"] = address
        ray.init(**options)
    try:
        remote = ray.remote(num_cpus=1)(fn)
        pending = {remote.remote(task): i for i, task in enumerate(tasks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
    finally:
        if started:
            ray.shutdown()
