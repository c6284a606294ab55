"""Command-line argument types shared by the model's commands (train, eval, sample, bench)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable


def at_least(minimum: int, at_most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum`` (and no larger than
    ``at_most``). Seeds and counts need it: ``random.Random`` seeds with the absolute
    value, so seed -1,000,000 *is* held-out seed 1,000,000, and a negative count would
    silently make an empty range."""
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be {at_most} or less, not {value}")
        return value
    return integer


def between(low: float, high: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: a number from ``low`` to ``high`` (a weight, a fraction)."""
    def number(text: str) -> float:
        value = float(text)
        if not low <= value <= high:  # NaN fails this too
            raise argparse.ArgumentTypeError(
                f"must be {low:g} or more, not {text}" if high == float("inf")
                else f"must be from {low:g} to {high:g}, not {text}")
        return value
    return number


def positive(text: str) -> float:
    """An argparse type: a finite number above zero (a length in seconds, say)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated counts, each 1 or more ('4,8,16')."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, not {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"each must be 1 or more, not {min(values)}")
    return values


def write_threshold(text: str) -> float | None:
    """An argparse type: 'greedy' (None) or a probability strictly between 0 and 1
    (see ``model.interaction.choose_text``)."""
    if text == "greedy":
        return None
    try:
        return check_write_threshold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'greedy' or a probability between 0 and 1 (exclusive), "
                                         f"not {text!r}") from None


def check_write_threshold(value: float) -> float:
    """At 0 the model would always write, at 1 never, and NaN compares false to all."""
    if not 0 < value < 1:
        raise ValueError(f"write_threshold: a probability between 0 and 1 (exclusive), not {value!r}")
    return value


def lexicon_file(text: str) -> str | None:
    """An argparse type: 'none' (None) or the path of an existing word list (``model.lexicon``)."""
    if text == "none":
        return None
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"'none' or a word list file, not {text!r} (no such file)")
    return text
