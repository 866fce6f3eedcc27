"""Issue 10's reproducers for the kernel cache: no code from others, no crash from a bad cache.

The second local user is simulated without root: folders writable by group or others, files
writable by others, a symlinked folder, a library planted under the name the cache key gives.
Each test gets its own cache folder (``GRADKIT_CACHE_DIR`` / ``XDG_CACHE_HOME`` under
``tmp_path``) and a fresh loader (``_native._reset``).
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import pytest
import torch
from support import seeded_randn

from gradkit import soft_topk
from gradkit.topk import _kernel_cache, _native

COMPILER, _ = _kernel_cache.compiler_command()
pytestmark = [
    pytest.mark.skipif(COMPILER is None, reason="no C compiler"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes"),
]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A loader with no kernel yet, a private cache folder and a private temp folder."""
    for name in ("GRADKIT_NATIVE", "GRADKIT_CACHE_DIR", "XDG_CACHE_HOME", "GRADKIT_CC_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "cache"))
    _native._reset()
    yield tmp_path
    _native._reset()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A folder holding one kernel built (and verified) by the loader: tests that need a
    good cached library copy it instead of compiling again."""
    folder = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("GRADKIT_NATIVE", raising=False)
        patch.setenv("GRADKIT_CACHE_DIR", str(folder / "cache"))
        _native._reset()
        status = _native.status()
        _native._reset()
    if status != "in use":
        pytest.skip(f"the kernel does not build here: {status}")
    return folder / "cache"


def _cached(fresh, built):
    """``fresh``'s cache folder (mode 0700) holding a copy of the built library."""
    shutil.copytree(built, fresh / "cache")
    (fresh / "cache").chmod(0o700)
    (library,) = _libraries(fresh / "cache")
    return library


def _libraries(folder):
    return sorted(p for p in folder.glob("topk_native_*") if p.suffix in (".so", ".dylib"))


def _planted(tmp_path, folder, *, symbol=True):
    """A library another user drops under the exact names the cache key gives (with
    matching digests): its constructor would create ``tmp_path/pwned`` when loaded."""
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void run(void) {\n"
        f'  FILE *f = fopen("{tmp_path / "pwned"}", "w"); if (f) fclose(f); }}\n'
        + ("int gradkit_abi_version(void) { return -1; }\n" if symbol else "int other(void);\n")
    )
    built = tmp_path / "evil.so"
    subprocess.run([*COMPILER, "-shared", "-fPIC", str(source), "-o", str(built)], check=True)
    for variant in _kernel_cache.VARIANTS:
        target = _kernel_cache.library_path(folder, COMPILER, variant, _native._ABI_VERSION)
        target.write_bytes(built.read_bytes())
        digest = _kernel_cache._digest(target)
        (target.parent / (target.name + ".sha256")).write_text(digest + "\n")
    return tmp_path / "pwned"


def test_the_cache_folder_is_private_and_the_library_has_a_digest(fresh):
    assert _native.status() == "in use"
    folder = fresh / "cache"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (library,) = _libraries(folder)
    assert _kernel_cache.verify(library) is None
    assert not list((fresh / "tmp").iterdir())  # nothing left in the temp folder


@pytest.mark.parametrize("how", ["mode 0777", "group-writable", "symlink"])
def test_an_unsafe_cache_folder_is_never_loaded_from(fresh, how):
    folder = fresh / "cache"
    if how == "symlink":
        real = fresh / "elsewhere"
        real.mkdir(mode=0o700)
        folder.symlink_to(real)
        planted_in = real
    else:
        folder.mkdir()
        folder.chmod(0o777 if how == "mode 0777" else 0o770)
        planted_in = folder
    pwned = _planted(fresh, planted_in)
    status = _native.status()
    assert not pwned.exists(), "a library from an unsafe folder was loaded"
    assert status.startswith("in use (built in a private temporary folder, not cached: ")
    assert ("symbolic link" in status) == (how == "symlink")
    assert not list((fresh / "tmp").iterdir())  # the private build folder is removed


def test_a_cache_under_a_folder_others_can_write_falls_back_to_the_temp_folder(fresh, monkeypatch):
    monkeypatch.delenv("GRADKIT_CACHE_DIR")
    shared = fresh / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # another user could rename xdg/gradkit and put theirs in its place
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))
    assert _native.status().startswith("in use (built in ")
    temp_cache = fresh / "tmp" / f"gradkit-{os.getuid()}"
    assert stat.S_IMODE(temp_cache.stat().st_mode) == 0o700
    assert len(_libraries(temp_cache)) == 1


def test_a_temp_fallback_another_user_made_is_not_used(fresh, monkeypatch):
    # Reproducer 1: the victim's ~/.cache cannot be used, and someone else pre-created the
    # 0777 $TMPDIR/gradkit-<uid> with a library under the computed name.
    monkeypatch.delenv("GRADKIT_CACHE_DIR")
    home_cache = fresh / "xdg"
    home_cache.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home_cache))
    trap = fresh / "tmp" / f"gradkit-{os.getuid()}"
    trap.mkdir()
    trap.chmod(0o777)
    pwned = _planted(fresh, trap)
    assert _native.status().startswith("in use (built in a private temporary folder")
    assert not pwned.exists()
    assert soft_topk(seeded_randn(3, 7), 2).sum().item() == pytest.approx(6.0)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_a_folder_owned_by_another_user_is_not_used(fresh):
    folder = fresh / "cache"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, 12345)
    pwned = _planted(fresh, folder)
    status = _native.status()
    assert "owned by uid 12345" in status and not pwned.exists()


