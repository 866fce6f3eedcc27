"""Where the fused kernel's shared library is built and cached, and when a cached one is trusted.

A shared library runs code inside the process that loads it (its constructors run at
``dlopen``), so nothing is loaded from a place another user can write, and nothing is loaded
that this process's user did not build:

* **folders**: ``$GRADKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradkit`` or
  ``~/.cache/gradkit``, else ``$TMPDIR/gradkit-<uid>``.  They are created with mode 0700 and
  used only if the current user owns them, no one else can write to them, and they are not
  symbolic links (checked with ``lstat``, as ssh checks its keys); their parents must not be
  writable by others either (unless sticky, like ``/tmp``).  When none qualifies, the
  library is built into a fresh private folder (``tempfile.mkdtemp``) and not cached.
* **files**: a library is loaded only if it is a regular file owned by the user, not
  writable by others, and its SHA-256 matches the digest recorded beside it
  (``<library>.sha256``, written atomically at build time, held to the same rules).
  Anything else (truncated, foreign, replaced) is rebuilt.
* **the compiler**: ``$CC`` (split like a shell: ``CC="gcc -m64"`` works) or ``cc``/``gcc``;
  each build step may take ``$GRADKIT_CC_TIMEOUT`` seconds (default 20).  A failed or hung
  build is remembered in the cache (``<library>.failed``, per compiler and source), so later
  processes fall back at once instead of waiting again; delete the file to retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "BuildError",
    "CompilerHang",
    "build",
    "build_from",
    "cache_folder",
    "compiler_command",
    "library_path",
    "read_failure",
    "remember_failure",
    "trust_problem",
    "verify",
]

SOURCE = Path(__file__).with_name("_native.c")
#: (-fno-math-errno: sqrt may set errno, a side effect that keeps GCC from vectorising a loop
#: calling it, and the ``optimize`` pragma in _native.c does not lift it; nothing reads errno.)
FLAGS = ["-O3", "-fPIC", "-std=c99", "-fno-math-errno"]
#: Build variants, tried in order.  "openmp": compiled with -fopenmp but linked against no
#: OpenMP library, so its parallel loops run on the OpenMP runtime PyTorch has already loaded
#: (torch's spinning worker threads would otherwise compete with threads of our own for the
#: same cores); it only loads where torch's runtime exports GOMP symbols.  "pthreads": its
#: own threads, anywhere.
VARIANTS = {"openmp": ["-fopenmp"], "pthreads": ["-pthread", "-fopenmp-simd"]}
DEFAULT_TIMEOUT_S = 20.0


class BuildError(RuntimeError):
    """The compiler ran and failed (its message attached)."""


class CompilerHang(BuildError):
    """The compiler did not finish within the timeout."""


# --------------------------------------------------------------------------- trust


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def trust_problem(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` may not be trusted (``None``: it may): checked with ``lstat``, so a
    symbolic link is refused rather than followed."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return f"{path}: {error.strerror or error}"
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if folder != stat.S_ISDIR(info.st_mode) or not (folder or stat.S_ISREG(info.st_mode)):
        return f"{path} is not a {'folder' if folder else 'regular file'}"
    uid = _uid()
    if uid is not None and info.st_uid != uid:
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {uid})"
    if info.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _parents_problem(folder: Path) -> str | None:
    """Whether another user could swap ``folder`` for another: a parent (resolved) writable
    by group or others without the sticky bit, or owned by someone other than root/us."""
    uid = _uid()
    if uid is None:
        return None
    chain = [Path(os.path.realpath(folder.parent))]
    chain += list(chain[0].parents)
    for parent in chain:
        info = os.stat(parent)
        if info.st_uid not in (0, uid):
            return f"{parent} (a parent) is owned by uid {info.st_uid}"
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return f"{parent} (a parent) is writable by group or others"
    return None


def _prepared(folder: Path) -> str | None:
    """Create ``folder`` (mode 0700) if missing; why it may not be used, or ``None``."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        return trust_problem(folder, folder=True) or _parents_problem(folder)
    except OSError as error:
        return f"{folder}: {error.strerror or error}"


def _candidates() -> list[Path]:
    if os.environ.get("GRADKIT_CACHE_DIR"):
        return [Path(os.environ["GRADKIT_CACHE_DIR"])]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = _uid() if _uid() is not None else "user"
    return [Path(base) / "gradkit", Path(tempfile.gettempdir()) / f"gradkit-{user}"]


def cache_folder() -> tuple[Path, bool, list[str]]:
    """``(folder, private, problems)``: the first trusted cache folder, or (``private``) a
    fresh folder of this process's own when none is; ``problems`` says why others were not
    used.  A private folder is the caller's to remove."""
    problems = []
    for folder in _candidates():
        problem = _prepared(folder)
        if problem is None:
            return folder, False, problems
        problems.append(problem)
    return Path(tempfile.mkdtemp(prefix="gradkit-kernel-")), True, problems


# --------------------------------------------------------------------------- compiler


def compiler_command() -> tuple[list[str] | None, str | None]:
    """``(argv, None)`` of the C compiler (``$CC`` split like a shell, else ``cc``/``gcc``),
    or ``(None, reason)``."""
    wanted = os.environ.get("CC", "").strip()
    if not wanted:
        found = shutil.which("cc") or shutil.which("gcc")
        if found is None:
            return None, "no C compiler found (install gcc or clang, or point CC at one)"
        return [found], None
    try:
        argv = shlex.split(wanted)
    except ValueError as error:
        return None, f"CC={wanted!r} cannot be split into words: {error}"
    found = shutil.which(argv[0])
    if found is None:
        return None, f"CC={wanted!r}: no executable {argv[0]!r} found"
    return [found, *argv[1:]], None


