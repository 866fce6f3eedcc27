"""Mixture-of-experts routing comparison: ``python benchmarks/moe.py [--steps N] ...``.

A thin wrapper around :mod:`gradkit.topk.demo_moe` (the same as ``gradkit demo moe``).
"""

import sys

from gradkit.topk.demo_moe import main

if __name__ == "__main__":
    sys.exit(main())
