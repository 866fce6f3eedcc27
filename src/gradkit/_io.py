"""Small shared helpers for commands: run folders, JSON results, progress lines, plots.

Every command that produces results writes them through these helpers so that all of
gradkit's outputs look alike: a run folder, a JSON file with NaN written as ``null``,
and PNG plots drawn headless.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = ["new_run_dir", "progress", "pyplot", "save_figure", "to_jsonable", "write_json"]


def new_run_dir(command: str, out: str | Path | None = None) -> Path:
    """Return the folder a command writes into, creating it.

    ``out`` wins when given; otherwise a new folder ``runs/<command>-<YYYYmmdd-HHMMSS>``
    (with a numeric suffix if that already exists) under the current directory.
    """
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{command}-{stamp}"
    path, suffix = base, 1
    while path.exists():
        suffix += 1
        path = base.with_name(f"{base.name}-{suffix}")
    path.mkdir(parents=True)
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, tuples and non-finite floats into plain JSON data.

    NaN and ±inf become ``None`` (JSON ``null``): strict JSON has no NaN, and a reader
    should see "no value" rather than a string.
    """
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays/scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict, indented JSON (NaN → null) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def progress(items: Iterable[T], desc: str, total: int | None = None, stream=None) -> Iterator[T]:
    """Yield from ``items`` while printing ``desc i/total elapsed, eta`` lines to stderr.

    A dependency-free progress meter: one line per item, so it reads well both in a
    terminal and in a CI log.
    """
    stream = sys.stderr if stream is None else stream
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    start = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        elapsed = time.perf_counter() - start
        done = i + 1
        if total:
            eta = elapsed / done * (total - done)
            print(
                f"{desc} {done}/{total}  {elapsed:6.1f}s elapsed, eta {eta:6.1f}s",
                file=stream,
                flush=True,
            )
        else:
            print(f"{desc} {done}  {elapsed:6.1f}s elapsed", file=stream, flush=True)


def pyplot():
    """Return ``matplotlib.pyplot`` using the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 110, bbox_inches: str | None = None) -> Path:
    """Save ``fig`` as ``path`` (creating its folder), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches=bbox_inches)
    pyplot().close(fig)
    return path
