"""The store's records, errors and key layout (the databases are described in store.py).

Keys are 8-byte big-endian ids (`_ID`), so key order is id order; the `_`-named helpers are
shared by the store's modules (store, storebase, storeoutbox) and nothing else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import lmdb
from flashlexd.clock import LEGACY_SEQ, Timeline
from flashlexd.records import Message, OutboxEntry
from flashlexd.storedamage import CorruptRecord, unpack_record
from flashlexd.topics import topic_matches

_ID = struct.Struct(">Q")
_SEQ = struct.Struct(">I")
_MAX_ID = 2 ** 64 - 1
_RECORD_OVERHEAD = 64  # bytes of B-tree node and index entries per message, roughly
DupMark = bytes  # digest of topic + payload (redelivery.py)
_DEAD_FIELDS = 3  # a dead letter's own fields, before the outbox record it keeps whole
_INBOX_PROPERTIES = 9   # schema 4: an inbox record's properties, after the stamp; absent: none
_OUTBOX_PROPERTIES = 7  # schema 4: an outbox entry's properties, after the stamp; absent: none
_READ_TOPIC_FROM = 2048  # bytes: a larger record's topic is read from its head (_topic_of)


class StoreError(Exception):
    """A store problem that the caller reports in one line."""


class StoreFull(StoreError):
    """The store reached its cap and the policy says refuse."""


class DiskFull(StoreError):
    """The filesystem holding the store has no space left (before the store reached its cap)."""


class StoreForkError(StoreError):
    """The store was used in a process other than the one that opened it."""


class StoreDamaged(StoreError):
    """The store's file is damaged: found before opening it (`storecheck`) or by LMDB or a
    record that does not decode while in use. The store is read-only from then on."""


class StoreBusy(StoreError):
    """A bounded write (`write_wait`) did not get LMDB's write lock in time: another process
    holds it, e.g. a worker that hung inside a transaction. Nothing was written."""


@dataclass(frozen=True)
class Incoming:
    """A message as received from the broker, before it has an id."""
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    mid: int = 0
    dup: bool = False
    key: Optional[bytes] = None  # the application's dedupe key (dedupe.py), when configured
    properties: Optional[Dict[str, Any]] = None  # MQTT 5 (mqttv5.properties_of), kept as given

    @classmethod
    def received(cls, topic: str, payload: bytes, qos: int, retain: bool, mid: int, dup: bool,
                 key: Optional[bytes], properties: Optional[Dict[str, Any]]) -> "Incoming":
        """The ingress's hot path (every message): the fields and the DUP mark go straight
        into __dict__. The frozen dataclass __init__ costs one object.__setattr__ per field,
        and a mark already in __dict__ is read without `cached_property`'s lookup (and,
        before Python 3.12, its lock) at each of its two reads."""
        message = object.__new__(cls)
        object.__setattr__(message, "__dict__", {
            "topic": topic, "payload": payload, "qos": qos, "retain": retain, "mid": mid, "dup": dup,
            "key": key, "properties": properties, "mark": _mark(topic, payload, qos)})
        return message

    @cached_property
    def mark(self) -> Optional[DupMark]:
        """The DUP mark: blake2b-64(topic + NUL + payload), None for QoS 0 (never redelivered).
        The packet id is not part of it: brokers renumber redeliveries (RabbitMQ). Computed
        once: the store's commit and the ack barrier both need it."""
        return _mark(self.topic, self.payload, self.qos)


def _mark(topic: str, payload: bytes, qos: int) -> Optional[DupMark]:
    if not qos:
        return None
    state = hashlib.blake2b(topic.encode() + b"\0", digest_size=8)
    state.update(payload)
    return state.digest()


DeadLetter = OutboxEntry  # one the broker kept refusing: `attempts`, `reason`, `dead_at` set


_Kept = Tuple[bytes, bytes]  # a record's key and value but its payload, copied out of the map


def _kept(key: memoryview, value: memoryview, fields: int) -> _Kept:
    """A record of `fields` fields or more, kept past its txn for its times, its payload left
    out where its head reads as the store writes it (`_payload_span`): kept for `status`, the
    oldest record's copy held a 33 MB payload in the supervisor for good (review "lowmem")."""
    span = _payload_span(value, fields)
    if span is None:
        return bytes(key), bytes(value)
    start, end = span
    return bytes(key), b"".join((value[:start], _NO_PAYLOAD, value[end:]))


