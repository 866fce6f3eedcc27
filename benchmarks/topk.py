"""Soft top-k speed benchmark: ``python benchmarks/topk.py [--json FILE] [--quick] ...``.

A thin wrapper around :mod:`gradkit.topk.benchmark` (the same as ``gradkit bench topk``);
``--help`` lists the flags.
"""

import sys

from gradkit.topk.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
