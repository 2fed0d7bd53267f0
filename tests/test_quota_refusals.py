"""The egress's answer to PUBACK 0x97 Quota exceeded (flashlexd/workers/quotarefusals.py), on a
set clock: a throttle is waited out at growing pauses, an entry refused alone goes."""
from __future__ import annotations

from flashlexd.workers.quotarefusals import MAX_PAUSE, QuotaRefusals


def test_an_entry_refused_while_later_ones_are_accepted_goes_at_the_attempts() -> None:
    refusals, now = QuotaRefusals(3), 100.0
    for _ in range(2):
        assert not refusals.refused(7, now)
        assert refusals.paused_until == now + 1  # each acceptance ends the run of pauses
        refusals.accepted(8)
        now += 1
    assert refusals.refused(7, now)  # the third refusal, others accepted between each


def test_refusals_with_nothing_accepted_between_are_a_throttle_that_pauses_longer() -> None:
    refusals, now, pauses = QuotaRefusals(3), 100.0, []
    for _ in range(8):
        for entry in (7, 8, 9):  # a burst in flight, every one refused during one pause
            assert not refusals.refused(entry, now)
        pauses.append(refusals.paused_until - now)
        now = refusals.paused_until
    assert pauses == [1, 2, 4, 8, 16, MAX_PAUSE, MAX_PAUSE, MAX_PAUSE]
    assert refusals.pauses_in_a_row == 8
    refusals.accepted(7)  # the throttle passed
    assert not refusals.refused(8, now) and refusals.paused_until == now + 1


def test_a_count_starts_afresh_after_a_refusal_with_nothing_accepted_since() -> None:
    refusals, now = QuotaRefusals(3), 100.0
    assert not refusals.refused(7, now)
    refusals.accepted(8)
    assert not refusals.refused(7, now + 1)  # 2
    assert not refusals.refused(7, now + 3)  # nothing accepted since: 1 again
    refusals.accepted(8)
    assert not refusals.refused(7, now + 4)  # 2
    refusals.accepted(8)
    assert refusals.refused(7, now + 5)


def test_two_entries_refused_by_turns_are_each_counted() -> None:
    refusals, now = QuotaRefusals(3), 100.0
    gone = []
    for _ in range(3):
        for entry in (7, 9):
            if refusals.refused(entry, now):
                gone.append(entry)
            refusals.accepted(8)
        now += 1
    assert gone == [7, 9]


def test_one_refusal_never_goes_even_at_one_attempt() -> None:
    refusals = QuotaRefusals(1)
    assert not refusals.refused(7, 100.0)
    refusals.accepted(8)
    assert refusals.refused(7, 101.0)
