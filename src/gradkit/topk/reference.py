"""The seed blog post's soft top-k, kept as the baseline that gradkit is measured against.

This is the algorithm of the seed post ("可微TopK算子"), deliberately unoptimised so that
benchmarks compare against what the post actually does:

* forward: ``p_i = σ(x_i + t)`` per row, with the shift ``t`` found by **64 bisection
  steps** from the bracket ``[−max(x) − 10, −min(x) + 10]`` so that ``Σ_i p_i = k``;
* backward: ``v = σ'(x + t)`` computed by **per-element autograd**
  (``vmap(vmap(grad(sigmoid)))``), then the vector–Jacobian product with
  ``J = diag(v) − v vᵀ / Σ_j v_j``, i.e. ``∂L/∂x = u ⊙ v − (Σ_j u_j v_j) v / Σ_j v_j``
  for the upstream gradient ``u``.

The shift convention is the seed's: ``t = −θ`` where gradkit writes ``p = σ(x − θ)``.
Only a 2-D input ``(batch, n)`` reduced over dim 1 is supported, as in the seed, and there is
no temperature (``τ = 1``; scale ``x`` to emulate one).

Changes from the post, none of which alter the arithmetic: the input check raises
``ValueError`` instead of a bare ``assert`` (gradkit's rule for bad input), the shape is
checked, and names are spelled out. The seed ran unchanged on torch 2.13, so nothing else
needed fixing.

:func:`sparse_topk_reference` is the independent float64 oracle for :func:`gradkit.sparse_topk`:
a sort-based exact projection, one slice at a time in plain Python.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import Function
from torch.func import grad, vmap

__all__ = [
    "BISECTION_STEPS",
    "SeedTopK",
    "seed_find_shift",
    "seed_topk",
    "sparse_topk_reference",
]

#: Number of bisection steps in the seed's threshold search.
BISECTION_STEPS = 64

#: ``σ'`` by per-element autograd, exactly as the seed computes it (one ``grad`` per element,
#: vectorised by two ``vmap``s over the batch and the row).
_sigmoid_grad = vmap(vmap(grad(torch.sigmoid)))


class SeedTopK(Function):
    """The seed's ``TopK`` autograd Function: ``p = σ(x + t)`` with ``Σ p = k`` per row."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, k: int) -> torch.Tensor:
        shift, probabilities = seed_find_shift(xs, k)
        ctx.save_for_backward(xs, shift)
        return probabilities

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The vector–Jacobian product u ↦ uᵀJ with J = diag(v) − v vᵀ / Σv, v = σ'(x + t).
        xs, shift = ctx.saved_tensors
        v = _sigmoid_grad(xs + shift)
        v_sum = v.sum(dim=1, keepdim=True)
        uv = grad_output * v
        correction = -uv.sum(dim=1, keepdim=True) * v / v_sum
        return correction + uv, None


@torch.no_grad()
def seed_find_shift(xs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Find ``t`` (shape ``(batch, 1)``) with ``Σ_i σ(x_i + t) = k`` by the seed's bisection.

    The bracket puts every sigmoid near 0 at ``lo = −max(x) − 10`` and near 1 at
    ``hi = −min(x) + 10``; 64 halvings then shrink it below float resolution.

    Returns:
        ``(t, σ(x + t))``.
    """
    if xs.dim() != 2:
        raise ValueError(f"xs must be 2-D (batch, n) like the seed's, got shape {tuple(xs.shape)}")
    _, n = xs.shape
    if not 0 < k < n:
        raise ValueError(f"k must satisfy 0 < k < n = {n}, got {k}")
    lo = -xs.max(dim=1, keepdim=True).values - 10
    hi = -xs.min(dim=1, keepdim=True).values + 10
    for _ in range(BISECTION_STEPS):
        mid = (hi + lo) / 2
        total = torch.sigmoid(xs + mid).sum(dim=1)
        below = total < k
        lo[below] = mid[below]
        hi[~below] = mid[~below]
    shift = (lo + hi) / 2
    return shift, torch.sigmoid(xs + shift)


def seed_topk(xs: torch.Tensor, k: int) -> torch.Tensor:
    """The seed's soft top-k of each row of ``xs`` (shape ``(batch, n)``), ``0 < k < n``."""
    return SeedTopK.apply(xs, k)


def _project_sorted(s: list[float], k: float) -> float:
    """The threshold ``θ`` with ``Σ clip(s_i − θ, 0, 1) = k`` for ``s`` sorted descending and
    ``0 < k < len(s)``: scan the active sets (the top ``a`` entries at 1, ``s[a:b]`` free) and
    return the first consistent one's exact root."""
    prefix = [0.0]
    for value in s:
        prefix.append(prefix[-1] + value)
    size = len(s)
    for a in range(size + 1):
        for b in range(a, size + 1):
            if b == a:
                if a == k and (a == 0 or a == size or s[a - 1] - 1 >= s[a]):
                    return s[a] if a < size else s[a - 1] - 1
                continue
            if not 0 < k - a < b - a:  # the free entries' p (each in (0, 1)) sum to k − a
                continue
            theta = (math.fsum(s[a:b]) + a - k) / (b - a)
            slack = 1e-12 * (1 + abs(theta))
            if a > 0 and s[a - 1] - theta < 1 - slack:
                continue
            if s[a] - theta > 1 + slack or s[b - 1] - theta < -slack:
                continue
            if b < size and s[b] - theta > slack:
                continue
            return theta
    raise AssertionError(f"no consistent active set for k={k}, s={s}")


def _reference_slice(x: list[float], k: float, tau: float) -> list[float]:
    if any(math.isnan(v) for v in x):
        return [math.nan] * len(x)
    plus = sum(v == math.inf for v in x)
    finite = [v for v in x if math.isfinite(v)]
    budget = k - plus
    share = k / plus if plus > k else 1.0
    if budget <= 0 or budget >= len(finite):
        fill = 0.0 if budget <= 0 else 1.0
        return [share if v == math.inf else (fill if math.isfinite(v) else 0.0) for v in x]
    # About the ⌈budget⌉-th largest finite entry (the root lies within τ·(1 + gap) of it), so
    # that (v − pivot)/τ keeps the root's digits however large x/τ is.
    pivot = sorted(finite, reverse=True)[math.ceil(budget) - 1]
    shifted = [(v - pivot) / tau for v in finite]
    theta = _project_sorted(sorted(shifted, reverse=True), budget)
    return [
        1.0
        if v == math.inf
        else (min(max((v - pivot) / tau - theta, 0.0), 1.0) if v > -math.inf else 0.0)
        for v in x
    ]


def sparse_topk_reference(x: torch.Tensor, k, temperature=1.0) -> torch.Tensor:
    """Float64 reference for ``sparse_topk`` along the last dimension, slice by slice.

    ``p = clip(x/τ − θ, 0, 1)`` with ``Σp = k``, by scanning the active sets of the sorted
    slice (``O(n²)`` per slice: for tests).  ``k`` and ``temperature`` are numbers or tensors
    of shape ``x.shape[:-1]``.  Edge cases as documented for ``sparse_topk``.
    """
    x = x.detach().double()
    rows = x.reshape(-1, x.shape[-1]).tolist()
    batch = x.shape[:-1]
    ks = torch.as_tensor(k, dtype=torch.float64).detach().expand(batch).reshape(-1).tolist()
    taus = torch.as_tensor(temperature, dtype=torch.float64).detach().expand(batch)
    taus = taus.reshape(-1).tolist()
    out = [_reference_slice(row, kk, tt) for row, kk, tt in zip(rows, ks, taus, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)
