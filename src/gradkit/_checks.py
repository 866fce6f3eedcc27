"""One validation style for the API and the command line.

A :class:`Check` knows an argument's name and what is allowed. Called on a value it returns
the value converted (``int``, ``float``, the choice) or raises an error that names the
argument, the allowed range and the value: a ``TypeError`` for a wrong type, a ``ValueError``
for a value out of range::

    >>> depth = integer("depth", minimum=1)
    >>> depth(3)
    3
    >>> depth(0)
    Traceback (most recent call last):
    ...
    ValueError: depth must be an integer ≥ 1, got 0
    >>> depth("3")
    Traceback (most recent call last):
    ...
    TypeError: depth must be an integer ≥ 1, got '3'

:meth:`Check.parse` reads the text of a flag first (a bad text is a ``ValueError``), and
:meth:`Check.argtype` makes the same check an ``argparse`` ``type=``, so a bad flag is a usage
error (exit 2) with the same message; argparse prefixes ``argument --flag:``::

    parser.add_argument("--depth", type=integer("--depth", minimum=2).argtype())
    parser.add_argument("--activation", type=choice("--activation", ACTIVATIONS).argtype(many=True))
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Check", "choice", "flag", "integer", "number", "one_of_or"]


class Check:
    """A named rule.

    Args:
        name: the argument as the user knows it (``"depth"`` in the API, ``"--depth"`` for a
            flag).
        rule: what is allowed, as it reads after "must be" (``"an integer ≥ 1"``).
        test: ``value -> value``, converted; raises ``TypeError`` for a wrong type and
            ``ValueError`` for a value out of range (its own message is replaced).
        from_text: ``text -> value`` for :meth:`parse` (raises ``ValueError``); ``None``: the
            text is the value.
    """

    def __init__(
        self,
        name: str,
        rule: str,
        test: Callable[[Any], Any],
        from_text: Callable[[str], Any] | None = None,
    ):
        self.name, self.rule = name, rule
        self._test, self._from_text = test, from_text

    def message(self, value: Any, name: str | None = None) -> str:
        """``"<name> must be <rule>, got <value>"`` (no name: ``"must be …"``, for argparse)."""
        subject = f"{self.name if name is None else name} must be".lstrip()
        return f"{subject} {self.rule}, got {value!r}"

    def __call__(self, value: Any) -> Any:
        """``value`` checked and converted (``TypeError``: wrong type; ``ValueError``: range)."""
        try:
            return self._test(value)
        except TypeError:
            raise TypeError(self.message(value)) from None
        except ValueError:
            raise ValueError(self.message(value)) from None

    def parse(self, value: Any) -> Any:
        """A value from the command line: text is read first; every failure is a ``ValueError``."""
        try:
            if isinstance(value, str) and self._from_text is not None:
                return self._test(self._from_text(value.strip()))
            return self._test(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(self.message(value)) from None

    def argtype(self, *, many: bool = False) -> Callable[[str], Any]:
        """This check as an argparse ``type=``; ``many``: a comma-separated list → a tuple."""

        def one(text: str) -> Any:
            try:
                return self.parse(text)
            except ValueError:
                raise argparse.ArgumentTypeError(self.message(text, name="")) from None

        def convert(text: str) -> Any:
            if not many:
                return one(text)
            items = [item.strip() for item in str(text).split(",")]
            if any(not item for item in items):
                raise argparse.ArgumentTypeError(f"empty item in {text!r}")
            return tuple(one(item) for item in items)

        convert.__name__ = self.name.lstrip("-").replace("-", "_")  # argparse may name it
        return convert


def flag(key: str) -> str:
    """The command-line flag of a setting: ``"batch_size"`` → ``"--batch-size"``."""
    return "--" + key.replace("_", "-")


def _range_text(low: Any, high: Any, low_open: bool = False, high_open: bool = False) -> str:
    """``" ≥ 1"``, ``" > 0"``, ``" in [0, 1)"`` …, or ``""`` without bounds."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '≥'} {low}"
    if high is not None:
        return f" {'<' if high_open else '≤'} {high}"
    return ""


def integer(name: str, minimum: int | None = None, maximum: int | None = None) -> Check:
    """An ``int`` in ``[minimum, maximum]`` (either bound may be ``None``); a bool is not one."""

    def test(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError
        return int(value)

    return Check(name, "an integer" + _range_text(minimum, maximum), test, int)


def number(
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> Check:
    """A finite ``float`` within the bounds (``above``/``below`` strict); NaN, ±inf never pass.

    A bool is not a number.
    """

    def test(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError
        out = float(value)
        if not (
            math.isfinite(out)
            and (above is None or out > above)
            and (at_least is None or out >= at_least)
            and (below is None or out < below)
            and (at_most is None or out <= at_most)
        ):
            raise ValueError
        return out

    low = above if above is not None else at_least
    high = below if below is not None else at_most
    rule = "a finite number" + _range_text(low, high, above is not None, below is not None)
    return Check(name, rule, test, float)


def choice(name: str, choices: Sequence[str]) -> Check:
    """One of ``choices`` (exact spelling)."""

    def test(value: Any) -> str:
        if value not in choices:
            raise ValueError
        return value

    return Check(name, f"one of {', '.join(choices)}", test)


def one_of_or(check: Check, words: dict[str, Any]) -> Check:
    """``check``, or one of ``words`` (case-insensitive) mapped to its value.

    ``one_of_or(number("--gain", above=0), {"auto": None})`` also takes ``"auto"`` (and
    ``None``) and returns ``None`` for it.
    """

    def test(value: Any) -> Any:
        if any(value is meant for meant in words.values()):
            return value
        key = value.strip().lower() if isinstance(value, str) else None
        return words[key] if key in words else check._test(value)

    def from_text(text: str) -> Any:
        key = text.lower()
        return words[key] if key in words else (check._from_text or str)(text)

    rule = f"{check.rule} or {' / '.join(map(repr, words))}"
    return Check(check.name, rule, test, from_text)
