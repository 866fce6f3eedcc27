"""Small shared helpers for commands: run folders, atomic result files, progress lines, plots.

Every command that produces results writes them through these helpers so that all of
gradkit's outputs look alike and none is lost:

* a run folder per run (:func:`new_run_dir`, :func:`run_folder`): an existing non-empty
  ``--out`` is refused unless ``overwrite=True``; a failed or interrupted run leaves no empty
  folder, or an ``INCOMPLETE.json`` marker saying what happened;
* every file (JSON, CSV, text, PNG) is written to a temporary file in the same folder and
  renamed into place, so a reader sees the old file or the new one, never a torn one, and a
  failed write leaves the old file intact and no temporary file behind;
* output paths are checked before the long work starts (:func:`check_output_path`), with a
  ``ValueError`` that names the flag.

JSON is strict: NaN and ±inf are written as ``null``.  Plots are drawn headless.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import torch

T = TypeVar("T")

__all__ = [
    "INCOMPLETE",
    "add_overwrite_argument",
    "atomic_open",
    "check_out_dir",
    "check_output_path",
    "new_run_dir",
    "progress",
    "pyplot",
    "run_folder",
    "save_figure",
    "to_jsonable",
    "write_csv",
    "write_json",
    "write_text",
]

#: The marker a failed or interrupted run leaves in its (non-empty) run folder.
INCOMPLETE = "INCOMPLETE.json"


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` on success.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``; other keyword
    arguments go to :func:`open` (``newline=""`` for CSV).  The folder is created if needed.
    If the block raises (or the write fails: disk full, quota), the temporary file is removed
    and ``path`` keeps its old content.  The new file gets the usual ``0666 & ~umask`` mode.

    >>> with atomic_open(tmp / "notes.txt") as handle:  # doctest: +SKIP
    ...     handle.write("done\n")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); return the path."""
    with atomic_open(path) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict, indented JSON (NaN → null) atomically; return the path.

    The object is converted before the file is opened, so a value JSON cannot hold raises
    with the old file untouched.
    """
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_text(path, text)


def write_csv(
    path: str | Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None
) -> Path:
    """Write ``rows`` (dicts) as CSV with a header atomically; return the path.

    ``fieldnames`` defaults to the first row's keys (an empty ``rows`` needs them given).
    """
    if fieldnames is None:
        if not rows:
            raise ValueError("write_csv: no rows, so fieldnames must be given")
        fieldnames = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(path, newline="") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


# --------------------------------------------------------------------------- output paths


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (checked without following a final link)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _writable_folder(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_path(
    path: str | Path | None, arg: str = "--json", *, overwrite: bool = True
) -> Path | None:
    """Check that a file can be written at ``path`` before any long work starts.

    Returns ``path`` as a :class:`~pathlib.Path` (``None`` passes through).  Raises
    ``ValueError`` naming ``arg`` when ``path`` is a folder, lies below a file, or lies in a
    folder the user cannot write, or (with ``overwrite=False``) already exists.  Missing
    folders are fine (they are created at write time) and nothing is created here.

    >>> check_output_path("/etc/passwd/x.json")  # doctest: +SKIP
    ValueError: --json: cannot write /etc/passwd/x.json: /etc/passwd is a file, not a folder
    """
    if path is None:
        return None
    path = Path(path)
    if str(path) == "" or path.is_dir():
        raise ValueError(f"{arg}: {str(path)!r} is a folder; give a file name")
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise ValueError(f"{arg}: cannot write {path}: {folder} is a file, not a folder")
    if not _writable_folder(folder):
        raise ValueError(f"{arg}: cannot write {path}: no permission to write in {folder}")
    if not overwrite and os.path.lexists(path):
        raise ValueError(f"{arg}: {path} already exists; pass --overwrite to replace it")
    return path


def add_overwrite_argument(parser) -> None:
    """The ``--overwrite`` flag of every command that writes results (an ``argparse`` parser)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing non-empty --out folder / replace an existing output "
        "file (files of the same name are replaced; refused by default)",
    )


