"""argparse types that check numbers as they are read, so a bad value fails with one sentence naming the flag
(argparse adds the flag) instead of being used silently (a depth of 0 must not become 5, a NaN temperature must
not reach the sampler)."""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _at_least(kind: type, low: float, strict: bool = False):
    """An argparse type: a `kind` number >= low (> low when strict)."""
    def check(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {value}")
        return value
    return check


positive_int = _at_least(int, 1)
non_negative_int = _at_least(int, 0)
non_negative_float = _at_least(float, 0)
positive_float = _at_least(float, 0, strict=True)


def probability(text: str) -> float:
    """A top-p value: in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def port(text: str) -> int:
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1..65535)")
    return value
