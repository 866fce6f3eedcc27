"""A reproducible busy neighbour: one PyTorch process running small ops on 2 threads.

    python benchmarks/neighbour.py --seconds 60 &     # then time a lab command beside it

It multiplies 64×64 float32 matrices in a loop (the kind of small-op load another user's
training script puts on a shared machine) until ``--seconds`` have passed, then prints how
many products it did.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run [60]")
    parser.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    parser.add_argument("--size", type=int, default=64, help="matrix size [64]")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(args.size, args.size, generator=generator)
    b = torch.randn(args.size, args.size, generator=generator)
    end, count = time.perf_counter() + args.seconds, 0
    while time.perf_counter() < end:
        for _ in range(100):
            a = torch.tanh(a @ b)
        count += 100
    print(f"neighbour: {count} products of {args.size}×{args.size} in {args.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
