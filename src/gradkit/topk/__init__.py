"""Differentiable top-k: ``soft_topk`` (``p_i = σ((x_i − θ)/τ)``) and ``sparse_topk``
(``p_i = clip((x_i − θ)/τ, 0, 1)``), each with ``Σ p_i = k`` per slice."""

from ._ops import status
from .soft_topk import SoftTopK, soft_topk
from .sparse_topk import SparseTopK, sparse_topk

__all__ = ["SoftTopK", "SparseTopK", "soft_topk", "sparse_topk", "status"]
