"""Measure how local and distant layer-loss gradients align in random deep networks.

For a random network ``s_i = h(s_{i-1}, φ_i)`` with layerwise targets ``s_i*`` and losses
``ℓ_i = ‖s_i − s_i*‖²``, every seed gives the alignment matrix

    S[i, j] = cos(∂ℓ_i/∂φ_i, ∂ℓ_j/∂φ_i),   j ≥ i   (the local gradient vs a distant one),

and the command summarises it over seeds: the mean and 5–95 % band of ``S[i, i+d]`` by
distance ``d = j − i``, the fraction of positive pairs, the fraction of seeds whose
``L(L−1)/2`` pairs are *all* positive, per-layer norms and local-vs-global cosines, and the
internal/external decomposition of each cosine (the gist "Why Alignment?").

    gradkit align --depth 20 --width 100 --activation linear --seeds 10
    gradkit align --preset achievable --width 100        # flags override the preset
    gradkit align sweep --activation linear,relu,tanh --width 30,100,300 --seeds 5

Values resolve as: explicit flag > ``--preset`` > defaults (``presets.ALIGN_DEFAULTS``).
In ``sweep`` mode the value flags take comma-separated lists and every combination runs.
Results: ``alignment.json``, ``alignment.png``, ``by_distance.png`` (run) or ``sweep.json``,
``sweep.csv``, ``sweep.md``, ``sweep.png`` (sweep) in ``--out`` (default ``runs/align-…``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import _bench, _io
from .networks import ACTIVATIONS, INITS, default_gain, make_mlp
from .presets import ALIGN_DEFAULTS, PRESETS
from .targets import TARGET_MODES, make_targets

__all__ = [
    "SETTING_KEYS",
    "SWEEPABLE",
    "AlignmentSummary",
    "add_arguments",
    "measure_setting",
    "resolve_settings",
    "run",
    "seeds_for",
    "summarize",
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
MODES = ("run", "sweep")
# Distances always printed in the summary table of a deep network (all are in the JSON).
_SHOWN_DISTANCES = 12


# --------------------------------------------------------------------------- parsing


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _parse_int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be an integer ≥ {minimum}; got {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be an integer ≥ {minimum}; got {value}")
        return value

    return parse


def _parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number > 0; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number > 0; got {text!r}")
    return value


def _parse_gain(text: str) -> float | None:
    # "auto" keeps the activation's own default gain (√2 for rectifiers, else 1), which a
    # sweep over activations needs: one number cannot be right for all of them.
    if text.strip().lower() in ("auto", "default", "none"):
        return None
    try:
        return _parse_positive_float(text)
    except ValueError:
        raise ValueError(f"must be a finite number > 0 or 'auto'; got {text!r}") from None


def _parse_choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return parse


_PARSERS: dict[str, Callable[[str], Any]] = {
    "depth": _parse_int(2),
    "width": _parse_int(1),
    "activation": _parse_choice(ACTIVATIONS),
    "init": _parse_choice(INITS),
    "gain": _parse_gain,
    "targets": _parse_choice(TARGET_MODES),
    "target_scale": _parse_positive_float,
    "batch": _parse_int(1),
    "seeds": _parse_int(1),
}


def _list_type(key: str) -> Callable[[str], tuple]:
    """argparse ``type=``: a comma-separated list of valid values for setting ``key``."""
    parse = _PARSERS[key]

    def convert(text: str) -> tuple:
        items = [item.strip() for item in str(text).split(",")]
        if any(not item for item in items):
            raise argparse.ArgumentTypeError(f"empty item in {text!r}")
        try:
            return tuple(parse(item) for item in items)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = key  # argparse names the type in some messages
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gradkit align [run|sweep]`` flags to ``parser``.

    Every value flag defaults to ``None`` so that :func:`resolve_settings` can tell an
    explicit flag from a preset value.
    """
    parser.add_argument(
        "mode",
        nargs="?",
        default="run",
        choices=MODES,
        help="run: one setting (default); sweep: every combination of comma-separated values",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="start from a named setting (explicit flags override it)",
    )
    defaults = ALIGN_DEFAULTS
    helps = {
        "depth": "number of layers L (≥ 2)",
        "width": "units per layer (the input x has the same width)",
        "activation": f"nonlinearity h: {', '.join(ACTIVATIONS)}",
        "init": f"weight init: {', '.join(INITS)}",
        "gain": "weight scale (W ~ N(0, gain²/fan_in)); 'auto' = the activation's default "
        "(√2 for relu/leaky_relu/kwta, else 1)",
        "targets": f"layer targets s_i*: {', '.join(TARGET_MODES)}",
        "target_scale": "standard deviation of iid/uncentered targets",
        "batch": "number of inputs x ~ N(0, I) summed in each loss",
        "seeds": "number of random networks (each with its own inputs and targets)",
    }
    for key, text in helps.items():
        default = defaults.get(key)
        shown = "auto" if key == "gain" and default is None else default
        parser.add_argument(
            _flag(key),
            type=_list_type(key),
            default=None,
            metavar=key.upper(),
            help=f"{text} [default: {shown}]",
        )
    parser.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"give every layer a bias (zero-initialised) [default: {defaults.get('bias')}]",
    )
    parser.add_argument(
        "--decompose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also split each cosine into internal/external terms (gist §'So what is going on')",
    )
    parser.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the PNG plots (--no-plots: JSON/CSV and the printed tables only)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float64",
        help="parameter dtype [default: float64, exact cosines]",
    )
    parser.add_argument(
        "--first-seed",
        type=_parse_first_seed,
        default=0,
        help="index of the first seed; seed s draws network, inputs, targets from 3s, 3s+1, 3s+2",
    )
    parser.add_argument(
        "--out", default=None, help="output folder [default: a new runs/align-<time>/]"
    )


