"""The gist's internal/external analysis of the alignment, for every pair of layers.

For the square loss the cotangent of ``ℓ_j = ‖s_j − s_j*‖²`` at ``s_j`` splits into a part
that depends only on the network's own states and a part carried by the target::

    ∂ℓ_j/∂s_j = 2 s_j  +  (−2 s_j*)

Back-propagation is linear in the cotangent, so every gradient splits the same way:

    g_ij = ∂ℓ_j/∂φ_i = in_ij + ex_ij,
    in_ij = the gradient with the target set to zero (s_j* = 0): a function of the input only,
    ex_ij = g_ij − in_ij = −2 (s_j*)ᵀ-weighted vjp: the target-dependent part.

(The gist writes ``g = internal − external`` with ``external = +s*ᵀ x``; ours carries the
sign, so ``g = in + ex`` and the four cross terms below simply add up.) With
``a = g_ii`` (local) and ``b = g_ij`` (distant, ``j ≥ i``)::

    cos(a, b) = ⟨in_ii + ex_ii, in_ij + ex_ij⟩ / (‖g_ii‖‖g_ij‖)
              = in_in + in_ex + ex_in + ex_ex,
    in_in[i, j] = ⟨in_ii, in_ij⟩ / (‖g_ii‖‖g_ij‖),   in_ex = ⟨in_ii, ex_ij⟩ / (…),
    ex_in[i, j] = ⟨ex_ii, in_ij⟩ / (…),              ex_ex = ⟨ex_ii, ex_ij⟩ / (…),

normalised by the *full* gradients' norms, so the four terms sum to ``S[i, j]`` exactly
(up to rounding). First letter: the local gradient's part; second: the distant one's.
In a linear network ``⟨in_ii, in_ij⟩ = 4‖P W_i AᵀA‖² ≥ 0`` (``P = W_j⋯W_{i+1}``, ``A`` the
layer's input): the internal parts never disagree — the gist's explanation of the alignment.

Computed by the same single reverse sweep as :func:`gradkit.align.measure.alignment_report`
with two cotangent channels (internal, external) per loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .measure import (
    _check_inputs,
    _check_method,
    _cosine,
    _Grads,
    _inner,
    _reverse_sweep,
    _sq_norm,
)

__all__ = ["DECOMPOSITION_KEYS", "decomposition"]

DECOMPOSITION_KEYS = (
    "in_in",
    "in_ex",
    "ex_in",
    "ex_ex",
    "in_in_raw",
    "in_ex_raw",
    "ex_in_raw",
    "ex_ex_raw",
    "matrix",
    "grad_norms",
    "internal_norms",
    "external_norms",
)

_TERMS = (("in_in", 0, 0), ("in_ex", 0, 1), ("ex_in", 1, 0), ("ex_ex", 1, 1))


def _split_seed(s: Tensor, target: Tensor) -> Tensor:
    """The two cotangent channels of ``ℓ = ‖s − s*‖²``: internal ``2s``, external ``−2s*``."""
    return torch.stack([2 * s, -2 * target])


def _finish(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """Normalise the raw inner products by ``‖g_ii‖‖g_ij‖`` and mask below the diagonal."""
    sq_full = raw["sq_full"]
    n = sq_full.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    diag = torch.diagonal(sq_full).unsqueeze(1)
    out: dict[str, Tensor] = {}
    for name, _, _ in _TERMS:
        denom = torch.sqrt(diag * sq_full)
        value = raw[name] / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[name] = torch.where(upper & (denom > 0), value, math.nan)
    for name, _, _ in _TERMS:
        out[f"{name}_raw"] = torch.where(upper, raw[name], math.nan)
    full_dot = raw["in_in"] + raw["in_ex"] + raw["ex_in"] + raw["ex_ex"]
    out["matrix"] = torch.where(upper, _cosine(full_dot, diag, sq_full), math.nan)
    out["grad_norms"] = torch.where(upper, sq_full.sqrt(), math.nan)
    out["internal_norms"] = torch.where(upper, raw["sq_in"].sqrt(), math.nan)
    out["external_norms"] = torch.where(upper, raw["sq_ex"].sqrt(), math.nan)
    return out


def decomposition(
    layers: Sequence[nn.Module],
    x: Tensor,
    targets: Sequence[Tensor],
    *,
    method: str = "auto",
) -> dict[str, Tensor]:
    """Internal/external decomposition of every local–distant pair (module docstring).

    Args:
        layers, x, targets, method: as in :func:`gradkit.align.measure.alignment_report`.

    Returns:
        float64 ``(L, L)`` tensors, entries ``j ≥ i`` (NaN below the diagonal):

        * ``in_in``, ``in_ex``, ``ex_in``, ``ex_ex``: the normalised cross terms; they sum to
          ``matrix``. NaN where ``g_ii`` or ``g_ij`` is zero.
        * ``in_in_raw`` … ``ex_ex_raw``: the unnormalised inner products
          ``⟨in_ii, in_ij⟩`` etc.
        * ``matrix``: ``S[i, j] = cos(g_ii, g_ij)`` (the diagonal computed, ``1 ± rounding``).
        * ``grad_norms``, ``internal_norms``, ``external_norms``: ``‖g_ij‖``, ``‖in_ij‖``,
          ``‖ex_ij‖``.
    """
    _check_method(method)
    layers, params = _check_inputs(layers, x, targets)
    n = len(layers)
    raw = {
        name: torch.full((n, n), math.nan, dtype=torch.float64, device=x.device)
        for name in ("in_in", "in_ex", "ex_in", "ex_ex", "sq_in", "sq_ex", "sq_full")
    }

    def consume(i: int, grads: _Grads, num_params: int) -> None:
        # The stack is ordered (j, channel): even entries internal, odd external.
        parts = (grads[0::2], grads[1::2])
        for name, a, b in _TERMS:
            raw[name][i, i:] = _inner(parts[a][0], parts[b])
        raw["sq_in"][i, i:] = _sq_norm(parts[0])
        raw["sq_ex"][i, i:] = _sq_norm(parts[1])
        raw["sq_full"][i, i:] = _sq_norm(parts[0] + parts[1])

    _reverse_sweep(layers, params, x, targets, _split_seed, consume, method)
    return _finish({name: value.cpu() for name, value in raw.items()})
