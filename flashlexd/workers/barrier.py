"""Knowing when the broker has processed our PUBACKs, so their DUP marks can be let go.

The store counts, per content digest, the committed messages whose PUBACK the broker has not
confirmed (flashlexd/redelivery.py), so that a redelivery (DUP) of one of them is not stored
twice whatever its packet id. That count must not outlive the acknowledgement: a later message
with the same content whose first transmission was lost arrives only as a DUP, and were the old
mark still counted, that new message would be taken for a redelivery and dropped.

MQTT gives no receipt for a PUBACK, but a broker handles one connection's packets in order. So
after sending PUBACKs we send an UNSUBSCRIBE of a filter we never subscribed to (harmless, and
always answered): when its UNSUBACK comes back, every PUBACK sent before it was processed, and
those messages can never be redelivered. Their marks are then taken off with the next commit.
If the connection drops first, the marks stay (a redelivery may still come).
"""
from __future__ import annotations

from typing import Any, List, Optional

from flashlexd.store import DupMark, Incoming, dup_marks


class AckBarrier:
    def __init__(self, client: Any, client_id: str):
        self.client = client
        self.topic = f"flashlexd/ack-barrier/{client_id}"
        self.acked: List[DupMark] = []    # PUBACK sent, no barrier sent after it yet
        self.waiting: List[DupMark] = []  # PUBACK sent before the outstanding barrier
        self.settled: List[DupMark] = []  # PUBACK processed by the broker: marks can go
        self.barrier_mid: Optional[int] = None

    def sent_acks(self, messages: List[Incoming]) -> None:
        """PUBACKs for `messages` were just handed to paho; send a barrier if none is out."""
        self.acked.extend(mark for mark in dup_marks(messages) if mark)  # small: no payloads kept
        if self.barrier_mid is None and self.acked:
            _, self.barrier_mid = self.client.unsubscribe(self.topic)
            self.waiting, self.acked = self.acked, []

    def on_unsuback(self, mid: int) -> int:
        """Returns how many PUBACKs this UNSUBACK confirmed (0 for another UNSUBACK)."""
        if mid != self.barrier_mid:
            return 0
        confirmed = len(self.waiting)
        self.settled.extend(self.waiting)
        self.waiting, self.barrier_mid = [], None
        self.sent_acks([])
        return confirmed

    def disconnected(self) -> None:
        """Unconfirmed PUBACKs may not have reached the broker: keep their marks."""
        self.acked, self.waiting, self.barrier_mid = [], [], None

    def take_settled(self) -> List[DupMark]:
        taken, self.settled = self.settled, []
        return taken

    def give_back(self, settled: List[DupMark]) -> None:
        """The commit that was to drop these marks failed: try again with the next one."""
        self.settled = settled + self.settled
