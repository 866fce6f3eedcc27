"""Text output of ``gradkit align``: markdown tables and the printed run summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .experiment import SETTING_KEYS, AlignmentSummary

__all__ = ["cell", "describe", "markdown", "print_run_summary"]

# Distances always printed in the summary table of a deep network (all are in the JSON).
_SHOWN_DISTANCES = 12


def _distances_shown(depth: int) -> list[int]:
    """All distances for shallow nets; for deep ones 1–5, a few in between and L−1."""
    last = depth - 1
    if last <= _SHOWN_DISTANCES:
        return list(range(1, depth))
    picks = set(range(1, 6)) | {last}
    picks |= {round(v) for v in np.linspace(5, last, _SHOWN_DISTANCES - 5).tolist()}
    return sorted(picks)


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[cell(c) for c in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    lines = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–"  # e.g. the last layer has no distant gradient
    if isinstance(value, float):
        # Cosines print as fixed decimals (0.000 reads as "nothing"); big norms as 3 digits.
        if abs(value) >= 1e3:
            return f"{value:.3g}"
        return f"{value:.3f}" if round(value, 3) != 0 else "0.000"  # never "-0.000"
    return str(value)


def describe(setting: dict) -> str:
    return ", ".join(f"{k}={cell(setting[k])}" for k in SETTING_KEYS)


def print_run_summary(result: dict, n_seeds: int) -> None:
    """Print the by-distance table, the positive-pair counts and the per-layer table."""
    summary: AlignmentSummary = result["summary"]
    depth = summary.depth
    print(f"gradkit align: {describe(result['setting'])}, seeds={n_seeds}")
    shown = _distances_shown(depth)
    print()
    print(_distance_table(summary, result["decomposition"], shown))
    if len(shown) < depth - 1:
        print(f"({len(shown)} of {depth - 1} distances shown; all are in alignment.json)")
    pairs = depth * (depth - 1) // 2
    print()
    print(f"mean cosine over all pairs: {summary.mean_cosine:.3f}")
    print(f"positive pairs: {summary.fraction_positive_pairs:.1%} of {pairs}×{n_seeds}")
    print(
        f"seeds with all {pairs} pairs positive: {summary.fraction_all_positive:.0%} "
        f"({round(summary.fraction_all_positive * n_seeds)}/{n_seeds})"
    )
    if result["per_layer"]:
        print()
        print("per layer (seed means):")
        print(_layer_table(result["per_layer"], depth))
    print(f"\n{n_seeds} seeds in {result['seconds']:.1f}s")


def _distance_table(summary: AlignmentSummary, decomposition: dict | None, shown) -> str:
    band = summary.band_by_distance
    rows = [
        (d, summary.mean_by_distance[d - 1], band["p05"][d - 1], band["p95"][d - 1]) for d in shown
    ]
    header = ["j−i", "mean cos", "5 %", "95 %"]
    if decomposition is not None:
        # The four terms add up to the mean cosine; ‖in‖/‖ex‖ is that of the distant gradient.
        terms = ("in_in", "in_ex", "ex_in", "ex_ex")
        header += ["in·in", "in·ex", "ex·in", "ex·ex"]
        ratio = decomposition.get("internal_external_norm_ratio")
        if ratio is not None:
            header.append("‖in‖/‖ex‖")
        rows = [
            (
                *row,
                *(decomposition[t][row[0] - 1] for t in terms),
                *(() if ratio is None else (ratio[row[0]],)),
            )
            for row in rows
        ]
    return markdown(header, rows)


# A cosine of a near-zero vector is noise, so the norms are printed next to it, and 1/√P is
# what two random P-dimensional directions give.
_LAYER_COLUMNS = {
    "num_params": "P_i",
    "local_norm": "‖local‖",
    "distant_norm": "‖distant‖",
    "global_norm": "‖global‖",
    "local_global_cosine": "cos(loc,glob)",
    "local_distant_cosine": "cos(loc,dist)",
    "random_baseline": "1/√P",
}


def _layer_table(per_layer: dict, depth: int) -> str:
    rows = []
    for i in range(depth):
        row: list[Any] = [i + 1]
        for key in _LAYER_COLUMNS:
            values = per_layer.get(key)
            value = None if values is None else float(np.asarray(values)[i])
            row.append(int(value) if key == "num_params" and value is not None else value)
        rows.append(row)
    return markdown(["i", *_LAYER_COLUMNS.values()], rows)
