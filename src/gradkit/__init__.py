"""gradkit: a fast, exact, robust differentiable top-k, and a gradient-alignment lab.

Top-k::

    >>> import torch, gradkit
    >>> p = gradkit.soft_topk(torch.randn(4, 10), k=3)   # rows sum to 3, p ∈ (0, 1)

Alignment lab: :mod:`gradkit.align` (random deep nets, layerwise targets, alignment matrices).
"""

from . import align
from .topk import SoftTopK, SparseTopK, soft_topk, sparse_topk

__version__ = "0.1.0"

__all__ = ["SoftTopK", "SparseTopK", "__version__", "align", "soft_topk", "sparse_topk"]
