"""The ack barrier (workers/barrier.py) keeps the DUP marks it waits on packed: 8 bytes a mark,
not a `bytes` object each (a late UNSUBACK leaves tens of thousands waiting under load), and
hands them back unchanged and in order."""
from __future__ import annotations

import tracemalloc

from flashlexd.store import Incoming
from flashlexd.workers.barrier import AckBarrier


def messages(first: int, count: int):
    return [Incoming("t/in", f"payload {i}".encode(), 1, mid=i % 65535 + 1) for i in range(first, first + count)]


class Unsubscriber:
    """What the barrier uses of a connected paho client: `unsubscribe` gives a packet id."""

    def __init__(self):
        self.mids = 0

    def unsubscribe(self, topic: str):
        self.mids += 1
        return 0, self.mids


def barrier() -> AckBarrier:
    return AckBarrier(Unsubscriber(), "c")


def test_marks_waiting_for_the_barrier_cost_about_8_bytes_each():
    waiting = barrier()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for first in range(0, 20_000, 1000):
            waiting.sent_acks(messages(first, 1000))  # no UNSUBACK comes: all 20,000 wait
        grown = tracemalloc.get_traced_memory()[0] - before  # the messages are gone, the marks wait
    finally:
        tracemalloc.stop()
    assert grown < 12 * 20_000, f"{grown / 20_000:.1f} bytes per waiting mark"
    assert waiting.on_unsuback(1) == 1000  # the first batch's barrier; then one for the rest
    assert waiting.on_unsuback(2) == 19_000
    assert len(waiting.take_settled()) == 20_000


def test_settled_marks_come_back_in_order_and_a_failed_commit_gives_them_back_first():
    acks = barrier()
    first, second = messages(0, 3), messages(3, 2)
    acks.sent_acks(first)
    assert acks.on_unsuback(acks.barrier_mid) == 3
    taken = acks.take_settled()
    assert len(taken) == 3 and list(taken) == [m.mark for m in first]
    acks.sent_acks(second)
    acks.on_unsuback(acks.barrier_mid)
    acks.give_back(taken)  # the commit that was to settle them failed
    assert list(acks.take_settled()) == [m.mark for m in first + second]
    assert len(acks.take_settled()) == 0