def _parse_first_seed(text: str) -> int:
    try:
        return _parse_int(0)(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _as_values(key: str, raw: Any) -> tuple | None:
    """Normalise a flag value to a tuple of parsed values (``None`` = not given).

    Accepts what argparse produced (a tuple) but also plain scalars or strings, so that
    ``run`` can be called with a hand-made ``argparse.Namespace``.
    """
    if raw is None:
        return None
    if isinstance(raw, (tuple, list)):
        return tuple(raw)
    if isinstance(raw, str):
        try:
            return _list_type(key)(raw)
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{_flag(key)} {error}") from None
    return (raw,)


def resolve_settings(args: argparse.Namespace) -> dict[str, tuple]:
    """The value list of every setting: explicit flag > ``--preset`` > ``ALIGN_DEFAULTS``.

    Returns ``{key: (value, ...)}`` for :data:`SETTING_KEYS` plus ``seeds``; in run mode each
    tuple has exactly one value. ``gain`` may hold ``None`` (the activation's default).
    """
    mode = getattr(args, "mode", "run") or "run"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    base = dict(ALIGN_DEFAULTS)
    preset_name = getattr(args, "preset", None)
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got {preset_name!r}")
        base.update(PRESETS[preset_name])
    settings: dict[str, tuple] = {}
    for key in (*SETTING_KEYS, "seeds"):
        given = _as_values(key, getattr(args, key, None)) if key != "bias" else None
        if key == "bias":
            bias = getattr(args, "bias", None)
            given = None if bias is None else (bool(bias),)
        if given is None:
            value = base[key]
            settings[key] = (value,)
            continue
        if len(given) > 1:
            if mode == "run":
                listed = ",".join("auto" if v is None else str(v) for v in given)
                raise ValueError(
                    f"{_flag(key)} got {len(given)} values ({listed}); comma-separated lists "
                    f"are for `gradkit align sweep {_flag(key)} {listed} ...`"
                )
            if key not in SWEEPABLE:
                raise ValueError(f"{_flag(key)} takes one value, also in sweep mode")
        settings[key] = given
    return settings


def _grid(settings: dict[str, tuple]) -> list[dict]:
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


# --------------------------------------------------------------------------- measuring


def seeds_for(seed: int) -> dict[str, int]:
    """The network, input and target seeds of seed index ``seed`` (disjoint across indices)."""
    return {"network": 3 * seed, "inputs": 3 * seed + 1, "targets": 3 * seed + 2}


def _measure_one(setting: dict, seed: int, dtype: torch.dtype, decompose: bool) -> dict:
    """One random network, its inputs and targets; the alignment report (and decomposition)."""
    from .measure import alignment_report

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
    report = {k: _numpy(v) for k, v in alignment_report(layers, x, targets).items()}
    if decompose:
        from .decompose import decomposition

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
        raise ValueError(f"matrices must have shape (seeds, L, L) with L ≥ 2; got {matrices.shape}")
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
    the local gradient itself).
    """
    if not decompositions:
        return None
    out: dict[str, Any] = {"distance": list(range(1, depth))}
    for term in ("in_in", "in_ex", "ex_in", "ex_ex"):
        stack = np.stack([np.asarray(d[term], dtype=np.float64) for d in decompositions])
        out[term] = [
            float(np.diagonal(stack, offset=d, axis1=1, axis2=2).mean()) for d in range(1, depth)
        ]
        rows, cols = np.triu_indices(depth, k=1)
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
    progress: Callable | None = None,
) -> dict:
    """Measure one setting over ``seeds``; return matrices, summary, per-layer means, timing."""
    setting = _resolved(setting)
    seed_iter = progress(seeds) if progress is not None else seeds
    reports, start = [], time.perf_counter()
    for seed in seed_iter:
        reports.append(_measure_one(setting, seed, dtype, decompose))
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
    }


# --------------------------------------------------------------------------- printing


def _distances_shown(depth: int) -> list[int]:
    """All distances for shallow nets; for deep ones 1–5, a few in between and L−1."""
    last = depth - 1
    if last <= _SHOWN_DISTANCES:
        return list(range(1, depth))
    picks = set(range(1, 6)) | {last}
    picks |= {round(v) for v in np.linspace(5, last, _SHOWN_DISTANCES - 5).tolist()}
    return sorted(picks)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    lines = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
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


def _describe(setting: dict) -> str:
    return ", ".join(f"{k}={_cell(setting[k])}" for k in SETTING_KEYS)


def _print_run_summary(result: dict, n_seeds: int) -> None:
    summary: AlignmentSummary = result["summary"]
    depth = summary.depth
    print(f"gradkit align: {_describe(result['setting'])}, seeds={n_seeds}")
    shown = _distances_shown(depth)
    rows = [
        (
            d,
            summary.mean_by_distance[d - 1],
            summary.band_by_distance["p05"][d - 1],
            summary.band_by_distance["p95"][d - 1],
        )
        for d in shown
    ]
    decomposition = result["decomposition"]
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
    print()
    print(_markdown(header, rows))
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
    per_layer = result["per_layer"]
    if per_layer:
        # A cosine of a near-zero vector is noise, so the norms are printed next to it, and
        # 1/√P is what two random P-dimensional directions give.
        header = [
            "i",
            "P_i",
            "‖local‖",
            "‖distant‖",
            "‖global‖",
            "cos(loc,glob)",
            "cos(loc,dist)",
            "1/√P",
        ]
        keys = [
            "num_params",
            "local_norm",
            "distant_norm",
            "global_norm",
            "local_global_cosine",
            "local_distant_cosine",
            "random_baseline",
        ]
        layer_rows = []
        for i in range(depth):
            row: list[Any] = [i + 1]
            for key in keys:
                values = per_layer.get(key)
                value = None if values is None else float(np.asarray(values)[i])
                row.append(int(value) if key == "num_params" and value is not None else value)
            layer_rows.append(row)
        print()
        print("per layer (seed means):")
        print(_markdown(header, layer_rows))
    print(f"\n{n_seeds} seeds in {result['seconds']:.1f}s")


# --------------------------------------------------------------------------- commands


def _environment() -> dict:
    return {**_bench.environment(torch.get_num_threads()), "numpy": np.__version__}


def _result_json(result: dict) -> dict:
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


def _run_single(args: argparse.Namespace, settings: dict[str, tuple]) -> int:
    from . import plots

    setting = {k: settings[k][0] for k in SETTING_KEYS}
    n_seeds = settings["seeds"][0]
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    dtype = DTYPES[args.dtype]
    out = _io.new_run_dir("align", args.out)
    result = measure_setting(
        setting,
        seeds,
        dtype=dtype,
        decompose=args.decompose,
        progress=lambda s: _io.progress(s, "align seeds", total=len(seeds)),
    )
    _print_run_summary(result, n_seeds)
    summary: AlignmentSummary = result["summary"]
    config = {
        **result["setting"],
        "gain_requested": setting["gain"],
        "seeds": n_seeds,
        "seed_indices": seeds,
        "seed_streams": [seeds_for(s) for s in seeds],
        "preset": args.preset,
        "dtype": args.dtype,
        "decompose": args.decompose,
        "inputs": "x ~ N(0, I), shape (batch, width)",
        "loss": "ℓ_i = ‖s_i − s_i*‖², summed over batch and units",
    }
    payload = {
        "config": config,
        "matrices": [m for m in result["matrices"]],
        **_result_json(result),
        "distance": list(range(1, summary.depth)),
        "timing": {
            "seconds": result["seconds"],
            "seconds_per_seed": result["seconds"] / n_seeds,
        },
        "environment": _environment(),
    }
    _io.write_json(out / "alignment.json", payload)
    title = (
        f"{setting['activation']}, L={setting['depth']}, width={setting['width']}, "
        f"{setting['targets']} targets, batch={setting['batch']}, {n_seeds} seeds"
    )
    if getattr(args, "plots", True):
        plots.plot_matrix(summary.mean_matrix, out / "alignment.png", title=title)
        baseline = result["per_layer"].get("random_baseline")
        plots.plot_by_distance(
            summary.mean_by_distance,
            summary.band_by_distance["p05"],
            summary.band_by_distance["p95"],
            out / "by_distance.png",
            baseline=None if baseline is None else float(np.mean(baseline)),
            title=title,
        )
    written = "alignment.png, by_distance.png" if getattr(args, "plots", True) else "no plots"
    print(f"wrote {out / 'alignment.json'} ({written})")
    return 0


def _sweep_row(setting: dict, swept: Sequence[str], result: dict) -> dict:
    summary: AlignmentSummary = result["summary"]
    row = {k: setting[k] for k in swept}
    row.update(
        cos_d1=summary.mean_by_distance[0],
        cos_dmax=summary.mean_by_distance[-1],
        mean_cos=summary.mean_cosine,
        fraction_positive_pairs=summary.fraction_positive_pairs,
        fraction_all_positive=summary.fraction_all_positive,
    )
    return row


def _run_sweep(args: argparse.Namespace, settings: dict[str, tuple]) -> int:
    from . import plots

    grid = _grid(settings)
    swept = [k for k in SETTING_KEYS if len(settings[k]) > 1]
    fixed = {k: settings[k][0] for k in SETTING_KEYS if len(settings[k]) == 1}
    n_seeds = settings["seeds"][0]
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    dtype = DTYPES[args.dtype]
    out = _io.new_run_dir("align-sweep", args.out)
    fixed_text = ", ".join(f"{k}={'auto' if v is None else _cell(v)}" for k, v in fixed.items())
    print(f"gradkit align sweep: {len(grid)} settings × {n_seeds} seeds; {fixed_text}", flush=True)
    # One progress meter over every (setting, seed) measurement of the grid.
    meter = _io.progress(range(len(grid) * n_seeds), "align sweep", total=len(grid) * n_seeds)
    next(meter, None)  # prime: the meter prints when asked for the item after a finished one

    def advance(items: Sequence[int]):
        for item in items:
            yield item
            next(meter, None)

    results = [
        measure_setting(setting, seeds, dtype=dtype, decompose=args.decompose, progress=advance)
        for setting in grid
    ]
    rows = [_sweep_row(r["setting"], swept, r) for r in results]
    labels = {
        "cos_d1": "cos j−i=1",
        "cos_dmax": "cos j−i=L−1",
        "mean_cos": "mean cos",
        "fraction_positive_pairs": "pairs > 0",
        "fraction_all_positive": "seeds all > 0",
    }
    header = [*swept, *labels.values()]
    table = _markdown(header, [[row[k] for k in (*swept, *labels)] for row in rows])
    print()
    print(table)
    (out / "sweep.md").write_text(f"Fixed: {fixed_text}; seeds={n_seeds}.\n\n{table}\n")
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _io.write_json(
        out / "sweep.json",
        {
            "config": {
                "grid": {k: list(settings[k]) for k in SETTING_KEYS},
                "swept": swept,
                "fixed": fixed,
                "seeds": n_seeds,
                "seed_indices": seeds,
                "preset": args.preset,
                "dtype": args.dtype,
                "decompose": args.decompose,
            },
            "rows": [
                {
                    "setting": r["setting"],
                    **_sweep_row(r["setting"], swept, r),
                    **_result_json(r),
                    "seconds": r["seconds"],
                }
                for r in results
            ],
            "environment": _environment(),
        },
    )
    if getattr(args, "plots", True):
        plots.plot_sweep(
            [r["summary"].mean_by_distance for r in results],
            [", ".join(_cell(r["setting"][k]) for k in swept) or "setting" for r in results],
            out / "sweep.png",
            title=f"gradkit align sweep ({n_seeds} seeds; {fixed_text})",
            legend_title=", ".join(swept) or None,
        )
    print(f"\nwrote {out / 'sweep.json'}, sweep.csv, sweep.md, sweep.png")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``gradkit align`` (one setting) or ``gradkit align sweep`` (a grid)."""
    # A hand-made Namespace may carry only some flags: the rest take their CLI defaults.
    for name, default in (
        ("mode", "run"),
        ("preset", None),
        ("decompose", True),
        ("plots", True),
        ("dtype", "float64"),
        ("first_seed", 0),
        ("out", None),
    ):
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    if not (isinstance(args.first_seed, int) and args.first_seed >= 0):
        raise ValueError(f"--first-seed must be an integer ≥ 0; got {args.first_seed!r}")
    settings = resolve_settings(args)
    if getattr(args, "dtype", "float64") not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {args.dtype!r}")
    if (getattr(args, "mode", "run") or "run") == "sweep":
        return _run_sweep(args, settings)
    return _run_single(args, settings)
