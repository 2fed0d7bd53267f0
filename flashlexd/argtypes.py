"""argparse value types the commands share: a bad value is one usage line and exit 2."""
from __future__ import annotations

import argparse


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (`inf`, `nan`, 0 and below are refused: a wait of
    -1 s sent SIGHUP and then reported the reload it had just done as failed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value
