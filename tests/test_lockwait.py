"""The lock-wait beat counts a wait in its own ticks: a pause of the whole daemon (SIGSTOP of
its process group, `systemctl freeze`) made one wait of a second look like eight, and its
ERROR blamed a process outside the daemon that did not exist (found by re-read)."""
from __future__ import annotations

import logging
from typing import Any, List

import pytest

from flashlexd.workers import lockwait


class _Channel:
    def __init__(self) -> None:
        self.sent: List[Any] = []

    def send(self, message: Any) -> bool:
        self.sent.append(message)
        return True


class _Ticks(Exception):
    """Ends the beat's loop after the ticks a test asked for."""


def _run(monkeypatch, ticks: int, waits: List[Any], period: float = 1.0, timeout: float = 3.0) -> _Channel:
    """The beat's loop for `ticks` ticks, `waits[i]` the wait it sees at tick i; each tick
    takes as long as it likes (what a paused daemon's tick does)."""
    channel, told = _Channel(), iter(waits)
    calls = iter(range(ticks + 1))

    def tick(_: float) -> bool:
        if next(calls) == ticks:
            raise _Ticks
        return False

    monkeypatch.setattr(lockwait, "lock_wait_since", lambda: next(told))
    beat = lockwait.LockWaitBeat(channel, period, timeout, lambda: {"n": 1})  # type: ignore[arg-type]
    monkeypatch.setattr(beat._pacing, "wait", tick)
    with pytest.raises(_Ticks):
        beat._run()
    return channel


def test_a_wait_is_beaten_for_until_its_ticks_reach_the_timeout_then_said_once(monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="flashlexd.workers.lockwait")
    channel = _run(monkeypatch, 10, [5.0] * 10)  # one wait, seen at every tick; 0.5 s a tick
    assert len(channel.sent) == 5  # ticks 1-5 (0.5 to 2.5 s of waiting): beats; from 3 s: none
    assert [r.getMessage() for r in caplog.records] == [
        "waiting over 3s for the store's write lock: a paused `flashlexd store` command, another"
        " program with the data dir open, or a worker of this daemon stuck on the disk holds it;"
        " heartbeats stop, so this worker is restarted unless the supervisor sees a worker waiting"
        " on the disk"]


def test_a_new_wait_or_none_starts_the_count_again(monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="flashlexd.workers.lockwait")
    channel = _run(monkeypatch, 9, [5.0, 5.0, 5.0, None, 7.0, 7.0, 7.0, 8.0, 8.0])
    assert len(channel.sent) == 2 + 2 + 1 and not caplog.records