def _timeout() -> float:
    try:
        value = float(os.environ.get("GRADKIT_CC_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a library built for one CPU may not run on another
    (a cache directory shared over NFS), so the CPU is part of the cache key."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_identity(compiler: list[str]) -> str:
    """The compiler's argv and its executable's size and time: an upgrade gives a new key
    (without running ``cc --version``, which a broken compiler could hang on)."""
    try:
        info = os.stat(compiler[0])
        return f"{shlex.join(compiler)}\0{info.st_size}\0{info.st_mtime_ns}"
    except OSError:
        return shlex.join(compiler)


def library_path(folder: Path, compiler: list[str], variant: str, abi: int) -> Path:
    """The library's path in ``folder``: keyed by source, flags, compiler, CPU and platform."""
    parts = (
        SOURCE.read_text(encoding="utf-8"),
        " ".join(FLAGS + VARIANTS[variant]),
        _compiler_identity(compiler),
        _cpu_signature(),
        sys.platform,
        str(abi),
    )
    key = hashlib.sha256(b"\0".join(p.encode() for p in parts)).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return folder / f"topk_native_{variant}_{key}{suffix}"


# --------------------------------------------------------------------------- digests, markers


def _digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _sidecar(library: Path, kind: str) -> Path:
    return library.with_name(library.name + kind)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def verify(library: Path) -> str | None:
    """Why ``library`` may not be loaded (``None``: it may): missing, untrusted, or not
    the file whose digest was recorded when it was built."""
    if not os.path.lexists(library):
        return "not built yet"
    record = _sidecar(library, ".sha256")
    problem = trust_problem(library, folder=False) or trust_problem(record, folder=False)
    if problem is not None:
        return problem
    try:
        expected = record.read_text(encoding="ascii").strip()
        actual = _digest(library)
    except (OSError, UnicodeDecodeError) as error:
        return f"cannot read {library}: {error}"
    return None if actual == expected else f"{library} does not match its recorded digest"


def read_failure(library: Path) -> str | None:
    """The remembered build failure of ``library`` (a trusted marker file), or ``None``."""
    marker = _sidecar(library, ".failed")
    if not os.path.lexists(marker) or trust_problem(marker, folder=False):
        return None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return marker.read_text(encoding="utf-8").strip() or "failed"
    return None


def remember_failure(library: Path, message: str) -> None:
    """Record a failed build of ``library`` so later processes do not wait for it again."""
    with contextlib.suppress(OSError):
        _write_private(_sidecar(library, ".failed"), message + "\n")


# --------------------------------------------------------------------------- build


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a compiler step in its own process group, killed whole after ``timeout`` s."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=hasattr(os, "killpg"),
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise CompilerHang(f"{shlex.join(command[:1])} timed out after {timeout:g} s") from None
    except BaseException:  # Ctrl-C: no compiler left running in its own session
        _kill_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the compiler and whatever it started (a wrapper's children hold its pipes)."""
    with contextlib.suppress(OSError):
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    process.communicate()


def _compile(
    compiler: list[str],
    variant: str,
    scratch: Path,
    output: Path,
    source: Path = SOURCE,
    arches: tuple[list[str], ...] = (["-march=native"], []),
) -> None:
    """Compile ``source`` (the kernel's, unless a benchmark builds another revision of it)
    into ``output``, with the flags of :data:`FLAGS` and ``variant``; objects in ``scratch``.
    ``arches``: the target flags tried in turn (not every compiler knows -march=native; a
    test builds for another CPU than this one)."""
    objects = scratch / "topk.o"
    timeout, error = _timeout(), ""
    for arch in arches:
        steps = [
            [*compiler, *FLAGS, *arch, *VARIANTS[variant], "-c", str(source), "-o", str(objects)],
            [*compiler, "-shared", str(objects), "-o", str(output), "-lm", "-pthread"],
        ]
        for command in steps:
            result = _run(command, timeout)
            if result.returncode != 0:
                error = (result.stderr or result.stdout).strip()[-500:]
                break
        else:
            return
    raise BuildError(f"{shlex.join(compiler)} failed: {error}")


def build(compiler: list[str], variant: str, target: Path) -> None:
    """Compile ``_native.c`` into ``target`` with its digest beside it, both atomically.

    Raises :class:`BuildError` (:class:`CompilerHang` on a timeout) or ``OSError``.
    """
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        output = Path(scratch) / target.name
        _compile(compiler, variant, Path(scratch), output)
        os.chmod(output, 0o700)  # whatever the umask: no one else may write it
        digest = _digest(output)
        os.replace(output, target)
    _write_private(_sidecar(target, ".sha256"), digest + "\n")


def build_from(source: Path, folder: Path, name: str) -> Path:
    """Compile another revision of the kernel's source into ``folder`` (private, the caller's)
    as ``name``.so, as :func:`build` compiles the kernel (OpenMP, else pthreads), for the
    benchmark that compares two kernels.  Raises :class:`BuildError` or ``OSError``."""
    compiler, problem = compiler_command()
    if compiler is None:
        raise BuildError(problem or "no C compiler")
    output = folder / f"{name}.so"
    failure = BuildError("nothing built")
    for variant in VARIANTS:
        try:
            _compile(compiler, variant, folder, output, source)
            return output
        except BuildError as error:
            failure = error
    raise failure


def remove_private(folder: Path) -> None:
    """Remove a private build folder (the loaded library stays mapped)."""
    shutil.rmtree(folder, ignore_errors=True)