def _key(record_id: int) -> bytes:
    return _ID.pack(record_id)


def _keys_of(ids: Iterable[int]) -> List[bytes]:
    """Sorted distinct keys of `ids`; ids that cannot exist (< 1, >= 2**64) are left out."""
    return sorted({_key(i) for i in map(int, ids) if 0 < i <= _MAX_ID})


def _start(cursor: lmdb.Cursor, after: Optional[int]) -> bool:
    """Position `cursor` on the first record with an id greater than `after` (None: the first)."""
    if after is None or after < 1:
        return cursor.first()
    return after < _MAX_ID and cursor.set_range(_key(after + 1))


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _expiry_prefix(seq: int, expires_at: float) -> bytes:
    """The first 12 bytes of an expiry index key: boot seq, expiry in that boot's frame."""
    return _SEQ.pack(seq) + _ID.pack(_ms(expires_at))


def _stamp_of(record: list, seq_at: int) -> Tuple[int, Optional[float]]:
    """(boot seq, boottime) of a record whose stamp fields start at `seq_at`; schema-1 records
    have none (the wall-clock rule)."""
    if len(record) > seq_at + 1:
        seq, boot = record[seq_at], record[seq_at + 1]
        if type(seq) is not int or type(boot) not in (int, float):
            raise CorruptRecord("a record's clock stamp is not a boot seq and a boottime")
        return seq, boot
    return LEGACY_SEQ, None


def _decode_message(key: bytes, raw: bytes, timeline: Timeline, ttl: Optional[float]) -> Message:
    """An inbox record as a Message; `ttl`: expireSeconds as configured now, which the sweep
    applies whatever was configured when the message came (the expiry stored with it is unused)."""
    if len(key) != _ID.size:
        raise CorruptRecord(f"an inbox key is {len(key)} bytes, not {_ID.size}")
    record = unpack_record(raw, 7)
    wall, topic, payload, qos, retain, mid = record[:6]
    seq, boot = _stamp_of(record, 7)
    arrival, age = timeline.times(wall, seq, boot)
    properties = _properties(record, _INBOX_PROPERTIES)
    expires_at = timeline.expiry_wall(timeline.arrival_key(wall, seq, boot) + ttl, wall, seq, boot) \
        if ttl else None
    own = properties.get("message_expiry_interval")
    if own:  # its own expiry (MQTT 5), if sooner
        expires_at = arrival + own if expires_at is None else min(expires_at, arrival + own)
    return Message.filled({"id": _ID.unpack(key)[0], "topic": topic, "payload": payload,
                           "timestamp": arrival, "qos": qos, "retain": retain, "mid": mid,
                           "expires_at": expires_at, "age": age, "properties": properties})


def _outbox_entry(key: bytes, record: list, timeline: Timeline) -> OutboxEntry:
    if len(key) != _ID.size:
        raise CorruptRecord(f"an outbox key is {len(key)} bytes, not {_ID.size}")
    wall, topic, payload, qos, retain = record[:5]
    seq, boot = _stamp_of(record, 5)
    return OutboxEntry(id=_ID.unpack(key)[0], created=timeline.arrival(wall, seq, boot), topic=topic,
                       payload=payload, qos=qos, retain=retain, age=timeline.age(wall, seq, boot),
                       properties=_properties(record, _OUTBOX_PROPERTIES))


def _topic_span(raw: memoryview, fields: int = 7) -> Optional[Tuple[int, int]]:
    """(offset, length) of a record's topic read from its head, as the store writes it: an
    array header, the arrival time (float 64), the topic (fixstr, str 8/16); None for a record
    laid out otherwise (unpack it whole). The array has `fields` fields or more (an inbox
    record 7, from schema 1)."""
    if len(raw) < 11 or not 0x90 + fields <= raw[0] <= 0x9F or raw[1] != 0xCB:
        return None
    tag = raw[10]
    if tag & 0xE0 == 0xA0:
        start, length = 11, tag & 0x1F
    elif tag == 0xD9 and len(raw) > 11:
        start, length = 12, raw[11]
    elif tag == 0xDA and len(raw) > 12:
        start, length = 13, raw[11] << 8 | raw[12]
    else:
        return None
    return (start, length) if length <= len(raw) - start else None


_NO_PAYLOAD = b"\xc4\x00"  # an empty bin
_BIN_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # bin 8/16/32: bytes of their length


