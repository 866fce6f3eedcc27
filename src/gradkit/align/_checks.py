"""Argument checks of the alignment lab: one style for the API and for argparse.

Every check takes the argument's ``name`` and ``value``, returns the value converted (``int``,
``float`` or the choice itself) and otherwise raises an error that names the argument, the
allowed range and the value::

    >>> integer("depth", 0, minimum=1)
    Traceback (most recent call last):
    ValueError: depth must be an integer ≥ 1, got 0
    >>> number("lr", "0.1", above=0)          # text is a TypeError in the API …
    Traceback (most recent call last):
    TypeError: lr must be a finite number > 0, got '0.1'

A wrong type is a ``TypeError`` and a value out of range a ``ValueError``. The same rules
serve as argparse ``type=`` through :func:`argtype`, which converts the command-line text
first and reports without the name (argparse prefixes ``argument --flag:``)::

    parser.add_argument("--depth", type=argtype(integer, minimum=2))
    parser.add_argument("--lr", type=argtype(number, above=0))
    parser.add_argument("--activation", type=argtype(one_of, choices=ACTIVATIONS, many=True))
    parser.add_argument("--gain", type=argtype(number, above=0, none_words=("auto",)))
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["argtype", "integer", "number", "one_of"]


def _fail(error: type[Exception], name: str | None, rule: str, value: Any) -> Exception:
    subject = f"{name} must be" if name else "must be"
    return error(f"{subject} {rule}, got {value!r}")


def _bounds(low: str | None, high: str | None) -> str:
    """``" > 0"``, ``" in [0, 1)"`` … from the bound strings (``"[0"``, ``"1)"``)."""
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'≥' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f" {'≤' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def integer(
    name: str | None,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    from_text: bool = False,
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional).

    ``bool`` is not an integer here. With ``from_text`` a string is parsed first (argparse).
    """
    rule = "an integer" + _bounds(
        None if minimum is None else f"[{minimum}", None if maximum is None else f"{maximum}]"
    )
    if from_text and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _fail(ValueError, name, rule, value) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(TypeError, name, rule, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(ValueError, name, rule, value)
    return int(value)


def number(
    name: str | None,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    from_text: bool = False,
) -> float:
    """``value`` as a finite ``float`` within the given bounds (``above``/``below`` strict).

    ``bool`` is not a number here; NaN and ±inf never pass. With ``from_text`` a string is
    parsed first (argparse).
    """
    low = f"({above:g}" if above is not None else f"[{at_least:g}" if at_least is not None else None
    high = f"{below:g})" if below is not None else f"{at_most:g}]" if at_most is not None else None
    rule = ("a number" if low and high else "a finite number") + _bounds(low, high)
    if from_text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _fail(ValueError, name, rule, value) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(TypeError, name, rule, value)
    value = float(value)
    if not (
        math.isfinite(value)
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
        and (at_most is None or value <= at_most)
    ):
        raise _fail(ValueError, name, rule, value)
    return value


def one_of(name: str | None, value: Any, *, choices: Sequence[str], from_text: bool = False) -> str:
    """``value`` if it is one of ``choices`` (exact match), else a ``ValueError`` listing them."""
    del from_text  # text is the value itself
    if value not in choices:
        raise _fail(ValueError, name, f"one of {', '.join(choices)}", value)
    return value


def argtype(
    check: Callable[..., Any],
    *,
    many: bool = False,
    none_words: Sequence[str] = (),
    **limits: Any,
) -> Callable[[str], Any]:
    """An argparse ``type=`` that applies ``check`` (with ``limits``) to the flag's text.

    Args:
        check: :func:`integer`, :func:`number` or :func:`one_of`.
        many: accept a comma-separated list and return a tuple of values (sweeps); an empty
            item is an error.
        none_words: words (case-insensitive) that stand for ``None``, e.g. ``("auto",)``.
        limits: keyword arguments of ``check`` (``minimum=1``, ``above=0``, ``choices=…``).

    Errors become ``argparse.ArgumentTypeError`` with the check's message without a name:
    ``argument --depth: must be an integer ≥ 2, got '1'``.
    """
    words = {word.lower() for word in none_words}
    alternatives = f" or {' / '.join(none_words)}" if none_words else ""

    def one(text: str) -> Any:
        if text.strip().lower() in words:
            return None
        try:
            return check(None, text, from_text=True, **limits)
        except (TypeError, ValueError) as error:
            message = str(error)
            if alternatives:
                message = message.replace(", got", f"{alternatives}, got", 1)
            raise argparse.ArgumentTypeError(message) from None

    def convert(text: str) -> Any:
        if not many:
            return one(text)
        items = [item.strip() for item in str(text).split(",")]
        if any(not item for item in items):
            raise argparse.ArgumentTypeError(f"empty item in {text!r}")
        return tuple(one(item) for item in items)

    convert.__name__ = getattr(check, "__name__", "value")  # argparse names it in messages
    return convert
