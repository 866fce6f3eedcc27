"""``gradkit align sweep``: every cell of a grid is a task; a finished cell is saved at once.

A *cell* is one setting measured over all seeds (:func:`gradkit.align.experiment.measure_cell`).
Cells run through :func:`gradkit._tasks.run_tasks` (serially, in ``--jobs`` local processes,
or on Ray), and the moment one finishes its result is written atomically to
``cells/<key>.json``, where ``key`` is a digest of the cell's task (setting, seeds, dtype,
decomposition). ``--resume`` reads back the cells whose task matches and runs only the rest;
Ctrl-C keeps every finished cell and says how to continue. The summary files are written when
every cell is there, from the cell files' data, so a resumed sweep writes exactly what an
uninterrupted one does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from .. import _io, _runtime, _tasks
from . import experiment as lab
from .experiment import SETTING_KEYS
from .experiment_text import cell, markdown

__all__ = ["cell_key", "cell_tasks", "load_finished", "run_sweep"]

_LABELS = {
    "cos_d1": "cos j−i=1",
    "cos_dmax": "cos j−i=L−1",
    "mean_cos": "mean cos",
    "fraction_positive_pairs": "pairs > 0",
    "fraction_all_positive": "seeds all > 0",
}


def cell_tasks(settings: dict[str, tuple], seeds: list[int], dtype: str, decompose: bool):
    """The task of every grid cell (what decides its numbers: no threads, no device)."""
    return [
        {"setting": setting, "seeds": seeds, "dtype": dtype, "decompose": decompose}
        for setting in lab.grid(settings)
    ]


def _plain(obj):
    """``obj`` as the JSON data a cell file holds (NaN → None, arrays → lists)."""
    return json.loads(json.dumps(_io.to_jsonable(obj), allow_nan=False))


def cell_key(task: dict) -> str:
    """A 16-hex-digit digest of ``task``: the file name of its cell."""
    text = json.dumps(_plain(task), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_finished(cells: Path, tasks: list[dict]) -> dict[int, dict]:
    """``{index: result}`` of the cells in ``cells`` whose stored task equals ``tasks[index]``.

    Unreadable or foreign files are ignored (their cells run again).
    """
    finished = {}
    for index, task in enumerate(tasks):
        path = cells / f"{cell_key(task)}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("task") == _plain(task) and "result" in data:
            finished[index] = data["result"]
    return finished


def _check(args: argparse.Namespace, settings: dict[str, tuple]) -> tuple[list, list[int]]:
    seeds = lab.check_seeds(args.first_seed, settings["seeds"][0])
    tasks = cell_tasks(settings, seeds, args.dtype, args.decompose)
    for task in tasks:
        lab.check_memory(task["setting"], len(seeds), args.dtype, args.decompose)
    _runtime.resolve_device(args.device)  # a missing GPU is an error before any work
    return tasks, seeds


def run_sweep(args: argparse.Namespace, settings: dict[str, tuple]) -> int:
    """Run (or resume) the sweep of ``settings`` and write its summary files."""
    tasks, seeds = _check(args, settings)
    swept = [k for k in SETTING_KEYS if len(settings[k]) > 1]
    fixed_text = _fixed_text(settings)
    overwrite = args.overwrite or args.resume
    with _io.run_folder("align-sweep", args.out, overwrite=overwrite) as out:
        results = load_finished(out / "cells", tasks) if args.resume else {}
        print(
            f"gradkit align sweep: {len(tasks)} settings × {len(seeds)} seeds; {fixed_text}",
            flush=True,
        )
        if args.resume:
            print(f"resuming: {len(results)} of {len(tasks)} cells already in {out / 'cells'}")
        _run_cells(args, tasks, results, swept, out)
        rows = [results[i] for i in range(len(tasks))]
        _write_outputs(args, settings, rows, swept, seeds, out)
    print(f"\nwrote {out / 'sweep.json'}, sweep.csv, sweep.md" + (", sweep.png" * args.plots))
    return 0


def _run_cells(args, tasks: list[dict], results: dict, swept: list[str], out: Path) -> None:
    """Run the unfinished cells; write each one as it finishes; say where on Ctrl-C."""
    todo = [i for i in range(len(tasks)) if i not in results]
    extra = {"threads": _runtime.resolve_threads(args.threads), "device": str(args.device)}
    runnable = [{**tasks[i], **extra} for i in todo]
    meter = _runtime.Meter(len(tasks), "align sweep cells", done=len(results))
    try:
        for j, result in _tasks.run_tasks(
            lab.measure_cell, runnable, jobs=args.jobs, executor=args.executor, address=args.address
        ):
            index = todo[j]
            data = {"task": _plain(tasks[index]), "result": _plain(result)}
            _io.write_json(out / "cells" / f"{cell_key(tasks[index])}.json", data)
            results[index] = data["result"]
            meter.step(note=", ".join(f"{k}={cell(result['setting'][k])}" for k in swept))
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(results)} of {len(tasks)} cells finished and saved in "
            f"{out / 'cells'}; to continue, run the same command with --resume --out {out}",
            file=sys.stderr,
            flush=True,
        )
        raise


def _fixed_text(settings: dict[str, tuple]) -> str:
    fixed = {k: settings[k][0] for k in SETTING_KEYS if len(settings[k]) == 1}
    return ", ".join(f"{k}={'auto' if v is None else cell(v)}" for k, v in fixed.items())


def _sweep_row(result: dict, swept: list[str]) -> dict:
    row = {k: result["setting"][k] for k in swept}
    by_distance = result["mean_by_distance"]
    row.update(
        cos_d1=by_distance[0],
        cos_dmax=by_distance[-1],
        mean_cos=result["mean_cosine"],
        fraction_positive_pairs=result["fraction_positive_pairs"],
        fraction_all_positive=result["fraction_all_positive"],
    )
    return row


def _write_outputs(args, settings, results: list[dict], swept, seeds, out: Path) -> None:
    rows = [_sweep_row(r, swept) for r in results]
    header = [*swept, *_LABELS.values()]
    table = markdown(header, [[row[k] for k in (*swept, *_LABELS)] for row in rows])
    print()
    print(table)
    fixed_text = _fixed_text(settings)
    _io.write_text(out / "sweep.md", f"Fixed: {fixed_text}; seeds={len(seeds)}.\n\n{table}\n")
    _io.write_csv(out / "sweep.csv", rows)
    config = {
        "grid": {k: list(settings[k]) for k in SETTING_KEYS},
        "swept": swept,
        "fixed": {k: settings[k][0] for k in SETTING_KEYS if len(settings[k]) == 1},
        "seeds": len(seeds),
        "seed_indices": seeds,
        "preset": args.preset,
        "dtype": args.dtype,
        "decompose": args.decompose,
        "device": str(args.device),
        "threads": _runtime.resolve_threads(args.threads),
        "jobs": args.jobs,
        "executor": args.executor,
    }
    json_rows = [
        {"setting": r["setting"], **_sweep_row(r, swept), **_without(r, "setting")} for r in results
    ]
    environment = _runtime.environment(_runtime.resolve_device(args.device))
    _io.write_json(
        out / "sweep.json", {"config": config, "rows": json_rows, "environment": environment}
    )
    if args.plots:
        from . import plots

        plots.plot_sweep(
            [r["mean_by_distance"] for r in results],
            [", ".join(cell(r["setting"][k]) for k in swept) or "setting" for r in results],
            out / "sweep.png",
            title=f"gradkit align sweep ({len(seeds)} seeds; {fixed_text})",
            legend_title=", ".join(swept) or None,
        )


def _without(result: dict, *keys: str) -> dict:
    return {k: v for k, v in result.items() if k not in keys}
