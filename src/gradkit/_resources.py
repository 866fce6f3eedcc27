"""How much memory a run may use: checked before the run, not discovered by the allocator.

Commands estimate the bytes their tensors need from their flags and call
:func:`check_memory` before any work starts, so a setting that cannot fit is refused at once
with the estimate and the limit, instead of swapping for minutes or ending in an allocator
traceback.

>>> check_memory(8 * 10**6, "--batch 1000 --width 1000")  # 8 MB: fine on any machine
>>> format_bytes(3 * 2**30)
'3.0 GiB'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory_bytes", "check_memory", "format_bytes"]

_CGROUP_V2 = Path("/sys/fs/cgroup")


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux ≥ 3.14), else ``None``."""
    try:
        with open(path, encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _psutil_available() -> int | None:
    try:
        import psutil  # optional
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _sysconf_available() -> int | None:
    """Free physical pages × page size (POSIX), a lower bound on what can be had."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_headroom(root: Path = _CGROUP_V2) -> int | None:
    """``memory.max − memory.current`` of this process's cgroup (v2), when it has a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((root / "memory.current").read_text().strip()), 0)
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int | None:
    """Bytes of memory a new allocation can get without swapping, or ``None`` if unknown.

    ``MemAvailable`` from ``/proc/meminfo``, else ``psutil`` if installed, else free pages
    from ``sysconf``; capped by a container's cgroup (v2) limit where one is set.
    """
    found = _meminfo_available()
    if found is None:
        found = _psutil_available()
    if found is None:
        found = _sysconf_available()
    headroom = _cgroup_headroom()
    if headroom is not None:
        found = headroom if found is None else min(found, headroom)
    return found


def format_bytes(count: float) -> str:
    """``count`` bytes in binary units: ``'512 B'``, ``'1.5 KiB'``, ``'3.0 GiB'``."""
    if count < 1024:
        return f"{int(count)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            break
    return f"{count:.1f} {unit}"


def check_memory(estimate_bytes: int, what: str, *, available: int | None = None) -> None:
    """Raise ``ValueError`` if ``estimate_bytes`` exceed the memory available now.

    ``what`` names the setting in the message (e.g. ``"--batch 10000000 --width 64"``).
    ``available`` overrides :func:`available_memory_bytes` (tests; a user-set limit).  Where
    the available memory is unknown, nothing is checked.  ``estimate_bytes`` must be a
    non-negative integer.
    """
    if isinstance(estimate_bytes, bool) or not isinstance(estimate_bytes, int):
        raise TypeError(f"estimate_bytes must be an int, got {type(estimate_bytes).__name__}")
    if estimate_bytes < 0:
        raise ValueError(f"estimate_bytes must be >= 0, got {estimate_bytes}")
    limit = available_memory_bytes() if available is None else available
    if limit is not None and estimate_bytes > limit:
        raise ValueError(
            f"{what} needs about {format_bytes(estimate_bytes)} of memory, but only "
            f"{format_bytes(limit)} is available; choose a smaller setting"
        )