def check_out_dir(out: str | Path | None, *, overwrite: bool = False) -> Path | None:
    """Check an ``--out`` folder before any long work starts, creating nothing.

    ``None`` stands for the default ``runs/<command>-<time>`` folder: ``runs`` must then be
    creatable.  Raises ``ValueError`` naming ``--out`` when the folder is a file, lies below a
    file, cannot be written, or (unless ``overwrite``) already holds files;
    :func:`new_run_dir` makes the same checks.
    """
    if out is None:
        _check_out_folder(Path("runs") / "new", overwrite=False)
        return None
    _check_out_folder(Path(out), overwrite)
    return Path(out)


def _check_out_folder(path: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, lies below a file, is not writable or holds files."""
    if os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"--out: {path} is a file, not a folder")
    folder = _nearest_existing(path)
    if not folder.is_dir():
        raise ValueError(f"--out: cannot create {path}: {folder} is a file, not a folder")
    if not _writable_folder(folder):
        raise ValueError(f"--out: cannot write in {folder} (no permission)")
    if folder == path and not overwrite and any(path.iterdir()):
        raise ValueError(
            f"--out: {path} already holds files of an earlier run; choose a new folder, or "
            "pass --overwrite to write into it (files of the same name are replaced)"
        )


def _make_folder(path: Path, *, exist_ok: bool, arg: str = "--out") -> None:
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as error:
        raise ValueError(f"{arg}: cannot create {path}: {error.strerror or error}") from None


def new_run_dir(command: str, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Return the folder a command writes into, creating it.

    ``out`` wins when given: it must be a missing or empty folder, or ``overwrite=True``
    (files of the same name are then replaced, a stale ``INCOMPLETE.json`` is removed, other
    files stay).  Otherwise a new folder ``runs/<command>-<YYYYmmdd-HHMMSS>`` (with a numeric
    suffix if that exists, race-free) under the current directory.  Raises ``ValueError``
    naming ``--out`` for a folder that is a file, lies below a file, cannot be written, or
    holds files.
    """
    if out is not None:
        path = Path(out)
        _check_out_folder(path, overwrite)
        _make_folder(path, exist_ok=True)
        if overwrite:
            with contextlib.suppress(FileNotFoundError):
                (path / INCOMPLETE).unlink()
        return path
    base = Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out_folder(base.parent, overwrite=True)  # runs/ may hold earlier runs
    for suffix in range(1, 10_000):
        path = base if suffix == 1 else base.with_name(f"{base.name}-{suffix}")
        try:
            _make_folder(path, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"--out: too many runs named {base}-*; pass --out")


@contextlib.contextmanager
def run_folder(
    command: str, out: str | Path | None = None, *, overwrite: bool = False
) -> Iterator[Path]:
    """:func:`new_run_dir` as a context manager that marks a run that did not finish.

    On an exception (``KeyboardInterrupt`` included) inside the block, a folder that still
    holds nothing is removed (if this call created it); otherwise an ``INCOMPLETE.json``
    marker ``{"status": "failed" | "interrupted", "error": "...", "time": "..."}`` is written
    into it.  The exception is then re-raised.

    >>> with run_folder("align", args.out, overwrite=args.overwrite) as out:  # doctest: +SKIP
    ...     write_json(out / "alignment.json", payload)
    """
    created = out is None or not os.path.lexists(out)
    path = new_run_dir(command, out, overwrite=overwrite)
    try:
        yield path
    except BaseException as error:
        _mark_incomplete(path, error, created)
        raise


def _mark_incomplete(path: Path, error: BaseException, created: bool) -> None:
    """Remove an empty folder this run created, or leave the ``INCOMPLETE.json`` marker."""
    with contextlib.suppress(OSError):
        if not any(path.iterdir()):
            if created:
                path.rmdir()
            return
        interrupted = isinstance(error, KeyboardInterrupt)
        write_json(
            path / INCOMPLETE,
            {
                "status": "interrupted" if interrupted else "failed",
                "error": f"{type(error).__name__}: {error}".rstrip(": "),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )


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
    """Save ``fig`` as ``path`` atomically (creating its folder), close it, return the path.

    The format follows the file's suffix (PNG by default).
    """
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format=fmt, dpi=dpi, bbox_inches=bbox_inches)
    finally:
        pyplot().close(fig)
    return path
