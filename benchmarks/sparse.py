"""sparse_topk speed benchmark: ``python benchmarks/sparse.py [--quick] [--threads N] ...``.

A thin wrapper around :mod:`gradkit.topk.bench_sparse`; ``--help`` lists the flags.
"""

import sys

from gradkit.topk.bench_sparse import main

if __name__ == "__main__":
    sys.exit(main())
