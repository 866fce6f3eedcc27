"""The alignment experiment as a library: measure one setting, summarise over seeds.

For a random network ``s_i = h(s_{i-1}, φ_i)`` with layerwise targets ``s_i*`` and losses
``ℓ_i = ‖s_i − s_i*‖²``, every seed gives the alignment matrix

    S[i, j] = cos(∂ℓ_i/∂φ_i, ∂ℓ_j/∂φ_i),   j ≥ i   (the local gradient vs a distant one),

and :func:`summarize` reduces a stack of them: the mean and 5–95 % band of ``S[i, i+d]`` by
distance ``d = j − i``, the fraction of positive pairs, the fraction of seeds whose
``L(L−1)/2`` pairs are *all* positive. :func:`measure_setting` adds per-layer means and the
internal/external decomposition (the gist "Why Alignment?").

A *setting* is a dict of :data:`SETTING_KEYS`; :data:`CHECKS` validates each key (the
command line uses the same checks as its ``type=``). :func:`measure_cell` is one sweep cell
(a setting over its seeds) as a self-contained task for any executor (``gradkit._tasks``).
The command (flags, printing, files) is :mod:`gradkit.align.experiment_cli`.

    >>> setting = dict(depth=3, width=4, activation="linear", init="gaussian", gain=None,
    ...                bias=False, targets="iid", target_scale=1.0, batch=5)
    >>> result = measure_setting(setting, seeds=[0, 1])
    >>> len(result["summary"].mean_by_distance)
    2
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import _checks, _resources, _runtime
from .networks import ACTIVATIONS, INITS, default_gain, make_mlp
from .targets import TARGET_MODES, make_targets

__all__ = [
    "CHECKS",
    "DTYPES",
    "MAX_SEED",
    "SETTING_KEYS",
    "SWEEPABLE",
    "AlignmentSummary",
    "check_seeds",
    "check_setting",
    "estimate_bytes",
    "grid",
    "measure_cell",
    "measure_setting",
    "seeds_for",
    "summarize",
    "summary_json",
]

# The settings that define one measurement, in the order they are printed.
SETTING_KEYS = (
    "depth",
    "width",
    "activation",
    "init",
    "gain",
    "bias",
    "targets",
    "target_scale",
    "batch",
)
# Settings that take comma-separated lists in `gradkit align sweep`.
SWEEPABLE = ("depth", "width", "activation", "init", "gain", "targets", "target_scale", "batch")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Seed s draws from torch seeds 3s, 3s+1, 3s+2, which must fit a signed 64-bit integer.
MAX_SEED = (2**63 - 1) // 3 - 1


def _bias(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError("not a bool")


# "auto" keeps the activation's own default gain (√2 for rectifiers, else 1), which a sweep
# over activations needs: one number cannot be right for all of them.
CHECKS: dict[str, _checks.Check] = {
    "depth": _checks.integer("--depth", 2),
    "width": _checks.integer("--width", 1),
    "activation": _checks.choice("--activation", ACTIVATIONS),
    "init": _checks.choice("--init", INITS),
    "gain": _checks.one_of_or(_checks.number("--gain", above=0), {"auto": None, "default": None}),
    "bias": _checks.Check("--bias", "True or False", _bias),
    "targets": _checks.choice("--targets", TARGET_MODES),
    "target_scale": _checks.number("--target-scale", above=0),
    "batch": _checks.integer("--batch", 1),
    "seeds": _checks.integer("--seeds", 1),
    "first_seed": _checks.integer("--first-seed", 0, MAX_SEED),
}


def check_setting(setting: dict) -> dict:
    """``setting`` with every key of :data:`SETTING_KEYS` checked (the error names it)."""
    missing = [k for k in SETTING_KEYS if k not in setting]
    if missing:
        raise ValueError(f"setting lacks {', '.join(missing)}; it needs {', '.join(SETTING_KEYS)}")
    return {key: CHECKS[key](setting[key]) for key in SETTING_KEYS}


def check_seeds(first_seed: int, count: int) -> list[int]:
    """Seed indices ``first_seed … first_seed + count − 1``, all within ``[0, MAX_SEED]``."""
    first = CHECKS["first_seed"](first_seed)
    count = CHECKS["seeds"](count)
    if first + count - 1 > MAX_SEED:
        raise ValueError(
            f"--first-seed + --seeds − 1 must be ≤ {MAX_SEED}, got {first} + {count} − 1"
        )
    return list(range(first, first + count))


def grid(settings: dict[str, Sequence]) -> list[dict]:
    """Every combination of the setting values (cartesian product, first key slowest)."""
    keys = list(SETTING_KEYS)
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(settings[k] for k in keys))
    ]


def _resolved(setting: dict) -> dict:
    """``setting`` with ``gain=None`` replaced by the activation's default gain."""
    out = dict(setting)
    if out["gain"] is None:
        out["gain"] = default_gain(out["activation"])
    return out


