"""What ingress logs while the store refuses (workers/refusallog.py), on a clock the test
sets: the spells that matter last 10 s to 10 minutes. test_ingress.py has a real worker say
the same."""
from __future__ import annotations

import logging
from typing import List, Tuple

import pytest

from flashlexd.store import StoreDamaged, StoreError, StoreFull
from flashlexd.workers.refusallog import REFUSED_LOG_SECONDS, RESUMED_QUIET_SECONDS, RefusalLog

FULL = StoreFull("store at its cap")


@pytest.fixture
def said(caplog: pytest.LogCaptureFixture):
    """The lines logged so far, as (level, the start of the message)."""
    caplog.set_level(logging.DEBUG, logger="flashlexd.workers.refusallog")

    def lines() -> List[Tuple[str, str]]:
        return [(r.levelname, r.getMessage().split(";")[0]) for r in caplog.records]
    return lines


def test_a_slow_sensor_into_a_store_at_its_cap_is_not_a_pair_of_lines_a_message(said):
    """Found by re-read: each message of a slow sensor (one every 30 s, over
    RESUMED_QUIET_SECONDS apart) met the store full again after a quiet spell, and the log read
    ERROR, "resuming", ERROR, "resuming"... for as long as it lasted."""
    log = RefusalLog(retry_seconds=1.0)
    for at in range(0, 600, 30):  # refused, stored at the retry a second later (expiry freed room)
        log.refused(FULL, at, held=1, retry=False)
        log.stored(at + 1)
        log.due(at + 29)
    assert said().count(("ERROR", "store full: store at its cap")) == 2  # and one after the resume
    assert said().count(("INFO", "store accepts messages again")) == 1


def test_the_end_is_said_after_a_quiet_spell_and_a_refusal_after_it_always(said):
    """The log's last word on the store must be the truth: "resuming" only once the store took
    messages for RESUMED_QUIET_SECONDS, and a refusal after that line logged though the last
    ERROR is less than REFUSED_LOG_SECONDS old (found by review: it was throttled, and the log
    said "resuming" while 4,000-6,000 messages were held)."""
    log = RefusalLog(retry_seconds=1.0)
    log.refused(FULL, 0.0, held=5, retry=False)
    log.refused(FULL, 0.5, held=5, retry=False)  # again within REFUSED_LOG_SECONDS: DEBUG, counted
    log.stored(2.0)
    assert log.due(2.0 + RESUMED_QUIET_SECONDS - 0.1) == pytest.approx(0.1)
    assert said() == [("ERROR", "store full: store at its cap"), ("DEBUG", "store full: store at its cap")]
    assert log.due(2.0 + RESUMED_QUIET_SECONDS) == float("inf")
    assert said()[-1] == ("INFO", "store accepts messages again")
    log.refused(FULL, 20.0, held=5, retry=False)
    assert said()[-1][0] == "ERROR" and 20.0 < REFUSED_LOG_SECONDS


def test_a_stop_says_an_end_not_yet_due_and_damage_is_left_to_the_store(said):
    """A worker stopped within RESUMED_QUIET_SECONDS of storing again said nothing, the ERROR
    its last word. Damage is logged by the store; its end is ingress's to say."""
    log = RefusalLog(retry_seconds=1.0)
    log.refused(StoreDamaged("damaged page"), 0.0, held=3, retry=False)
    assert said() == []
    log.stored(1.0)
    log.close(2.0)
    assert said() == [("INFO", "store accepts messages again")]
    log.close(3.0)  # said once
    assert len(said()) == 1


def test_every_refusal_holds_the_end_back_a_retry_too(said):
    """Found by re-read: a retry's refusal did not reach the log's account, and a retry could
    follow a commit (the DUP marks' drop refused then did not count as a refusal): the log
    said "resuming" 10 s later while every retry was refused."""
    log = RefusalLog(retry_seconds=1.0)
    log.refused(FULL, 0.0, held=5, retry=False)
    log.stored(1.0)
    log.refused(FULL, 2.0, held=5, retry=True)
    assert log.due(2.0 + RESUMED_QUIET_SECONDS) == float("inf")
    assert said() == [("ERROR", "store full: store at its cap")]


def test_a_refusal_lasting_most_of_the_brokers_patience_is_warned_of_once(said):
    """AWS IoT Core drops a QoS 1 message it has had no PUBACK for in an hour: a store refusing
    that long loses at the broker what the README said the broker keeps (review "aws"). One
    WARNING at 45 min, due through `due()` (a steady refusal logs nothing more), once an episode."""
    log = RefusalLog(retry_seconds=1.0, broker_keeps=3600)
    log.refused(FULL, 0.0, held=5, retry=False)
    assert log.due(1.0) == pytest.approx(2700 - 1)
    for at in range(1, 2700, 60):
        log.refused(FULL, float(at), held=5, retry=True)
    assert log.due(2699.0) == pytest.approx(1.0)
    assert log.due(2700.0) == float("inf")
    assert said()[-1] == ("WARNING", "the store has refused messages for 45 min: AWS IoT Core drops a QoS 1"
                          " message it has had no PUBACK for in 60 min, so what it holds for this thing is"
                          " lost from then: free room now (apps acknowledging, a larger capMegabytes) or set"
                          " whenFull: dropOldest")
    log.due(3000.0)
    assert sum(1 for level, _ in said() if level == "WARNING") == 1
    log.stored(3001.0)
    log.due(3001.0 + RESUMED_QUIET_SECONDS)  # the episode over: the next one is warned of again
    log.refused(FULL, 4000.0, held=5, retry=False)
    assert log.due(4000.0) == pytest.approx(2700)
    disk = RefusalLog(retry_seconds=1.0, broker_keeps=3600)  # no room to free on a read-only disk (re-read 30)
    disk.refused(StoreError("store in x: the disk is read-only"), 0.0, held=5, retry=False)
    disk.due(2700.0)
    assert said()[-1][1].endswith("lost from then: mend what the store's ERROR above names now (its disk:"
                                  " dmesg and fsck, or flashlexd store recover)")
    other = RefusalLog(retry_seconds=1.0)  # other brokers: no such notice
    other.refused(FULL, 0.0, held=5, retry=False)
    assert other.due(5000.0) == float("inf")
