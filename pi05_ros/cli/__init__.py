"""Command-line tools: thin shells over the engine."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` (to `high`), refused at parse time (a port past 65535 wrapped
    around, a negative seed failed after the model had loaded)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected an integer {wanted}, got {value}")
        return value
    return parse