# --------------------------------------------------------------------------- memory


def estimate_bytes(setting: dict, seeds: int, dtype: str = "float64", decompose: bool = True):
    """A generous estimate of the peak memory of :func:`measure_setting` and its JSON.

    Per layer of depth ``L``, width ``w`` and batch ``B``: weights ``w(w+1)``; states,
    targets and their cotangents ``3·L·B·w``; the stack of up to ``L`` cotangents carried by
    the reverse sweep (twice with the decomposition); the compressed gradients
    ``L·w·min(B, w+1)``; all doubled for autograd's temporaries. The ``L×L`` matrices of every
    seed are kept as float64 and written as JSON text (~60 bytes per number on the way).
    """
    depth, width, batch = setting["depth"], setting["width"], setting["batch"]
    item = DTYPES[dtype].itemsize
    channels = 2 if decompose else 1
    tensors = (
        depth * width * (width + 1)
        + 3 * depth * batch * width
        + 2 * channels * depth * batch * width
        + channels * depth * width * min(batch, width + 1)
    )
    matrices = depth * depth * (seeds + 4 * channels + 2)
    return int(2 * item * tensors + (8 + 60) * matrices)


def check_memory(setting: dict, seeds: int, dtype: str = "float64", decompose: bool = True):
    """Refuse (``ValueError``) a setting whose :func:`estimate_bytes` exceed free memory."""
    what = ", ".join(f"--{k} {setting[k]}" for k in ("depth", "width", "batch"))
    _resources.check_memory(
        estimate_bytes(setting, seeds, dtype, decompose), f"{what}, --seeds {seeds}"
    )


# --------------------------------------------------------------------------- measuring


def seeds_for(seed: int) -> dict[str, int]:
    """The network, input and target seeds of seed index ``seed`` (disjoint across indices)."""
    return {"network": 3 * seed, "inputs": 3 * seed + 1, "targets": 3 * seed + 2}


def _draw(setting: dict, seed: int, dtype: torch.dtype):
    """The network, inputs and targets of one seed, drawn on the CPU (same on every device)."""
    seeds = seeds_for(seed)
    layers = make_mlp(
        setting["depth"],
        setting["width"],
        setting["activation"],
        init=setting["init"],
        gain=setting["gain"],
        bias=setting["bias"],
        seed=seeds["network"],
        dtype=dtype,
    )
    generator = torch.Generator().manual_seed(seeds["inputs"])
    x = torch.randn(setting["batch"], setting["width"], generator=generator, dtype=torch.float64)
    x = x.to(dtype)
    targets = make_targets(
        layers, x, setting["targets"], scale=setting["target_scale"], seed=seeds["targets"]
    )
    return layers, x, targets


def _measure_one(
    setting: dict, seed: int, dtype: torch.dtype, decompose: bool, device: torch.device
) -> dict:
    """One random network, its inputs and targets; the alignment report (and decomposition)."""
    from .decompose import decomposition
    from .measure import alignment_report

    layers, x, targets = _draw(setting, seed, dtype)
    if device.type != "cpu":
        layers, x = layers.to(device), x.to(device)
        targets = [t.to(device) for t in targets]
    report = {k: _numpy(v) for k, v in alignment_report(layers, x, targets).items()}
    if decompose:
        report["decomposition"] = {
            k: _numpy(v) for k, v in decomposition(layers, x, targets).items()
        }
    return report


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float)):
        return np.asarray(value, dtype=np.float64)
    return value


