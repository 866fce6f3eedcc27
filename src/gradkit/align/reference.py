"""The lab's measurements computed the obvious way: the oracles of the tests and the baseline
of ``gradkit bench align``.

One ``torch.autograd.grad`` per loss ``ℓ_j`` through one stored graph (``L`` backward
passes), every gradient ``g_ij = ∂ℓ_j/∂φ_i`` materialised and flattened, the global gradient by
its own backward of ``Σ_j ℓ_j``, each cosine computed on its own. Nothing here shares code with
the one-sweep computation of :mod:`gradkit.align.measure` beyond the argument checks (and the
grouping of :func:`~gradkit.align.networks.group_layers`) and the per-row layout rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .decompose import _TERMS, _finish
from .measure import REPORT_KEYS, _check_inputs, _check_target_shapes, _row_count
from .networks import forward_states

__all__ = [
    "alignment_matrix_naive",
    "alignment_report_naive",
    "decomposition_naive",
    "per_loss_gradients",
]


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return math.nan
    return max(-1.0, min(1.0, (torch.dot(a, b) / (na * nb)).item()))


def _flat(parts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in parts]).double()


def _losses(layers, x, targets) -> list[Tensor]:
    states = forward_states(layers, x.detach())
    targets = _check_target_shapes(states, targets)
    return [(s - t).pow(2).sum() for s, t in zip(states, targets, strict=True)]


def _loss_gradients(losses, params, j) -> list[list[Tensor]]:
    """``∂ℓ_j/∂φ_i`` per parameter for ``i = 0..j``, by one ``autograd.grad``."""
    wrt = [p for phi in params[: j + 1] for p in phi]
    g = torch.autograd.grad(losses[j], wrt, retain_graph=True, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, wrt, strict=True)]
    per_layer, k = [], 0
    for i in range(j + 1):
        per_layer.append(g[k : k + len(params[i])])
        k += len(params[i])
    return per_layer


def per_loss_gradients(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> list[list[list[Tensor] | None]]:
    """``grads[j][i]`` = per-parameter ``∂ℓ_j/∂φ_i`` (``None`` for ``i > j``), by one
    ``torch.autograd.grad`` per loss. ``layers`` is grouped as in the measurements."""
    layers, params = _check_inputs(layers, x, targets)
    with torch.enable_grad():
        losses = _losses(layers, x, targets)
        return [
            [*_loss_gradients(losses, params, j), *[None] * (len(layers) - j - 1)]
            for j in range(len(layers))
        ]


def alignment_matrix_naive(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> Tensor:
    """:func:`~gradkit.align.alignment_matrix` the obvious way (float64 ``(L, L)``, CPU).

    One ``torch.autograd.grad`` per loss ``ℓ_j`` (``L`` backward passes through the stored
    graph), every ``g_ij`` flattened and compared with the stored local gradient ``g_ii``.
    """
    layers, params = _check_inputs(layers, x, targets)
    n = len(layers)
    matrix = torch.full((n, n), math.nan, dtype=torch.float64)
    with torch.enable_grad():
        losses = _losses(layers, x, targets)
        local: list[Tensor] = []
        for j in range(n):
            for i, per_param in enumerate(_loss_gradients(losses, params, j)):
                flat = _flat(per_param)
                if i == j:
                    local.append(flat)
                    matrix[i, i] = 1.0 if flat.norm() > 0 else math.nan
                else:
                    matrix[i, j] = _cos(local[i], flat)
    return matrix


def _rows(per_param: Sequence[Tensor], shapes: Sequence[torch.Size]) -> Tensor:
    """The per-row layout written out directly: ``(R, c)`` rows of one layer's gradient."""
    rows_count = _row_count(shapes)
    if rows_count is None:
        return _flat(per_param).unsqueeze(0)
    parts = [
        t.reshape(rows_count, -1)
        for t, shape in zip(per_param, shapes, strict=True)
        if len(shape) >= 1 and shape[0] == rows_count
    ]
    return torch.cat(parts, dim=1).double()


def _row_cosine_mean(local: Sequence[Tensor], distant: Sequence[Tensor], shapes) -> float:
    a, b = _rows(local, shapes), _rows(distant, shapes)
    norms = a.norm(dim=1) * b.norm(dim=1)
    defined = norms > 0
    cosines = ((a * b).sum(1)[defined] / norms[defined]).clamp(-1, 1)
    return cosines.mean().item() if defined.any() else math.nan


