"""argparse value types the commands share: a bad value is one usage line and exit 2."""
from __future__ import annotations

import argparse


MAX_SECONDS = 86400.0  # a day: socket timeouts and the client's own checks take no more


def positive_seconds(text: str) -> float:
    """A number of seconds above 0, at most MAX_SECONDS (`inf`, `nan`, 0 and below are
    refused: a wait of -1 s sent SIGHUP and then reported the reload it had just done as
    failed; 1e9 was a traceback from the client's own check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most {MAX_SECONDS:g},"
                                         f" got {text!r}")
    return value
