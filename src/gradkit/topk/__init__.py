"""Differentiable top-k: ``p_i = σ((x_i − θ)/τ)`` with ``Σ p_i = k`` per slice."""

from ._ops import status
from .soft_topk import SoftTopK, soft_topk

__all__ = ["SoftTopK", "soft_topk", "status"]
