"""Time the lab's commands alone and beside a busy neighbour, for several thread counts.

    python benchmarks/load.py                      # all commands, --threads 1 and 2
    python benchmarks/load.py --threads 1 --repeats 3 --only align
    python benchmarks/load.py --compute-only     # gist20's measurement in this process

For each command and ``--threads`` value it runs the command as a fresh process (so the
time includes starting Python and importing torch, as a user sees it) ``--repeats`` times
alone, then as many times while ``benchmarks/neighbour.py`` (one PyTorch process running
small ops on 2 threads) runs beside it, and prints the median wall times and their ratio.
Output goes to a temporary folder that is removed afterwards.

``--compute-only`` times only ``measure_setting`` of ``gradkit align --preset gist20``
(10 seeds, with the decomposition) inside this process, alone and beside the neighbour,
alternating, so a changing background load hits both columns alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> gradkit arguments (each run gets its own --out).
COMMANDS = {
    "align": ["align", "--preset", "gist20", "--no-plots"],
    "sweep": [
        "align", "sweep", "--depth", "8", "--width", "30,100", "--activation", "linear,tanh",
        "--seeds", "3", "--no-plots",
    ],
    "train": ["train", "--preset", "achievable", "--seeds", "1", "--steps", "300",
              "--eval-every", "100"],
    "bench": ["bench", "align", "--quick", "--no-plot"],
}  # fmt: skip


def _time_once(argv: list[str], threads: str, folder: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=folder))
    command = [sys.executable, "-m", "gradkit", *argv, "--threads", threads, "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _median(argv, threads, folder, repeats, neighbour: bool) -> float:
    helper = _neighbour() if neighbour else None
    try:
        return statistics.median(_time_once(argv, threads, folder) for _ in range(repeats))
    finally:
        if helper is not None:
            helper.terminate()
            helper.wait()


def _neighbour() -> subprocess.Popen:
    helper = subprocess.Popen(
        [sys.executable, str(HERE / "neighbour.py"), "--seconds", "3600"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(3.0)  # let it import torch and start multiplying
    return helper


def _compute_only(thread_counts: list[int], repeats: int) -> None:
    import torch

    from gradkit.align.experiment import measure_setting
    from gradkit.align.presets import PRESETS

    setting = {k: v for k, v in PRESETS["gist20"].items() if k != "seeds"}

    def timed(threads: int) -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        measure_setting(setting, range(PRESETS["gist20"]["seeds"]))
        return time.perf_counter() - start

    timed(1)  # warm-up
    times: dict[tuple[int, bool], list[float]] = {}
    for _ in range(repeats):
        for threads in thread_counts:
            times.setdefault((threads, False), []).append(timed(threads))
            helper = _neighbour()
            try:
                times.setdefault((threads, True), []).append(timed(threads))
            finally:
                helper.terminate()
                helper.wait()
    for threads in thread_counts:
        alone = statistics.median(times[threads, False])
        loaded = statistics.median(times[threads, True])
        print(f"| gist20 measurement | {threads} | {alone:.1f} | {loaded:.1f} | "
              f"{loaded / alone:.2f}× |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma list of --threads values [1,2]")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement [3]")
    parser.add_argument("--only", default=",".join(COMMANDS), help="comma list of commands")
    parser.add_argument(
        "--compute-only", action="store_true", help="time gist20's measurement in-process"
    )
    args = parser.parse_args(argv)
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    print("| command | --threads | alone (s) | beside the neighbour (s) | ratio |")
    print("|---|--:|--:|--:|--:|")
    if args.compute_only:
        _compute_only([int(t) for t in args.threads.split(",")], args.repeats)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only.split(","):
            for threads in args.threads.split(","):
                alone = _median(COMMANDS[name], threads, Path(folder), args.repeats, False)
                loaded = _median(COMMANDS[name], threads, Path(folder), args.repeats, True)
                print(
                    f"| {name} | {threads} | {alone:.1f} | {loaded:.1f} | {loaded / alone:.2f}× |",
                    flush=True,
                )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