@pytest.mark.parametrize("which", ["library", "digest"])
def test_a_cached_file_others_can_write_is_rebuilt(fresh, built, which):
    library = _cached(fresh, built)
    victim = library if which == "library" else library.with_name(library.name + ".sha256")
    victim.chmod(0o666)
    _native._reset()
    assert _native.status() == "in use"
    assert stat.S_IMODE(library.stat().st_mode) & 0o022 == 0
    assert _kernel_cache.verify(library) is None


def test_a_foreign_library_without_a_matching_digest_is_rebuilt_not_loaded(fresh):
    folder = fresh / "cache"
    folder.mkdir(mode=0o700)
    pwned = _planted(fresh, folder)
    for record in folder.glob("*.sha256"):
        record.write_text("0" * 64 + "\n")  # the second variant of reproducer 1: file replaced
    assert _native.status() == "in use"
    assert not pwned.exists()
    assert _kernel_cache.verify(_libraries(folder)[0]) is None


def test_a_truncated_library_is_rebuilt_not_a_crash(fresh, built):
    # Reproducer 2: a library cut to >= 4 KB (interrupted copy, full disk) gave SIGBUS in
    # every later process.  A subprocess, so that a regression cannot kill the test run.
    library = _cached(fresh, built)
    size = library.stat().st_size
    with open(library, "r+b") as handle:
        handle.truncate(4096)
    code = (
        "import torch; from gradkit import soft_topk; from gradkit.topk import _native\n"
        "p = soft_topk(torch.randn(4, 9, generator=torch.Generator().manual_seed(0)), 3)\n"
        "print(round(float(p.sum()), 4)); print(_native.status())"
    )
    env = {**os.environ, "GRADKIT_CACHE_DIR": str(fresh / "cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["12.0", "in use"]
    assert library.stat().st_size == size


def test_a_library_without_the_abi_symbol_falls_back_with_a_reason(fresh):
    # Reproducer 3: it raised AttributeError, then "not in use: None".
    folder = fresh / "cache"
    folder.mkdir(mode=0o700)
    _planted(fresh, folder, symbol=False)
    x = seeded_randn(4, 9)
    p = soft_topk(x, 3)  # no exception
    status = _native.status()
    assert status.startswith("not in use: build or load failed: openmp: ")
    assert "has no gradkit_abi_version symbol" in status
    with _native.disabled():
        assert torch.equal(p, soft_topk(x, 3))


def _fake_compiler(tmp_path, body):
    script = tmp_path / "fake-cc"
    script.write_text(f"#!/bin/sh\necho run >> {tmp_path / 'calls'}\n{body}\n")
    script.chmod(0o755)
    return script


def _calls(tmp_path):
    calls = tmp_path / "calls"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_a_hanging_compiler_is_cut_short_and_remembered(fresh, monkeypatch):
    # Reproducer 4: a hanging compiler blocked every process's first call for 2 × 120 s.
    monkeypatch.setenv("CC", str(_fake_compiler(fresh, "exec sleep 60")))
    monkeypatch.setenv("GRADKIT_CC_TIMEOUT", "2")
    status = _native.status()
    assert "timed out after 2 s" in status and status.startswith("not in use")
    assert _calls(fresh) == 1  # the second variant is not tried: it would hang as well
    _native._reset()  # a later process
    status = _native.status()
    assert "remembered" in status and "timed out" in status
    assert _calls(fresh) == 1


def test_a_failing_compiler_is_remembered_per_compiler_and_source(fresh, built, monkeypatch):
    _cached(fresh, built)  # the real compiler's library
    monkeypatch.setenv("CC", str(_fake_compiler(fresh, "echo 'fake-cc: broken' >&2; exit 1")))
    assert "fake-cc: broken" in _native.status()
    calls = _calls(fresh)
    assert calls >= 2  # both variants tried
    _native._reset()
    assert "remembered" in _native.status()
    assert _calls(fresh) == calls
    monkeypatch.delenv("CC")  # another compiler: not affected
    _native._reset()
    assert _native.status() == "in use"
    assert _calls(fresh) == calls


def test_a_compiler_with_arguments_is_split_like_a_shell(fresh, monkeypatch):
    extra = "-m64" if platform.machine().lower() in ("x86_64", "amd64") else "-O2"
    monkeypatch.setenv("CC", f"{os.path.basename(COMPILER[0])} {extra}")
    assert _kernel_cache.compiler_command() == ([COMPILER[0], extra], None)
    assert _native.status() == "in use"


def test_a_cc_that_names_nothing_is_reported_by_name(fresh, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz -O2")
    assert _native.status() == "not in use: CC='no-such-compiler-xyz -O2': no executable " + (
        "'no-such-compiler-xyz' found"
    )


def test_threads_arriving_during_the_build_wait_for_it(fresh):
    # Reproducer 5: 4 threads making their first call at once got results differing by 3e-7
    # (those arriving during the build took the PyTorch path).
    x = seeded_randn(64, 1000, dtype=torch.float32)
    start = threading.Barrier(4)
    results = [None] * 4

    def first_call(i):
        start.wait()
        results[i] = soft_topk(x, 10.0, temperature=0.1)

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _native.status() == "in use"
    after = soft_topk(x, 10.0, temperature=0.1)
    assert all(torch.equal(r, after) for r in results)
