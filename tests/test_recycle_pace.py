"""The pace of the ingress's reconnects for messages left with the broker (workers/recyclepace.py)."""
from __future__ import annotations

from flashlexd.workers.recyclepace import MAX_GAP, MIN_GAP, WASTE, RecyclePace


def test_wasteful_reconnects_come_further_apart_and_a_useful_one_resets_the_pace() -> None:
    """A store held at its cap by a slow reader, a broker without a window: each reconnect had
    the broker resend all it held for a few messages stored (55 reconnects and 942 MB in 60 s,
    found by re-read). Gaps double while far more is left again than stored."""
    pace = RecyclePace()
    assert pace.wait(0.0) == 0.0
    now, stored, left, gaps = 0.0, 0, 0, []
    for _ in range(7):
        now += pace.wait(now)
        stored, left = stored + 10, left + 10 * WASTE + 1  # left again: more than WASTE per stored
        pace.went(now, stored, left)
        gaps.append(pace.gap)
    assert gaps == [MIN_GAP, 2.0, 4.0, 8.0, MAX_GAP, MAX_GAP, MAX_GAP]
    assert pace.wait(now) == MAX_GAP and pace.wait(now + MAX_GAP) == 0.0
    pace.went(now + MAX_GAP, stored + 100, left + 100 * WASTE)  # as much stored as the rule allows
    assert pace.gap == MIN_GAP
