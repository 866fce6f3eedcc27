"""Alignment-matrix speed benchmark: ``python benchmarks/align.py [--quick] [--json FILE] ...``.

A thin wrapper around :mod:`gradkit.align.benchmark` (the same as ``gradkit bench align``);
``--help`` lists the flags.
"""

import sys

from gradkit.align.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
