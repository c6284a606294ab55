"""Command-line argument types shared by the model's commands (train, eval, sample)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``. Seeds and counts need it:
    ``random.Random`` seeds with the absolute value, so seed -1,000,000 *is* held-out
    seed 1,000,000, and a negative count would silently make an empty range."""
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value
    return integer
