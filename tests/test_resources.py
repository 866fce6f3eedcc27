"""The memory check a command makes before a run (issue 10: no size guard)."""

from __future__ import annotations

import pytest

from gradkit import _resources


def test_available_memory_is_a_plausible_positive_number():
    available = _resources.available_memory_bytes()
    assert available is None or 2**20 < available < 2**60


def test_meminfo_is_read_in_bytes(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:  8000 kB\nMemFree: 100 kB\nMemAvailable:    2048 kB\n")
    assert _resources._meminfo_available(info) == 2048 * 1024
    info.write_text("MemTotal:  8000 kB\n")
    assert _resources._meminfo_available(info) is None
    assert _resources._meminfo_available(tmp_path / "missing") is None


def test_a_cgroup_limit_caps_the_available_memory(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert _resources._cgroup_headroom(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**30}\n")
    assert _resources._cgroup_headroom(tmp_path) == 2 * 2**30


def test_format_bytes():
    assert _resources.format_bytes(512) == "512 B"
    assert _resources.format_bytes(1536) == "1.5 KiB"
    assert _resources.format_bytes(15.5 * 2**30) == "15.5 GiB"
    assert _resources.format_bytes(2**50) == "1024.0 TiB"


def test_a_setting_that_does_not_fit_is_refused_with_estimate_and_limit():
    _resources.check_memory(10**6, "--batch 10", available=10**9)
    with pytest.raises(ValueError) as caught:
        _resources.check_memory(16 * 2**30, "--batch 10000000", available=4 * 2**30)
    message = str(caught.value)
    assert "--batch 10000000" in message
    assert "16.0 GiB" in message and "4.0 GiB" in message


def test_the_machine_cannot_hold_an_exabyte():
    if _resources.available_memory_bytes() is None:
        pytest.skip("available memory unknown here")
    with pytest.raises(ValueError, match=r"TiB"):
        _resources.check_memory(2**60, "--width 1e9")


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_the_estimate_must_be_a_non_negative_int(bad):
    with pytest.raises((ValueError, TypeError), match="estimate_bytes"):
        _resources.check_memory(bad, "x", available=10)
