"""Knowing when the broker has processed our PUBACKs, so their DUP marks can be let go.

The store counts, per content digest, the committed messages whose PUBACK the broker has not
confirmed (flashlexd/redelivery.py), so that a redelivery (DUP) of one of them is not stored
twice whatever its packet id. That count must not outlive the acknowledgement: a later message
with the same content whose first transmission was lost arrives only as a DUP, and were the old
mark still counted, that new message would be taken for a redelivery and dropped.

MQTT gives no receipt for a PUBACK, but a broker handles one connection's packets in order. So
after sending PUBACKs we send an UNSUBSCRIBE of a filter we never subscribed to (harmless, and
always answered): when its UNSUBACK comes back, every PUBACK sent before it was processed, and
those messages can never be redelivered. Their marks are then taken off with the next commit
(at once while the store refuses commits, and at a stop).
If the connection drops first, the marks stay (a redelivery may still come).

The marks wait here packed end to end (`PackedMarks`, 8 bytes each): a broker that answers the
barrier late leaves tens of thousands waiting under load (61,000 after a 100,000-message ingest
was measured), and as a list of `bytes` each cost 56 bytes of pymalloc blocks (3.4 MB of the
ingress worker's peak).
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional

from flashlexd.store import DupMark, Incoming, dup_marks

MARK_BYTES = 8  # a DUP mark is a blake2b-64 digest (`Incoming.mark`)


class PackedMarks:
    """DUP marks stored end to end in one bytes object; iterating yields each mark."""

    def __init__(self, packed: bytes = b""):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed) // MARK_BYTES

    def __iter__(self) -> Iterator[DupMark]:
        packed = self.packed
        return (packed[i:i + MARK_BYTES] for i in range(0, len(packed), MARK_BYTES))


def pack_marks(marks: List[Optional[DupMark]]) -> bytes:
    present = [mark for mark in marks if mark]
    packed = b"".join(present)
    if len(packed) != MARK_BYTES * len(present):
        raise ValueError(f"a DUP mark is not {MARK_BYTES} bytes long")
    return packed


def barrier_level(client_id: str) -> str:
    """`client_id` as one valid topic-filter level: `%`, `+`, `#`, `/` and U+0000 escaped."""
    return "".join(f"%{ord(c):02X}" if c in "%+#/\0" else c for c in client_id)


class AckBarrier:
    def __init__(self, client: Any, client_id: str):
        self.client = client
        # a client id may hold `+`, `#` (MQTT allows any UTF-8 in it): in a filter they would
        # make the UNSUBSCRIBE invalid, and the broker drop the link at every barrier
        self.topic = "flashlexd/ack-barrier/" + barrier_level(client_id)
        self.acked = bytearray()    # PUBACK sent, no barrier sent after it yet
        self.waiting = bytearray()  # PUBACK sent before the outstanding barrier
        self.settled = bytearray()  # PUBACK processed by the broker: marks can go
        self.barrier_mid: Optional[int] = None

    def sent_acks(self, messages: List[Incoming]) -> None:
        """PUBACKs for `messages` were just handed to paho; send a barrier if none is out."""
        self.acked += pack_marks(dup_marks(messages))  # small: no payloads kept
        if self.barrier_mid is None and self.acked:
            _, self.barrier_mid = self.client.unsubscribe(self.topic)
            self.waiting, self.acked = self.acked, bytearray()

    def on_unsuback(self, mid: int) -> int:
        """Returns how many PUBACKs this UNSUBACK confirmed (0 for another UNSUBACK)."""
        if mid != self.barrier_mid:
            return 0
        confirmed = len(self.waiting) // MARK_BYTES
        self.settled += self.waiting
        self.waiting, self.barrier_mid = bytearray(), None
        self.sent_acks([])
        return confirmed

    def unconfirmed(self) -> int:
        """PUBACKs sent on this connection that no barrier has confirmed yet."""
        return (len(self.acked) + len(self.waiting)) // MARK_BYTES

    def disconnected(self) -> None:
        """Unconfirmed PUBACKs may not have reached the broker: keep their marks."""
        self.acked, self.waiting, self.barrier_mid = bytearray(), bytearray(), None

    def take_settled(self) -> PackedMarks:
        taken = PackedMarks(bytes(self.settled))
        self.settled = bytearray()
        return taken

    def give_back(self, settled: PackedMarks) -> None:
        """The commit that was to drop these marks failed: try again with the next one."""
        self.settled[:0] = settled.packed
