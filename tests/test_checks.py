"""`gradkit._checks`: one validation style for the API and argparse `type=`.

Every error names the argument, the allowed range and the value: ``"<name> must be <rule>, got
<value>"``; a wrong type is a ``TypeError``, a value out of range a ``ValueError``.
"""

from __future__ import annotations

import argparse
import io
import math
import re

import pytest

from gradkit import _checks, _runtime


def test_integer_bounds_and_types():
    assert _checks.integer("depth", 1)(3) == 3
    assert _checks.integer("steps", 0, 5)(0) == 0
    with pytest.raises(ValueError, match=r"^depth must be an integer ≥ 1, got 0$"):
        _checks.integer("depth", 1)(0)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer in \[1, 10\], got 11$"):
        _checks.integer("batch_size", 1, 10)(11)
    with pytest.raises(ValueError, match=r"^seed must be an integer ≤ 9, got 10$"):
        _checks.integer("seed", maximum=9)(10)
    for bad in (True, 2.0, 2.5, "3", None):
        with pytest.raises(TypeError, match=r"^depth must be an integer ≥ 1, got "):
            _checks.integer("depth", 1)(bad)


def test_integer_parses_text_and_every_bad_text_is_a_value_error():
    depth = _checks.integer("--depth", 2)
    assert depth.parse(" 12 ") == 12 and depth.parse(3) == 3
    for bad in (1, "1", "x", "4.5", 2.5, True, None, "99999999999999999999e0"):
        message = f"^--depth must be an integer ≥ 2, got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=message):
            depth.parse(bad)
    with pytest.raises(ValueError, match="got '99999999999999999999'"):
        _checks.integer("--first-seed", 0, 10).parse("99999999999999999999")


def test_number_bounds_and_types():
    lr = _checks.number("lr", above=0)
    assert lr(1) == 1.0 and isinstance(lr(1), float)
    assert _checks.number("momentum", at_least=0, below=1)(0) == 0.0
    cases = [
        (dict(above=0), 0.0, r"lr must be a finite number > 0, got 0\.0"),
        (dict(at_least=0, below=1), 1.0, r"lr must be a finite number in \[0, 1\), got 1\.0"),
        (dict(above=0, at_most=2), 2.5, r"lr must be a finite number in \(0, 2\], got 2\.5"),
        (dict(below=1), math.inf, r"lr must be a finite number < 1, got inf"),
        (dict(at_most=1), math.nan, r"lr must be a finite number ≤ 1, got nan"),
        (dict(), math.inf, r"lr must be a finite number, got inf"),
    ]
    for limits, value, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            _checks.number("lr", **limits)(value)
    for bad in (False, "0.1", None, 1j):
        with pytest.raises(TypeError, match=r"^lr must be a finite number > 0, got "):
            lr(bad)


def test_number_parses_text_and_rejects_non_finite_text():
    lr = _checks.number("--lr", above=0)
    assert lr.parse("1e-3") == 1e-3 and lr.parse(0.5) == 0.5
    for bad in ("0", "-1", "nan", "inf", "fast", False):
        message = f"^--lr must be a finite number > 0, got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=message):
            lr.parse(bad)


def test_choice_and_words():
    mode = _checks.choice("mode", ("local", "global"))
    assert mode("local") == "local"
    with pytest.raises(ValueError, match=r"^mode must be one of local, global, got 'both'$"):
        mode("both")
    gain = _checks.one_of_or(_checks.number("--gain", above=0), {"auto": None})
    assert gain("AUTO") is None and gain(None) is None and gain(2) == 2.0
    assert gain.parse(" auto ") is None and gain.parse("2") == 2.0
    with pytest.raises(ValueError, match=r"^--gain must be a finite number > 0 or 'auto', got -2$"):
        gain(-2)
    with pytest.raises(TypeError, match="--gain must be a finite number > 0 or 'auto', got '2'"):
        gain("2")  # text is for parse (the command line)


def test_flag_spells_a_setting_as_its_command_line_flag():
    assert _checks.flag("batch_size") == "--batch-size" and _checks.flag("lr") == "--lr"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab")
    p.add_argument("--depth", type=_checks.integer("--depth", 2).argtype())
    p.add_argument("--lr", type=_checks.number("--lr", above=0).argtype())
    activation = _checks.choice("--activation", ("relu", "tanh"))
    p.add_argument("--activation", type=activation.argtype(many=True))
    gain = _checks.one_of_or(_checks.number("--gain", above=0), {"auto": None})
    p.add_argument("--gain", type=gain.argtype(many=True))
    return p


def test_argtype_parses_and_validates_flags():
    args = parser().parse_args(
        ["--depth", "3", "--lr", "0.5", "--activation", "relu, tanh", "--gain", "1,AUTO"]
    )
    assert (args.depth, args.lr) == (3, 0.5)
    assert args.activation == ("relu", "tanh") and args.gain == (1.0, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--depth", "1"], "argument --depth: must be an integer ≥ 2, got '1'"),
        (["--depth", "two"], "argument --depth: must be an integer ≥ 2, got 'two'"),
        (["--lr", "-1"], "argument --lr: must be a finite number > 0, got '-1'"),
        (["--activation", "relu,swish"], "must be one of relu, tanh, got 'swish'"),
        (["--activation", "relu,"], "empty item in 'relu,'"),
        (["--gain", "0"], "argument --gain: must be a finite number > 0 or 'auto', got '0'"),
    ],
)
def test_argtype_errors_name_the_flag_the_range_and_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_threads_auto_is_one_per_process_and_devices_resolve():
    assert _runtime.resolve_threads(None) == _runtime.resolve_threads("auto") == 1
    assert _runtime.resolve_threads("3") == 3
    with pytest.raises(ValueError, match="--threads"):
        _runtime.resolve_threads(0)
    assert _runtime.resolve_device("cpu").type == "cpu"
    assert _runtime.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device must be one of cpu, cuda, auto, got 'tpu'"):
        _runtime.resolve_device("tpu")


def test_meter_prints_counts_and_an_eta():
    stream = io.StringIO()
    meter = _runtime.Meter(4, "work", stream=stream, done=1)
    meter.step(note="a")
    meter.step()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("work 2/4") and lines[0].endswith("a")
    assert lines[1].startswith("work 3/4") and "eta" in lines[1]
