"""Named consumers: several local apps, each with every message it asks for, at its own pace.

A consumer is a name with a topic filter and its own acknowledgement state over the one inbox.
No payload is copied and nothing is written per ingested message: the state is a low-water
mark (`floor`: every id at or below it is done for the consumer) plus the ids acked ahead of
it (store DB `cacks`), so an in-order reader writes one small record per ack call. A message
leaves the inbox at ack time, when every consumer whose filter matches it is done with it (or
when it expires, or the cap drops it). The unnamed default consumer is the inbox itself, as
before consumers existed: it sees every stored message and its ack removes it for everyone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional

import msgpack
from flashlexd.clock import LEGACY_SEQ
from flashlexd.storedamage import CorruptRecord
from flashlexd.storerecords import StoreError, _stamp_of
from flashlexd.topics import topic_matches

RESET_TARGETS = ("earliest", "latest")  # or a message id
# how a reset goes (Store.consumer_reset_way): forwards keeping the acks ahead ("latest"),
# forwards to an id then its acks from there on forgotten, or back with every ack forgotten
RESET_WAYS = ("skip", "start", "replay")
MEMO_TOPICS = 512  # topics whose match a consumer remembers (a walk meets a few, over and over)
MEMO_TOPIC_CHARS = 256  # a longer topic is matched each time (the memo stays small)
# consumers stored at once: every ack of a named consumer and every `status` reads them all (3,000
# registered by one app made `status` 68 ms and an ack 15 ms); apps register more only below it
MAX_CONSUMERS = 64
SEEN_EVERY = 3600.0  # seconds between writes of a reading dynamic consumer's last use (an ack writes it)


class ConsumerCallError(StoreError):
    """A named consumer's call its caller got wrong (the API answers bad_params)."""


class UnknownConsumer(ConsumerCallError):
    """A call named a consumer that is neither declared nor registered."""


class ResetPastNewest(ConsumerCallError):
    """A reset to a message id past every id given out: the consumer's floor would stand above
    messages not stored yet, and it would skip them unseen when they come."""

    def __init__(self, to: int, newest: int):
        super().__init__(f"no message has id {to} yet (the newest is {newest}); reset to"
                         " 'latest' to skip everything stored so far")


class NoRoomForConsumer(UnknownConsumer):
    """A new consumer was named (by an app, or declared by the config) while MAX_CONSUMERS are
    stored."""

    def __init__(self, name: str):
        super().__init__(f"no room for a new consumer {name!r}: {MAX_CONSUMERS} are stored, the most"
                         " there may be (a dynamic one goes when unused for consumerIdleDays, or by"
                         " `flashlexctl consumers remove NAME`)")


@dataclass(frozen=True)
class ConsumerSpec:
    """A consumer declared in the config (`flashlex.app.consumers`)."""
    name: str
    filter: str = "#"
    max_backlog: Optional[int] = None
    allow_uids: FrozenSet[int] = field(default_factory=frozenset)  # empty: anyone on the socket


def backlog_bound(max_backlog: Optional[int], dynamic: bool, dynamic_max_backlog: Optional[int]) -> Optional[int]:
    """The maxBacklog that holds for a consumer: a dynamic one's own (from when it was
    declared) or `dynamicMaxBacklog`, the lower."""
    if not dynamic or dynamic_max_backlog is None:
        return max_backlog
    return dynamic_max_backlog if max_backlog is None else min(max_backlog, dynamic_max_backlog)


@dataclass
class ConsumerState:
    """One consumer's stored state (DB `consumers`: name -> this, packed)."""
    name: str
    filter: str = "#"
    floor: int = 0  # every inbox id <= floor is done for this consumer
    dropped: int = 0  # its unacked messages removed by the cap or by maxBacklog
    last_seen: float = 0.0  # wall clock of its last call
    dynamic: bool = True  # registered by an app, not declared: removed when idle
    max_backlog: Optional[int] = None
    # the rest of its last call's stamp, as records have it (clock.py): what re-bases
    # `last_seen` after a clock step; a record written before it has none (the wall-clock rule)
    seen_seq: int = LEGACY_SEQ
    seen_boottime: Optional[float] = None
    # `matches`'s memo: topic -> matched, for the filter named beside it
    _matched: Dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)
    _matched_filter: str = field(default="#", init=False, repr=False, compare=False)

    def pack(self) -> bytes:
        stamp = [] if self.seen_boottime is None else [self.seen_seq, self.seen_boottime]
        return msgpack.packb([self.floor, self.dropped, self.last_seen, self.dynamic, self.filter,
                              self.max_backlog, *stamp], use_bin_type=True)

    @classmethod
    def unpack(cls, name: bytes, raw: bytes) -> "ConsumerState":
        try:
            fields = msgpack.unpackb(raw)
            floor, dropped, last_seen, dynamic, topic_filter, max_backlog = fields[:6]
            seq, boottime = _stamp_of(fields, 6)  # a record of an older version: the wall clock
            return cls(bytes(name).decode(), topic_filter, int(floor), int(dropped), float(last_seen),
                       bool(dynamic), max_backlog, seq, boottime)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise CorruptRecord(f"a consumer record does not decode ({exc})") from None

    def matches(self, topic: str) -> bool:
        """Whether the filter matches `topic`. Reads, `status`, acks and resets ask it of every
        record they walk, mostly on a few topics, so a filter's answers are remembered (a
        match cost 2 us; 500 of them were half of an uncached `status`)."""
        if self.filter == "#":
            return not topic.startswith("$")
        if self._matched_filter != self.filter:  # the filter changed (a config reload)
            self._matched, self._matched_filter = {}, self.filter
        known = self._matched.get(topic)
        if known is None:
            known = topic_matches(self.filter, topic)
            if len(self._matched) < MEMO_TOPICS and len(topic) <= MEMO_TOPIC_CHARS:
                self._matched[topic] = known
        return known

    def public(self) -> dict:
        return {"name": self.name, "filter": self.filter, "acked_through": self.floor,
                "dropped": self.dropped, "last_seen": self.last_seen or None,
                "dynamic": self.dynamic, "max_backlog": self.max_backlog}