def _pairs(losses, params, out) -> tuple[list, list, list]:
    """Fill ``matrix`` and ``grad_norms``; return local (flat, per parameter) and the distant
    sums ``d_i`` per parameter (``None`` for the last layer)."""
    n = len(params)
    local, local_parts, distant = [], [], [None] * n
    for j in range(n):
        for i, per_param in enumerate(_loss_gradients(losses, params, j)):
            flat = _flat(per_param)
            if i == j:
                local.append(flat)
                local_parts.append(per_param)
                out["matrix"][i, i] = 1.0 if flat.norm() > 0 else math.nan
            else:
                out["matrix"][i, j] = _cos(local[i], flat)
                distant[i] = (
                    list(per_param)
                    if distant[i] is None
                    else [d + t for d, t in zip(distant[i], per_param, strict=True)]
                )
            out["grad_norms"][i, j] = flat.norm().item()
    return local, local_parts, distant


def alignment_report_naive(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> dict[str, Tensor]:
    """:func:`~gradkit.align.alignment_report` computed the obvious way: one backward per
    loss, flattened gradients, the global gradient by its own backward of ``Σ_j ℓ_j``, cosines
    one by one. Same keys and layout (float64, CPU)."""
    layers, params = _check_inputs(layers, x, targets)
    n = len(layers)
    out = {
        key: torch.full((n, n) if key in ("matrix", "grad_norms") else (n,), math.nan)
        for key in REPORT_KEYS
    }
    out = {key: value.double() for key, value in out.items()}
    with torch.enable_grad():
        losses = _losses(layers, x, targets)
        global_grads = torch.autograd.grad(
            sum(losses), [p for phi in params for p in phi], retain_graph=True
        )
        local, local_parts, distant = _pairs(losses, params, out)
    k = 0
    for i in range(n):
        global_flat = _flat(global_grads[k : k + len(params[i])])
        k += len(params[i])
        out["local_global_cosine"][i] = _cos(local[i], global_flat)
        out["local_norm"][i] = local[i].norm().item()
        out["global_norm"][i] = global_flat.norm().item()
        out["num_params"][i] = local[i].numel()
        out["random_baseline"][i] = 1.0 / math.sqrt(local[i].numel())
        if distant[i] is not None:
            distant_flat = _flat(distant[i])
            out["local_distant_cosine"][i] = _cos(local[i], distant_flat)
            out["distant_norm"][i] = distant_flat.norm().item()
            shapes = [p.shape for p in params[i]]
            out["local_distant_cosine_per_row"][i] = _row_cosine_mean(
                local_parts[i], distant[i], shapes
            )
    return out


def decomposition_naive(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> dict[str, Tensor]:
    """:func:`~gradkit.align.decomposition` by brute force: ``in_ij`` from one backward per
    loss with zero targets, ``g_ij`` from one backward per loss with the real ones,
    ``ex_ij = g_ij − in_ij``."""
    layers, _ = _check_inputs(layers, x, targets)
    n = len(layers)
    full = per_loss_gradients(layers, x, targets)
    internal = per_loss_gradients(layers, x, [torch.zeros_like(t) for t in targets])
    raw = {
        name: torch.full((n, n), math.nan, dtype=torch.float64)
        for name in ("in_in", "in_ex", "ex_in", "ex_ex", "sq_in", "sq_ex", "sq_full")
    }
    for i in range(n):
        g_local, in_local = _flat(full[i][i]), _flat(internal[i][i])
        local_parts = (in_local, g_local - in_local)
        for j in range(i, n):
            g, in_ = _flat(full[j][i]), _flat(internal[j][i])
            distant_parts = (in_, g - in_)
            for name, a, b in _TERMS:
                raw[name][i, j] = torch.dot(local_parts[a], distant_parts[b]).item()
            raw["sq_in"][i, j] = torch.dot(in_, in_).item()
            raw["sq_ex"][i, j] = torch.dot(g - in_, g - in_).item()
            raw["sq_full"][i, j] = torch.dot(g, g).item()
    return _finish(raw)
