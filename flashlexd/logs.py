"""Logging to stderr, one line per event, shaped for where it goes.

Under systemd (JOURNAL_STREAM or INVOCATION_ID set) each line starts with its syslog priority
(`<3>` error ... `<7>` debug) and carries no timestamp: journald adds both. On a terminal,
lines get a timestamp instead.

Messages carry text from the broker and from local applications (topics, client ids, error
strings). Every message is passed through `printable`, so a newline in a topic cannot start a
second journal line (`\\n<0>...` would forge one at emergency priority) and an ESC sequence
cannot reach a terminal. A traceback keeps its lines, each escaped and, for journald, each
prefixed with the record's own priority.

SIGUSR1 (`systemctl kill -s SIGUSR1` reaches every process of the unit at once) writes each
process's stacks under a line naming it, all in one write so that four dumps do not interleave.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from typing import Any, Dict, Hashable, Optional

from flashlexd.escape import printable

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class LineThrottle:
    """At most one log line per `every` seconds about something that can repeat at will (a
    local client's refused requests, a link retrying every 2 s, a store refusing at every
    sweep), with how many there were since the last line: a loop of them cannot flood the
    journal and the log file on an SD card (nor push the daemon's other lines out of journald's
    rate limit)."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.last: Optional[float] = None
        self.since = 0

    def due(self, now: float) -> int:
        """How many to report now, this one included; 0: stay quiet."""
        self.since += 1
        if self.last is not None and now - self.last < self.every:
            return 0
        count, self.last, self.since = self.since, now, 0
        return count


def since_last(count: int, what: str) -> str:
    """What a throttled line adds: how many there were since the last one like it."""
    return f" ({count} {what} since the last line about it)" if count > 1 else ""


class KindThrottle:
    """A LineThrottle per kind of a repeated event (a failure's shape, an error's type), at most
    `kinds` of them: more, and they start afresh."""

    def __init__(self, every: float, kinds: int = 32) -> None:
        self.every, self.kinds = every, kinds
        self.lines: Dict[Hashable, LineThrottle] = {}

    def due(self, kind: Hashable, now: float) -> int:
        """How many of this kind to report now, this one included; 0: stay quiet."""
        if kind not in self.lines and len(self.lines) >= self.kinds:
            self.lines.clear()
        return self.lines.setdefault(kind, LineThrottle(self.every)).due(now)

    def clear(self) -> None:
        """Every kind is news again (the trouble ended)."""
        self.lines.clear()


class _SafeFormatter(logging.Formatter):
    """One escaped line per record (plus escaped traceback lines), with a priority prefix on
    every line when `journal`."""

    def __init__(self, fmt: str, journal: bool):
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        record.message = printable(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        lines = [self.formatMessage(record)]
        if record.exc_info:
            lines += self.formatException(record.exc_info).split("\n")
        if record.stack_info:
            lines += self.formatStack(record.stack_info).split("\n")
        lines = [lines[0]] + [printable(line) for line in lines[1:]]
        if self.journal:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            lines = [prefix + line for line in lines]
        return "\n".join(lines)


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def setup(level: str, process: str) -> None:
    """Configure the root logger for this process (`process` names it in every line)."""
    handler = logging.StreamHandler(sys.stderr)
    if under_systemd():
        handler.setFormatter(_SafeFormatter(f"{process}: %(message)s", journal=True))
    else:
        handler.setFormatter(_SafeFormatter(
            f"%(asctime)s %(levelname)s {process}[%(process)d]: %(message)s", journal=False))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def dump_stacks_on_sigusr1(process: str) -> None:
    """SIGUSR1 writes every thread's stack to stderr under a line naming `process` and its pid.
    A Python handler (faulthandler cannot write a header): it runs once the main thread next
    runs Python, so a process hung inside C dumps nothing; the supervisor's SIGABRT to a hung
    worker stays faulthandler's own (`faulthandler.enable`)."""
    def dump(signum: int, frame: Any) -> None:
        header = f"flashlexd {process}, pid {os.getpid()}: every thread's stack (SIGUSR1)\n"
        try:
            _write_all(sys.stderr.fileno(), header.encode() + _stacks())
        except OSError:  # stderr full or gone, no fd left for the memfd: nowhere to say so, and
            pass         # a process must not die of a diagnostic asked of it (as faulthandler's)

    signal.signal(signal.SIGUSR1, dump)


def _stacks() -> bytes:
    """faulthandler's dump of every thread, read back from a memfd (it writes only to a fd)."""
    scratch = os.memfd_create("flashlexd-stacks", os.MFD_CLOEXEC)
    try:
        faulthandler.dump_traceback(scratch, all_threads=True)
        return os.pread(scratch, os.fstat(scratch).st_size, 0)
    finally:
        os.close(scratch)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
