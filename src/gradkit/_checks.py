"""One validation style for the API and the command line.

A :class:`Check` knows an argument's name and what is allowed. Called on a value (a Python
value from the API, or the text of a flag) it returns the converted value or raises
``ValueError("<name> must be <rule>; got <value>")``. :meth:`Check.argtype` turns the same
check into an ``argparse`` ``type=``, so a bad flag is a usage error (exit 2) with the same
message::

    >>> depth = integer("--depth", minimum=2)
    >>> depth("12")
    12
    >>> depth(1)
    Traceback (most recent call last):
    ...
    ValueError: --depth must be an integer ≥ 2; got 1
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Check", "choice", "integer", "number", "one_of_or"]

_BAD = object()


class Check:
    """A named check: ``check(value)`` converts and validates, or raises ``ValueError``."""

    def __init__(self, name: str, rule: str, convert: Callable[[Any], Any]):
        self.name, self.rule, self._convert = name, rule, convert

    def __call__(self, value: Any) -> Any:
        try:
            out = self._convert(value)
        except (ValueError, TypeError, OverflowError):
            out = _BAD
        if out is _BAD:
            raise ValueError(f"{self.name} must be {self.rule}; got {value!r}")
        return out

    def argtype(self) -> Callable[[str], Any]:
        """This check as an argparse ``type=`` (argparse adds "argument --flag: ")."""

        def convert(text: str) -> Any:
            try:
                return self(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {self.rule}; got {text!r}") from None

        convert.__name__ = self.name.lstrip("-").replace("-", "_")
        return convert


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not an integer")
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError(f"not an integer: {value!r}")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a bool is not a number")
    return float(value.strip() if isinstance(value, str) else value)


def _range_text(low: Any, high: Any, low_open: bool = False, high_open: bool = False) -> str:
    if high is None:
        return f"{'>' if low_open else '≥'} {low}" if low is not None else ""
    if low is None:
        return f"{'<' if high_open else '≤'} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def integer(name: str, minimum: int | None = None, maximum: int | None = None) -> Check:
    """An integer in ``[minimum, maximum]`` (either bound may be ``None``)."""

    def convert(value: Any) -> Any:
        out = _as_int(value)
        if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
            return _BAD
        return out

    rule = f"an integer {_range_text(minimum, maximum)}".rstrip()
    return Check(name, rule, convert)


def number(
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Check:
    """A finite number in the given range (``low_open``: ``> minimum``; ``high_open``: ``<``)."""

    def convert(value: Any) -> Any:
        out = _as_float(value)
        if not math.isfinite(out):
            return _BAD
        if minimum is not None and (out <= minimum if low_open else out < minimum):
            return _BAD
        if maximum is not None and (out >= maximum if high_open else out > maximum):
            return _BAD
        return out

    rule = f"a finite number {_range_text(minimum, maximum, low_open, high_open)}".rstrip()
    return Check(name, rule, convert)


def choice(name: str, choices: Sequence[str]) -> Check:
    """One of ``choices`` (exact spelling)."""

    def convert(value: Any) -> Any:
        return value if isinstance(value, str) and value in choices else _BAD

    return Check(name, f"one of {', '.join(choices)}", convert)


def one_of_or(check: Check, words: dict[str, Any]) -> Check:
    """``check``, or one of ``words`` (case-insensitive) mapped to its value.

    ``one_of_or(number("--gain", 0, low_open=True), {"auto": None})`` accepts ``"auto"``.
    """

    def convert(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        if value is None and None in words.values():
            return None
        return check(value)

    return Check(check.name, f"{check.rule} or {' / '.join(map(repr, words))}", convert)
