"""Plots of ``gradkit align``: the mean alignment matrix, cosine by distance, sweep curves.

All functions draw headless (``_io.pyplot``), write one PNG and return its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.ticker import MaxNLocator

from .._io import pyplot, save_figure

__all__ = ["plot_by_distance", "plot_matrix", "plot_sweep", "readable_log_axis"]


def plot_matrix(matrix: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """Heatmap of an ``L×L`` alignment matrix ``S[i, j]`` (NaN cells left blank).

    Rows are the layer ``i`` whose parameters ``φ_i`` the gradients are taken for, columns the
    loss ``ℓ_j``; layers are numbered from 1 as in the gist. The colour scale is symmetric
    around 0 so that negative alignment stands out, and spans the off-diagonal values (the
    diagonal ``S[i, i] = 1`` is drawn grey).
    """
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    depth = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    # Scale the colours to the off-diagonal cosines: the diagonal is 1 by definition and would
    # otherwise wash every distant pair out to the palest shade (it is drawn grey instead).
    off_diagonal = matrix[np.triu_indices(depth, k=1)]
    off_diagonal = off_diagonal[np.isfinite(off_diagonal)]
    values = off_diagonal if off_diagonal.size else matrix[np.isfinite(matrix)]
    limit = max(float(np.abs(values).max()) if values.size else 1.0, 1e-12)
    extent = (0.5, depth + 0.5, depth + 0.5, 0.5)
    diagonal = np.eye(depth, dtype=bool)
    image = ax.imshow(
        np.ma.masked_invalid(np.where(diagonal, np.nan, matrix)),
        cmap="RdBu_r",
        vmin=-limit,
        vmax=limit,
        extent=extent,
        interpolation="nearest",
    )
    # The diagonal (S[i, i] = 1, or NaN for a zero local gradient) in grey, off the colour scale.
    ax.imshow(
        np.ma.masked_invalid(np.where(diagonal & np.isfinite(matrix), 1.0, np.nan)),
        cmap=ListedColormap(["0.55"]),
        extent=extent,
        interpolation="nearest",
    )
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("cos(∂ℓ_i/∂φ_i, ∂ℓ_j/∂φ_i)")
    ax.set_xlabel("j (loss ℓ_j)")
    ax.set_ylabel("i (parameters φ_i)")
    ticks = _ticks(depth)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_title(_wrap("mean alignment matrix (diagonal = 1, grey)\n" + title), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def plot_by_distance(
    mean: Sequence[float],
    low: Sequence[float],
    high: Sequence[float],
    path: str | Path,
    *,
    baseline: float | None = None,
    title: str = "",
) -> Path:
    """Mean cosine ``S[i, i+d]`` against the distance ``d = j − i``, with a shaded band
    ``[low, high]`` (the 5–95 % quantiles), the zero line and the random baseline ``1/√P``."""
    plt = pyplot()
    distance = np.arange(1, len(mean) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.fill_between(distance, low, high, alpha=0.25, color="C0", label="5–95 % of pairs")
    ax.plot(distance, mean, "o-", color="C0", markersize=3, label="mean")
    ax.axhline(0.0, color="black", linewidth=0.8)
    if baseline is not None:
        ax.axhline(baseline, color="C3", linestyle="--", linewidth=1, label="random 1/√P")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("distance j − i")
    ax.set_ylabel("cos(local, distant)")
    ax.set_title(_wrap(title), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def plot_sweep(
    curves: Sequence[Sequence[float]],
    labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    legend_title: str | None = None,
) -> Path:
    """One mean-cosine-by-distance curve per sweep setting, on shared axes.

    Many settings get a wider figure and the legend in columns below the axes, so the plot
    area keeps its size.
    """
    plt = pyplot()
    many = len(curves) > 8
    fig, ax = plt.subplots(figsize=(9.0, 6.0) if many else (7.5, 4.8))
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    markers = "os^vD<>"
    for k, (curve, label) in enumerate(zip(curves, labels, strict=True)):
        distance = np.arange(1, len(curve) + 1)
        ax.plot(
            distance,
            curve,
            marker=markers[k % len(markers)],
            markersize=3,
            color=cmap(k % cmap.N),
            label=label,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("distance j − i")
    ax.set_ylabel("mean cos(local, distant)")
    ax.set_title(_wrap(title), fontsize=9)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(
            title=legend_title,
            fontsize=7,
            title_fontsize=8,
            ncol=3,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12),
        )
    else:
        ax.legend(title=legend_title, fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def _ticks(depth: int) -> list[int]:
    step = max(1, int(np.ceil(depth / 10)))
    return list(range(1, depth + 1, step))


def _wrap(text: str, width: int = 90) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def _plain_number(value: float, _position=None) -> str:
    """``0.001``, ``0.5``, ``20``, ``3000``, ``2e+05``: what a reader expects on an axis."""
    return f"{value:g}"


def readable_log_axis(ax, axis: str = "y") -> None:
    """Log scale with plain-number tick labels (``0.01``, ``20``, ``3000``, not ``10^{-2}``).

    Within less than about two decades the 2× and 5× minor ticks are labelled too, so a
    short axis never shows a single label.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    if (ax.get_yscale() if axis == "y" else ax.get_xscale()) != "log":
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(LogLocator(base=10))
    target.set_major_formatter(FuncFormatter(_plain_number))
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if low > 0 and high / low < 100:
        target.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        target.set_minor_formatter(FuncFormatter(_plain_number))
    else:
        target.set_minor_formatter(NullFormatter())
