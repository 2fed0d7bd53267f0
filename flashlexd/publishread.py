"""Incoming PUBLISH packets taken straight out of the bytes a socket read brought, without
paho's per-packet machinery.

Draining a backlog, paho's path was ~45% of the ingress worker's CPU: its read state machine,
`decode_publish` (which builds a paho `Properties` for every MQTT 5 message, properties or
not: the costliest part), an `MQTTMessage`, the callback dispatch. The ingress needs none of
it for the common packet, so `DialedClient.take_publishes` hands it the fields read here.

Only the plain case is taken: a PUBLISH at QoS 0 or 1 lying whole in the buffer. The scan
stops at anything else (another packet type, QoS 2, a packet cut by the end of the read,
anything paho would call malformed) and leaves it to paho, which handles it as before. A
non-empty MQTT 5 property block is decoded by paho's own `Properties.unpack` (made linear in
pahoimport.py), so properties are paho's to the byte. QoS 2 never comes (the ingress
subscribes at QoS 1), nor do topic aliases (our CONNECT sets no Topic Alias Maximum); either
would still get what paho gives it (an empty topic is left to `DialedClient._handle_publish`,
which calls it malformed).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties, VariableByteIntegers

# (topic as sent: bytes, UTF-8 not checked; payload; qos; retain; packet id; dup; properties:
# paho `Properties`, or None under 3.1.1 and for an MQTT 5 packet without any)
Publish = Tuple[bytes, bytes, int, bool, int, bool, Optional[Properties]]

_PLAIN = 0x30  # a PUBLISH's first byte with the QoS 2 bit clear (QoS 3 sets it too): & _KIND
_KIND = 0xF4


def parse_publishes(data: bytes, at: int, v5: bool, limit: int, found: List[Publish],
                    properties_limit: Optional[int] = None) -> int:
    """Append to `found` each whole QoS 0/1 PUBLISH in `data` from offset `at` on, at most
    `limit` of them, and return the offset after the last one taken (`at` if none). One with
    an MQTT 5 property block over `properties_limit` bytes is left to paho's path, where
    `DialedClient` drops it undecoded: the same however the reads cut the stream."""
    end = len(data)
    while limit > 0 and at < end:
        header = data[at]
        if header & _KIND != _PLAIN:
            break
        pos, length, shift = at + 1, 0, 0
        while True:  # the remaining length: at most four bytes
            if pos >= end or shift > 21:
                return at  # cut by the end of the read, or malformed (paho says so)
            byte = data[pos]
            pos += 1
            length += (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        stop = pos + length
        if stop > end or length < 2:
            break
        size = (data[pos] << 8) | data[pos + 1]
        topic = data[pos + 2:pos + 2 + size]
        pos += 2 + size
        qos = (header >> 1) & 1
        if pos + 2 * qos > stop or not size:  # an empty topic: malformed, or a Topic Alias
            break
        mid = 0
        if qos:
            mid = (data[pos] << 8) | data[pos + 1]
            pos += 2
        properties = None
        if v5:
            if pos >= stop:
                break  # no property length: malformed
            if data[pos]:
                if properties_limit is not None and _block_length(data[pos:min(pos + 4, stop)]) > properties_limit:
                    break
                properties, used = _properties(data[pos:stop])
                if properties is None:
                    break
                pos += used
            else:
                pos += 1
        found.append((topic, data[pos:stop], qos, bool(header & 1), mid, bool(header & 8), properties))
        at = stop
        limit -= 1
    return at


def _block_length(head: bytes) -> int:
    """A property block's length from its first bytes (0 when malformed: paho says so)."""
    try:
        return int(VariableByteIntegers.decode(head)[0])
    except MalformedPacket:
        return 0


def _properties(block: bytes) -> Tuple[Optional[Properties], int]:
    """A property block (length first) decoded as paho decodes it, and the bytes it used;
    (None, 0) when paho would reject it: the packet is then left to paho to say so."""
    properties = Properties(PacketTypes.PUBLISH)
    try:
        _, used = properties.unpack(block)
    except Exception:  # noqa: BLE001 - paho meets the same bytes next and decides
        return None, 0
    return properties, used


def message_fields(message: Any) -> Publish:
    """A message paho decoded (the packets the scan leaves to it) as the same fields."""
    return (message._topic, message.payload, message.qos, bool(message.retain), message.mid,
            bool(message.dup), message.properties)