def _payload_span(raw: memoryview, fields: int) -> Optional[Tuple[int, int]]:
    """(start, end) of a record's payload field, its bin header included, read from its head
    (the topic's `_topic_span`, then a bin 8/16/32); None for a record laid out otherwise."""
    span = _topic_span(raw, fields)
    if span is None:
        return None
    at = span[0] + span[1]
    width = _BIN_LENGTH.get(raw[at]) if at < len(raw) else None
    if width is None or at + 1 + width > len(raw):
        return None
    end = at + 1 + width + int.from_bytes(raw[at + 1:at + 1 + width], "big")
    return (at, end) if end <= len(raw) else None


def _topic_of(raw: memoryview) -> str:
    """An inbox record's topic. Filters look at many records, and unpacking a record copies its
    payload (up to 256 KB: 5 us at 100 KB), so a large one's topic is read from its head.
    Small records, and anything else, are unpacked whole (a damaged one fails as one)."""
    span = _topic_span(raw) if len(raw) > _READ_TOPIC_FROM else None
    if span is not None:
        start, length = span
        try:
            return str(raw[start:start + length], "utf-8")
        except UnicodeDecodeError:
            pass  # unpacked whole below: CorruptRecord
    topic = unpack_record(raw, 7)[1]
    if not isinstance(topic, str):
        raise CorruptRecord("a record's topic is not a string")
    return topic


def _system_topic(raw: memoryview) -> bool:
    """Whether an inbox record's topic starts with `$` (`#` does not match it, MQTT 4.7.2),
    from its head: a consumer of every topic tests this on every record its reads, acks and
    `status` pass, where decoding the topic cost it 1 us a record."""
    span = _topic_span(raw)
    if span is None:
        return _topic_of(raw).startswith("$")
    start, length = span
    return length > 0 and raw[start] == 0x24  # "$"


def _properties(record: list, at: int) -> Dict[str, Any]:
    """The properties field of a schema-4 record; {} for older records and those without."""
    found = record[at] if len(record) > at else None
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise CorruptRecord("a record's properties are not a map")
    return found


def _dead_letter(key: bytes, record: list, timeline: Timeline) -> DeadLetter:
    """A dead record is [attempts, reason, dead_at, *the outbox record it was]; dead_at is a
    stamp [wall, boot seq, boottime], re-based like an arrival time (a bare wall-clock time in
    records written before the clock-step fix, shown as it was written)."""
    if len(record) < _DEAD_FIELDS + 5:
        raise CorruptRecord(f"a dead letter is not a {_DEAD_FIELDS + 5}-field array")
    attempts, reason, dead_at = record[:_DEAD_FIELDS]
    if isinstance(dead_at, list):
        if len(dead_at) != 3:
            raise CorruptRecord("a dead letter's time is not a 3-field stamp")
        dead_at = timeline.arrival(*dead_at)
    entry = _outbox_entry(key, record[_DEAD_FIELDS:], timeline)
    return dataclasses.replace(entry, attempts=attempts, reason=reason, dead_at=dead_at)


def _read_outbox_entry(key: bytes, raw: memoryview, timeline: Timeline) -> OutboxEntry:
    return _outbox_entry(key, unpack_record(raw, 5), timeline)


def _read_dead_letter(key: bytes, raw: memoryview, timeline: Timeline) -> DeadLetter:
    return _dead_letter(key, unpack_record(raw, 5), timeline)


def message_selector(topic: Optional[str], user_property: Optional[Tuple[str, str]]
                     ) -> Callable[[Message], bool]:
    """What `messages`/`wait` keep: a topic filter (MQTT wildcards) and an MQTT 5 user property
    (name, value) the message must carry; never a message past its own MQTT 5 expiry, which the
    sweep removes only every `sweepSeconds`: apps were handed one seconds late ("unlock, valid
    1 s" acted on 4.6 s after; review "mqtt5")."""
    if topic is None and user_property is None:
        return unexpired
    pair = None if user_property is None else list(user_property)

    def keep(message: Message) -> bool:
        return ((topic is None or topic_matches(topic, message.topic)) and
                (pair is None or pair in message.properties.get("user_properties", ())) and
                unexpired(message))
    return keep


def unexpired(message: Message) -> bool:
    """Whether `message` is within its own MQTT 5 expiry (its age is the daemon's real one)."""
    own = message.properties.get("message_expiry_interval")
    return not own or message.age < own
