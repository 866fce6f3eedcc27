"""Measure how local and distant layer-loss gradients align in random deep networks.

For a random network with layerwise targets, every seed gives the alignment matrix
``S[i, j] = cos(∂ℓ_i/∂φ_i, ∂ℓ_j/∂φ_i)`` (``j ≥ i``); the command summarises it over seeds by
distance ``j − i``, with the internal/external decomposition (the gist "Why Alignment?").
The measuring is the library :mod:`gradkit.align.experiment`; this module is the command.

    gradkit align --depth 20 --width 100 --activation linear --seeds 10
    gradkit align --preset achievable --width 100        # flags override the preset
    gradkit align sweep --activation linear,relu,tanh --width 30,100,300 --seeds 5
    gradkit align sweep ... --jobs 4 --out runs/big      # 4 local processes
    gradkit align sweep ... --resume --out runs/big      # skip the finished cells
    gradkit align sweep ... --executor ray --address HOST:6379   # on a Ray cluster

Values resolve as: explicit flag > ``--preset`` > defaults (``presets.ALIGN_DEFAULTS``).
In ``sweep`` mode the value flags take comma-separated lists and every combination (a
*cell*) runs; each finished cell is written at once to ``cells/<key>.json``.
Results: ``alignment.json``, ``alignment.png``, ``by_distance.png`` (run) or ``sweep.json``,
``sweep.csv``, ``sweep.md``, ``sweep.png`` (sweep) in ``--out`` (default ``runs/align-…``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch

from .. import _checks, _io, _runtime, _tasks
from . import experiment as lab
from .experiment import CHECKS, DTYPES, SETTING_KEYS, SWEEPABLE
from .experiment_text import print_run_summary
from .presets import ALIGN_DEFAULTS, PRESETS

__all__ = ["MODES", "add_arguments", "resolve_settings", "run"]

MODES = ("run", "sweep")
_HELPS = {
    "depth": "number of layers L (≥ 2)",
    "width": "units per layer (the input x has the same width)",
    "activation": "nonlinearity h: " + CHECKS["activation"].rule.removeprefix("one of "),
    "init": "weight init: " + CHECKS["init"].rule.removeprefix("one of "),
    "gain": "weight scale (W ~ N(0, gain²/fan_in)); 'auto' = the activation's default "
    "(√2 for relu/leaky_relu/kwta, else 1)",
    "targets": "layer targets s_i*: " + CHECKS["targets"].rule.removeprefix("one of "),
    "target_scale": "standard deviation of iid/uncentered targets",
    "batch": "number of inputs x ~ N(0, I) summed in each loss",
    "seeds": "number of random networks (each with its own inputs and targets)",
}


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
    _add_setting_arguments(parser)
    _add_output_arguments(parser)
    _add_execution_arguments(parser)


def _add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    for key, text in _HELPS.items():
        default = ALIGN_DEFAULTS.get(key)
        shown = "auto" if key == "gain" and default is None else default
        parser.add_argument(
            _checks.flag(key),
            type=CHECKS[key].argtype(many=True),
            default=None,
            metavar=key.upper(),
            help=f"{text} [default: {shown}]",
        )
    parser.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"give every layer a bias (zero-initialised) [default: {ALIGN_DEFAULTS['bias']}]",
    )
    parser.add_argument(
        "--decompose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also split each cosine into internal/external terms (gist §'So what is going on')",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float64",
        help="parameter dtype [default: float64, exact cosines; also on a GPU]",
    )
    parser.add_argument(
        "--first-seed",
        type=CHECKS["first_seed"].argtype(),
        default=0,
        help="index of the first seed; seed s draws network, inputs, targets from 3s, 3s+1, 3s+2",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the PNG plots (--no-plots: JSON/CSV and the printed tables only)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder [default: a new runs/align-<time>/]"
    )
    _io.add_overwrite_argument(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="sweep: continue the sweep in --out, skipping the cells already finished there",
    )


def _add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    _runtime.add_threads_argument(parser)
    _runtime.add_device_argument(parser)
    _tasks.add_jobs_argument(
        parser, "sweep: cells run in N local processes (or N CPUs of a local Ray)"
    )
    parser.add_argument(
        "--executor",
        choices=_tasks.EXECUTORS,
        default="local",
        help="sweep: local processes (default) or ray (pip install 'gradkit[ray]')",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="sweep with --executor ray: the cluster's address (default: a local Ray)",
    )


def _as_values(key: str, raw: Any) -> tuple | None:
    """Normalise a flag value to a tuple of parsed values (``None`` = not given).

    Accepts what argparse produced (a tuple) but also plain scalars or strings, so that
    ``run`` can be called with a hand-made ``argparse.Namespace``.
    """
    if raw is None:
        return None
    if isinstance(raw, (tuple, list)):
        return tuple(CHECKS[key].parse(v) for v in raw)
    if isinstance(raw, str):
        return tuple(CHECKS[key].parse(item) for item in raw.split(","))
    return (CHECKS[key].parse(raw),)


def resolve_settings(args: argparse.Namespace) -> dict[str, tuple]:
    """The value list of every setting: explicit flag > ``--preset`` > ``ALIGN_DEFAULTS``.

    Returns ``{key: (value, ...)}`` for :data:`SETTING_KEYS` plus ``seeds``; in run mode each
    tuple has exactly one value. ``gain`` may hold ``None`` (the activation's default).
    """
    mode = getattr(args, "mode", "run") or "run"
    _checks.choice("mode", MODES)(mode)
    base = dict(ALIGN_DEFAULTS)
    preset_name = getattr(args, "preset", None)
    if preset_name is not None:
        base.update(PRESETS[_checks.choice("--preset", tuple(PRESETS))(preset_name)])
    settings: dict[str, tuple] = {}
    for key in (*SETTING_KEYS, "seeds"):
        given = _as_values(key, getattr(args, key, None))
        settings[key] = (base[key],) if given is None else given
        if given is not None and len(given) > 1:
            _check_list_allowed(key, given, mode)
    return settings


def _check_list_allowed(key: str, given: tuple, mode: str) -> None:
    if mode == "run":
        listed = ",".join("auto" if v is None else str(v) for v in given)
        raise ValueError(
            f"{_checks.flag(key)} got {len(given)} values ({listed}); comma-separated lists "
            f"are for `gradkit align sweep {_checks.flag(key)} {listed} ...`"
        )
    if key not in SWEEPABLE:
        raise ValueError(f"{_checks.flag(key)} takes one value, also in sweep mode")


# --------------------------------------------------------------------------- run


def _run_config(args, setting: dict, result: dict, seeds: list[int]) -> dict:
    return {
        **result["setting"],
        "gain_requested": setting["gain"],
        "seeds": len(seeds),
        "seed_indices": seeds,
        "seed_streams": [lab.seeds_for(s) for s in seeds],
        "preset": args.preset,
        "dtype": args.dtype,
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "decompose": args.decompose,
        "inputs": "x ~ N(0, I), shape (batch, width)",
        "loss": "ℓ_i = ‖s_i − s_i*‖², summed over batch and units",
    }


def _run_single(args: argparse.Namespace, settings: dict[str, tuple]) -> int:
    setting = {k: settings[k][0] for k in SETTING_KEYS}
    seeds = lab.check_seeds(args.first_seed, settings["seeds"][0])
    lab.check_memory(setting, len(seeds), args.dtype, args.decompose)
    device = _runtime.resolve_device(args.device)
    with _io.run_folder("align", args.out, overwrite=args.overwrite) as out:
        result = lab.measure_setting(
            setting,
            seeds,
            dtype=DTYPES[args.dtype],
            decompose=args.decompose,
            device=device,
            progress=lambda s: _io.progress(s, "align seeds", total=len(seeds)),
            keep_partial=True,
        )
        if result["interrupted"]:
            _save_partial(args, setting, result, out)
        print_run_summary(result, len(seeds))
        summary = result["summary"]
        payload = {
            "config": _run_config(args, setting, result, seeds),
            "matrices": list(result["matrices"]),
            **lab.summary_json(result),
            "distance": list(range(1, summary.depth)),
            "timing": {
                "seconds": result["seconds"],
                "seconds_per_seed": result["seconds"] / len(seeds),
            },
            "environment": _runtime.environment(device),
        }
        _io.write_json(out / "alignment.json", payload)
        if args.plots:
            _plot_run(result, setting, len(seeds), out)
    written = "alignment.png, by_distance.png" if args.plots else "no plots"
    print(f"wrote {out / 'alignment.json'} ({written})")
    return 0


def _save_partial(args, setting: dict, result: dict, out) -> None:
    """On Ctrl-C: the summary of the finished seeds, marked partial; say where; re-raise."""
    done = result["seeds_done"]
    payload = {
        "complete": False,
        "config": _run_config(args, setting, result, done),
        "matrices": list(result["matrices"]),
        **lab.summary_json(result),
    }
    path = _io.write_json(out / "alignment.partial.json", payload)
    print(
        f"\ninterrupted: {len(done)} seeds finished; their summary is in {path}",
        file=sys.stderr,
        flush=True,
    )
    raise KeyboardInterrupt


def _plot_run(result: dict, setting: dict, n_seeds: int, out) -> None:
    from . import plots

    summary = result["summary"]
    title = (
        f"{setting['activation']}, L={setting['depth']}, width={setting['width']}, "
        f"{setting['targets']} targets, batch={setting['batch']}, {n_seeds} seeds"
    )
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


# --------------------------------------------------------------------------- run / sweep


_DEFAULTS = (
    ("mode", "run"),
    ("preset", None),
    ("decompose", True),
    ("plots", True),
    ("dtype", "float64"),
    ("first_seed", 0),
    ("out", None),
    ("overwrite", False),
    ("resume", False),
    ("threads", None),
    ("device", "cpu"),
    ("jobs", 1),
    ("executor", "local"),
    ("address", None),
)


def _check_mode_flags(args: argparse.Namespace) -> None:
    """Refuse sweep-only flags in run mode, and contradictory output flags."""
    if args.mode == "run":
        for name, flag, unused in (
            ("jobs", "--jobs", 1),
            ("executor", "--executor", "local"),
            ("address", "--address", None),
            ("resume", "--resume", False),
        ):
            if getattr(args, name) != unused:
                raise ValueError(f"{flag} is for `gradkit align sweep`, not a single run")
    if args.address is not None and args.executor != "ray":
        raise ValueError("--address is for --executor ray")
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR: the folder of the sweep to continue")
    if args.resume and args.overwrite:
        raise ValueError("--resume keeps finished cells and --overwrite discards them: pick one")
    _checks.choice("--dtype", tuple(DTYPES))(args.dtype)
    args.first_seed = CHECKS["first_seed"].parse(args.first_seed)
    args.jobs = _tasks.JOBS.parse(args.jobs)


def run(args: argparse.Namespace) -> int:
    """Run ``gradkit align`` (one setting) or ``gradkit align sweep`` (a grid)."""
    # A hand-made Namespace may carry only some flags: the rest take their CLI defaults.
    for name, default in _DEFAULTS:
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    _check_mode_flags(args)
    settings = resolve_settings(args)
    _runtime.use_threads(args.threads)
    if args.mode == "sweep":
        from .experiment_sweep import run_sweep

        return run_sweep(args, settings)
    return _run_single(args, settings)
