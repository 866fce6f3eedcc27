"""The lab's one validation style: API errors and argparse ``type=`` from the same rules."""

from __future__ import annotations

import argparse
import math

import pytest

from gradkit.align._checks import argtype, integer, number, one_of


def test_integer_bounds_and_types():
    assert integer("depth", 3, minimum=1) == 3
    assert integer("steps", 0, minimum=0, maximum=5) == 0
    with pytest.raises(ValueError, match=r"^depth must be an integer ≥ 1, got 0$"):
        integer("depth", 0, minimum=1)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer in \[1, 10\], got 11$"):
        integer("batch_size", 11, minimum=1, maximum=10)
    for bad in (True, 2.0, "3", None):
        with pytest.raises(TypeError, match=r"^depth must be an integer ≥ 1, got "):
            integer("depth", bad, minimum=1)
    assert integer("depth", " 4 ", minimum=1, from_text=True) == 4
    with pytest.raises(ValueError, match=r"got '4\.5'"):
        integer("depth", "4.5", minimum=1, from_text=True)


def test_number_bounds_and_types():
    assert number("lr", 1, above=0) == 1.0 and isinstance(number("lr", 1, above=0), float)
    assert number("momentum", 0, at_least=0, below=1) == 0.0
    cases = [
        (dict(above=0), 0.0, r"lr must be a finite number > 0, got 0\.0"),
        (dict(at_least=0, below=1), 1.0, r"lr must be a number in \[0, 1\), got 1\.0"),
        (dict(above=0, at_most=2), 2.5, r"lr must be a number in \(0, 2\], got 2\.5"),
        (dict(below=1), math.inf, r"lr must be a finite number < 1, got inf"),
        (dict(at_most=1), math.nan, r"lr must be a finite number ≤ 1, got nan"),
        (dict(), math.inf, r"lr must be a finite number, got inf"),
    ]
    for limits, value, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            number("lr", value, **limits)
    for bad in (False, "0.1", None, 1j):
        with pytest.raises(TypeError, match="lr must be a finite number > 0"):
            number("lr", bad, above=0)
    assert number("lr", "1e-3", above=0, from_text=True) == 1e-3
    with pytest.raises(ValueError, match="got 'fast'"):
        number("lr", "fast", above=0, from_text=True)


def test_one_of():
    assert one_of("mode", "local", choices=("local", "global")) == "local"
    with pytest.raises(ValueError, match=r"^mode must be one of local, global, got 'both'$"):
        one_of("mode", "both", choices=("local", "global"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab")
    p.add_argument("--depth", type=argtype(integer, minimum=2))
    p.add_argument("--lr", type=argtype(number, above=0))
    p.add_argument("--activation", type=argtype(one_of, choices=("relu", "tanh"), many=True))
    p.add_argument("--gain", type=argtype(number, above=0, none_words=("auto",), many=True))
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
        (["--depth", "1"], "argument --depth: must be an integer ≥ 2, got 1"),
        (["--depth", "two"], "argument --depth: must be an integer ≥ 2, got 'two'"),
        (["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1.0"),
        (["--activation", "relu,swish"], "must be one of relu, tanh, got 'swish'"),
        (["--activation", "relu,"], "empty item in 'relu,'"),
        (["--gain", "0"], "argument --gain: must be a finite number > 0 or auto, got 0.0"),
    ],
)
def test_argtype_errors_name_the_flag_the_range_and_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
