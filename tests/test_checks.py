"""`gradkit._checks`: one validation style for the API and argparse `type=`."""

from __future__ import annotations

import argparse

import pytest

from gradkit import _checks, _runtime


def test_integer_converts_text_and_names_the_argument_and_range():
    depth = _checks.integer("--depth", 2)
    assert depth("12") == 12 and depth(3) == 3
    for bad in (1, "1", "x", 2.5, True, None, "99999999999999999999e0"):
        with pytest.raises(ValueError, match="--depth must be an integer ≥ 2; got"):
            depth(bad)
    bounded = _checks.integer("--first-seed", 0, 10)
    with pytest.raises(ValueError, match=r"--first-seed must be an integer in \[0, 10\]; got 11"):
        bounded(11)
    with pytest.raises(ValueError, match="got '99999999999999999999'"):
        bounded("99999999999999999999")


def test_number_rejects_non_finite_and_respects_open_bounds():
    lr = _checks.number("--lr", 0, low_open=True)
    assert lr("0.5") == 0.5
    for bad in (0, "-1", "nan", "inf", "x", False):
        with pytest.raises(ValueError, match="--lr must be a finite number > 0"):
            lr(bad)
    momentum = _checks.number("--momentum", 0, 1, high_open=True)
    assert momentum(0) == 0.0
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        momentum(1)


def test_choice_and_words():
    gain = _checks.one_of_or(_checks.number("--gain", 0, low_open=True), {"auto": None})
    assert gain("AUTO") is None and gain(None) is None and gain("2") == 2.0
    with pytest.raises(ValueError, match="--gain must be a finite number > 0 or 'auto'"):
        gain("-2")
    activation = _checks.choice("--activation", ("linear", "tanh"))
    with pytest.raises(ValueError, match="--activation must be one of linear, tanh; got 'relu'"):
        activation("relu")


def test_argtype_makes_the_same_check_a_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--depth", type=_checks.integer("--depth", 2).argtype())
    assert parser.parse_args(["--depth", "4"]).depth == 4
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--depth", "1"])
    assert exit_info.value.code == 2
    assert "argument --depth: must be an integer ≥ 2; got '1'" in capsys.readouterr().err


def test_threads_auto_is_one_per_process_and_devices_resolve():
    assert _runtime.resolve_threads(None) == _runtime.resolve_threads("auto") == 1
    assert _runtime.resolve_threads("3") == 3
    with pytest.raises(ValueError, match="--threads"):
        _runtime.resolve_threads(0)
    assert _runtime.resolve_device("cpu").type == "cpu"
    assert _runtime.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device must be one of cpu, cuda, auto"):
        _runtime.resolve_device("tpu")


def test_meter_prints_counts_and_an_eta():
    import io

    stream = io.StringIO()
    meter = _runtime.Meter(4, "work", stream=stream, done=1)
    meter.step(note="a")
    meter.step()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("work 2/4") and lines[0].endswith("a")
    assert lines[1].startswith("work 3/4") and "eta" in lines[1]
