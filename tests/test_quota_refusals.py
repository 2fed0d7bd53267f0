"""The egress's answer to PUBACK 0x97 Quota exceeded (flashlexd/workers/quotarefusals.py), on a
set clock: a throttle is waited out at growing pauses, an entry refused alone goes."""
from __future__ import annotations

from typing import List

from flashlexd.workers.quotarefusals import MAX_PAUSE, STALE, QuotaRefusals


def burst(refusals: QuotaRefusals, entries: List[int]) -> None:
    for entry in entries:
        refusals.sending(entry)


def answered(refusals: QuotaRefusals, now: float) -> None:
    """Every publish of the burst answered (at `now`): the pause before the next head counts
    from here."""
    assert not refusals.waits_for_window(False, now)


def test_an_entry_refused_at_the_head_of_each_burst_goes_at_the_attempts() -> None:
    refusals, now = QuotaRefusals(3), 100.0
    for _ in range(2):
        burst(refusals, [7, 8, 9])
        assert not refusals.refused(7, now)
        assert refusals.paused_until == now + 1  # each acceptance ends the run of pauses
        refusals.accepted(8)
        refusals.accepted(9)
        answered(refusals, now)
        now = refusals.paused_until
    burst(refusals, [7, 10])
    assert refusals.refused(7, now)  # the third refusal, others accepted between each


def test_a_rate_quota_refusing_the_tail_of_each_burst_blames_no_entry() -> None:
    """A token bucket of 20 a second under a window of 100: each burst's first 20 pass, the
    rest is refused and comes back as the next burst. Counting every refusal dead-lettered
    100 healthy entries of 600 (re-read, on a real broker)."""
    refusals, now, queued, gone = QuotaRefusals(3), 100.0, list(range(1, 601)), []
    while queued:
        sent = queued[:100]
        burst(refusals, sent)
        for i, entry in enumerate(sent):
            if i < 20:
                refusals.accepted(entry)
                queued.remove(entry)
            elif refusals.refused(entry, now):
                gone.append(entry)
                queued.remove(entry)
        answered(refusals, now)
        now = max(now, refusals.paused_until)
    assert gone == []


def test_refusals_with_nothing_accepted_between_are_a_throttle_that_pauses_longer() -> None:
    refusals, now, pauses = QuotaRefusals(3), 100.0, []
    for _ in range(8):
        burst(refusals, [7, 8, 9])
        for entry in (7, 8, 9):  # every one refused during the pause the first started
            assert not refusals.refused(entry, now)
        pauses.append(refusals.paused_until - now)
        answered(refusals, now)
        now = refusals.paused_until
    assert pauses == [1, 2, 4, 8, 16, MAX_PAUSE, MAX_PAUSE, MAX_PAUSE]
    assert refusals.pauses_in_a_row(now) == 8
    refusals.accepted(7)  # the throttle passed
    burst(refusals, [8])
    assert not refusals.refused(8, now) and refusals.paused_until == now + 1


def test_a_throttle_is_over_once_no_refusal_came_for_a_while() -> None:
    """The refused entries may leave the outbox otherwise (dropped, expired): `status` said
    "refused every publish" until some later publish was accepted (re-read)."""
    refusals, now = QuotaRefusals(3), 100.0
    for _ in range(5):
        burst(refusals, [7])
        refusals.refused(7, now)
        answered(refusals, now)
        now = refusals.paused_until
    assert refusals.pauses_in_a_row(now) == 5
    later = now + STALE + 1
    assert refusals.pauses_in_a_row(later) == 0
    burst(refusals, [9])
    assert not refusals.refused(9, later) and refusals.paused_until == later + 1


def test_a_count_starts_afresh_after_a_refusal_with_nothing_accepted_since() -> None:
    refusals, now = QuotaRefusals(3), 100.0
    accepted_before = [False, True, False, True, True]  # another entry accepted before each try
    for step, accepted in enumerate(accepted_before):
        if accepted:
            refusals.accepted(8)
        burst(refusals, [7])
        refused_for_good = refusals.refused(7, now + step * 40)
        assert refused_for_good == (step == 4), step  # 1, 2, 1 (nothing since), 2, 3


def test_two_entries_refused_for_good_go_one_after_the_other() -> None:
    """The rewind makes the lowest refused entry the next head: the second one's turn comes."""
    refusals, now, gone = QuotaRefusals(3), 100.0, []
    queued, fresh = [7, 8, 9, 10], iter(range(11, 100))
    for _ in range(7):
        burst(refusals, queued)
        for entry in list(queued):
            if entry in (7, 9):
                if refusals.refused(entry, now):
                    gone.append(entry)
                    queued.remove(entry)
            else:
                refusals.accepted(entry)
                queued.remove(entry)
        queued += [next(fresh), next(fresh)]
        answered(refusals, now)
        now = refusals.paused_until
    assert gone == [7, 9]


def test_one_refusal_never_goes_even_at_one_attempt() -> None:
    refusals = QuotaRefusals(1)
    burst(refusals, [7, 8])
    assert not refusals.refused(7, 100.0)
    refusals.accepted(8)
    burst(refusals, [7])
    assert refusals.refused(7, 101.0)


def test_an_entry_refused_alone_is_tried_after_another() -> None:
    """Paced one at a time (or a window of 1), the refused entry is alone in flight: the next
    goes first (a probe), and an acceptance of it lets the refused head's next refusal count;
    a probe refused too (a throttle) blames nobody."""
    refusals, now = QuotaRefusals(2), 100.0
    burst(refusals, [7])
    assert not refusals.refused(7, now)
    refusals.probe_before(7)
    burst(refusals, [8])  # the probe is not the head
    assert refusals.end_probe() == 7 and refusals.end_probe() is None
    refusals.accepted(8)
    burst(refusals, [7])
    assert refusals.refused(7, now + 1)  # a second refusal, the probe accepted between

    throttled, now = QuotaRefusals(2), 200.0
    for probe in (8, 9, 10):
        burst(throttled, [7])
        assert not throttled.refused(7, now)
        throttled.probe_before(7)
        burst(throttled, [probe])
        assert throttled.end_probe() == 7
        assert not throttled.refused(probe, now)  # refused too: nothing accepted, no count
        answered(throttled, now)
        now = throttled.paused_until


def test_the_refusals_of_one_burst_over_a_slow_uplink_make_one_pause() -> None:
    """A window's refusals may come over seconds (a slow uplink): each one after the first
    pause's end started a doubled pause, and one burst made `status` degraded (re-read)."""
    refusals, now = QuotaRefusals(3), 100.0
    burst(refusals, [7, 8, 9, 10])
    for step, entry in enumerate((7, 8, 9, 10)):
        assert not refusals.refused(entry, now + 1.5 * step)
    assert refusals.pauses_in_a_row(now + 5) == 1
    assert refusals.waits_for_window(True, now + 5)  # more of the burst still in flight
    answered(refusals, now + 6)
    assert refusals.paused_until == now + 7  # the pause, counted from the last answer


def test_a_fresh_link_does_not_wait_for_the_last_links_publishes() -> None:
    refusals, now = QuotaRefusals(3), 100.0
    burst(refusals, [7, 8])
    assert not refusals.refused(7, now)
    refusals.new_burst()  # the link dropped with 8 in flight, and came back
    assert not refusals.waits_for_window(False, now + 3) and refusals.paused_until == now + 1