@dataclass
class AlignmentSummary:
    """Statistics of a stack of alignment matrices ``S`` of shape ``(seeds, L, L)``.

    ``by_distance[d-1]`` pools ``S[s, i, i+d]`` over every seed ``s`` and layer ``i``:
    ``mean_by_distance`` is its mean, ``band_by_distance`` its 5 % and 95 % quantiles.
    """

    depth: int
    mean_by_distance: list[float]
    band_by_distance: dict[str, list[float]]
    mean_cosine: float
    fraction_positive_pairs: float
    fraction_all_positive: float
    positive_pairs_per_seed: list[int]
    mean_matrix: np.ndarray
    extras: dict = field(default_factory=dict)


def summarize(matrices: np.ndarray) -> AlignmentSummary:
    """Summarise alignment matrices ``(seeds, L, L)`` (upper triangle used, NaN elsewhere).

    * mean and 5/95 % quantiles of ``S[i, i+d]`` for each distance ``d = 1 … L−1``;
    * ``fraction_positive_pairs``: share of all ``(seed, i < j)`` pairs with ``S > 0``;
    * ``fraction_all_positive``: share of seeds whose ``L(L−1)/2`` pairs are all ``> 0``.
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2] or matrices.shape[1] < 2:
        raise ValueError(f"matrices must have shape (seeds, L, L) with L ≥ 2, got {matrices.shape}")
    depth = matrices.shape[1]
    # offsets[d-1] = values at distance d, shape (seeds, L-d).
    by_distance = [np.diagonal(matrices, offset=d, axis1=1, axis2=2) for d in range(1, depth)]
    rows, cols = np.triu_indices(depth, k=1)
    pairs = matrices[:, rows, cols]  # (seeds, L(L-1)/2)
    positive = pairs > 0
    return AlignmentSummary(
        depth=depth,
        mean_by_distance=[float(v.mean()) for v in by_distance],
        band_by_distance={
            "p05": [float(np.quantile(v, 0.05)) for v in by_distance],
            "p95": [float(np.quantile(v, 0.95)) for v in by_distance],
        },
        mean_cosine=float(pairs.mean()),
        fraction_positive_pairs=float(positive.mean()),
        fraction_all_positive=float(positive.all(axis=1).mean()),
        positive_pairs_per_seed=[int(n) for n in positive.sum(axis=1)],
        mean_matrix=matrices.mean(axis=0),
    )


def _decomposition_by_distance(decompositions: list[dict], depth: int) -> dict | None:
    """Mean of each decomposition term at each distance ``d = 1 … L−1`` (pooled like S).

    Also the median ratio ``‖in_ij‖/‖ex_ij‖`` at each distance ``d = 0 … L−1`` (``d = 0``:
    the local gradient itself). ``None`` when nothing was decomposed.
    """
    if not decompositions:
        return None
    out: dict = {"distance": list(range(1, depth))}
    rows, cols = np.triu_indices(depth, k=1)
    for term in ("in_in", "in_ex", "ex_in", "ex_ex"):
        stack = np.stack([np.asarray(d[term], dtype=np.float64) for d in decompositions])
        out[term] = [
            float(np.diagonal(stack, offset=d, axis1=1, axis2=2).mean()) for d in range(1, depth)
        ]
        out.setdefault("mean_over_pairs", {})[term] = float(stack[:, rows, cols].mean())
    if "internal_norms" in decompositions[0] and "external_norms" in decompositions[0]:
        # How big the target-free part of each gradient is against the target-carried part:
        # the cosine can only be driven by in·in when ‖in‖ is not small against ‖ex‖.
        ratio = np.stack(
            [
                np.asarray(d["internal_norms"]) / np.asarray(d["external_norms"])
                for d in decompositions
            ]
        )
        out["internal_external_norm_ratio"] = [
            float(np.median(np.diagonal(ratio, offset=d, axis1=1, axis2=2)))
            for d in range(0, depth)
        ]
    return out


_PER_LAYER_KEYS = (
    "num_params",
    "random_baseline",
    "local_norm",
    "distant_norm",
    "global_norm",
    "local_global_cosine",
    "local_distant_cosine",
    "local_distant_cosine_per_row",
)


def _per_layer(reports: list[dict]) -> dict:
    """Seed-mean of every per-layer vector of the reports (and the mean L×L grad norms)."""
    out = {}
    for key in _PER_LAYER_KEYS:
        if key in reports[0]:
            out[key] = np.mean([np.asarray(r[key], dtype=np.float64) for r in reports], axis=0)
    if "grad_norms" in reports[0]:
        out["grad_norms"] = np.mean([np.asarray(r["grad_norms"]) for r in reports], axis=0)
    return out


def measure_setting(
    setting: dict,
    seeds: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    decompose: bool = True,
    device: str | torch.device = "cpu",
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    keep_partial: bool = False,
) -> dict:
    """Measure one setting over ``seeds``; return matrices, summary, per-layer means, timing.

    ``setting`` holds :data:`SETTING_KEYS` (``gain=None``: the activation's default);
    ``device`` is ``cpu``, ``cuda`` or ``auto``; ``progress`` may wrap the seed iteration
    (e.g. to print a line per seed). With ``keep_partial``, Ctrl-C after at least one seed
    returns the summary of the finished seeds with ``"interrupted": True``. Returns
    ``{"setting", "matrices" (seeds, L, L), "summary" (:class:`AlignmentSummary`),
    "per_layer", "decomposition", "seconds", "seeds_done", "interrupted"}``.
    """
    setting = _resolved(check_setting(setting))
    device = _runtime.resolve_device(device)
    seed_iter = progress(seeds) if progress is not None else seeds
    reports, start, interrupted = [], time.perf_counter(), False
    try:
        for seed in seed_iter:
            reports.append(_measure_one(setting, seed, dtype, decompose, device))
    except KeyboardInterrupt:
        if not (keep_partial and reports):
            raise
        interrupted = True
    if not reports:
        raise ValueError("seeds must name at least one seed, got none")
    seconds = time.perf_counter() - start
    matrices = np.stack([np.asarray(r["matrix"], dtype=np.float64) for r in reports])
    summary = summarize(matrices)
    return {
        "setting": setting,
        "matrices": matrices,
        "summary": summary,
        "per_layer": _per_layer(reports),
        "decomposition": _decomposition_by_distance(
            [r["decomposition"] for r in reports if "decomposition" in r], summary.depth
        ),
        "seconds": seconds,
        "seeds_done": list(seeds)[: len(reports)],
        "interrupted": interrupted,
    }


def summary_json(result: dict) -> dict:
    """The summary part of a :func:`measure_setting` result as JSON-ready data."""
    summary: AlignmentSummary = result["summary"]
    return {
        "mean_by_distance": summary.mean_by_distance,
        "band_by_distance": summary.band_by_distance,
        "mean_cosine": summary.mean_cosine,
        "fraction_positive_pairs": summary.fraction_positive_pairs,
        "fraction_all_positive": summary.fraction_all_positive,
        "positive_pairs_per_seed": summary.positive_pairs_per_seed,
        "mean_matrix": summary.mean_matrix,
        "per_layer": result["per_layer"],
        "decomposition": result["decomposition"],
    }


def measure_cell(task: dict) -> dict:
    """One sweep cell as a self-contained task: the keys of :func:`measure_setting` as plain
    data (``setting``, ``seeds``, ``dtype`` name, ``decompose``, ``device``) plus ``threads``.

    Returns ``{"setting", **summary_json, "seconds"}`` (numpy arrays included; the caller
    writes it). Runs the same in this process, a spawned process or a Ray worker.
    """
    _runtime.use_threads(task.get("threads"))
    result = measure_setting(
        task["setting"],
        task["seeds"],
        dtype=DTYPES[task["dtype"]],
        decompose=task["decompose"],
        device=task.get("device", "cpu"),
    )
    return {"setting": result["setting"], **summary_json(result), "seconds": result["seconds"]}
