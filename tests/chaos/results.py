"""The scenarios' one-line results: `name: k v, k v, ..., 41.2 s`.

A module of its own because tests/chaos/conftest.py is loaded twice (as pytest's conftest and
as `tests.chaos.conftest`, imported by the scenarios): the lines a test made must reach one
list, which the conftest's hooks then attach to that test's report (pytest-xdist carries a
report from its worker processes to the terminal summary)."""
from __future__ import annotations

import time
from typing import Dict, List, Optional

_pending: List[str] = []  # lines of the running test, not yet in its report


def report_line(line: str) -> str:
    """Print a scenario's one-line figures and keep them for the "chaos results" summary."""
    print(f"\n{line}", flush=True)
    _pending.append(line)
    return line


def take_lines() -> List[str]:
    """The lines made since the last call (the running test's)."""
    lines = list(_pending)
    _pending.clear()
    return lines


class Result:
    """`name: k v, k v, ..., 41.2 s`: figures in the order they were set, then the elapsed time."""

    def __init__(self, name: str):
        self.name = name
        self.started = time.monotonic()
        self.figures: Dict[str, object] = {}
        self.emitted: Optional[str] = None

    def set(self, **figures: object) -> "Result":
        self.figures.update({k.replace("_", " "): v for k, v in figures.items()})
        return self

    def line(self) -> str:
        if self.emitted is not None:
            return self.emitted
        parts = [f"{k} {v}" for k, v in self.figures.items()]
        return f"{self.name}: {', '.join(parts + [f'{time.monotonic() - self.started:.1f} s'])}"

    def emit(self) -> str:
        """Freeze the line, print it and keep it for the summary; returns it."""
        self.emitted = report_line(self.line())
        return self.emitted

    def __str__(self) -> str:
        return self.line()
