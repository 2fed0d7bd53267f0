"""What MQTT 5 adds, in the daemon's terms: the broker's limits from its CONNACK, reason codes
by name, and a PUBLISH's properties as plain data (what the store keeps and the API carries).

paho-mqtt 2 speaks the protocol (`Properties`, `ReasonCode`); this only translates. Under MQTT
3.1.1 a CONNACK has no properties (no limits known) and messages carry none (empty dict).
paho is imported only where a paho object is built: the API's checks use this module too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from paho.mqtt.properties import Properties

V5, V311 = "5", "3.1.1"
UNSUPPORTED_PROTOCOL = "Unsupported protocol version"  # paho's name for CONNACK 0x84 and 3.1.1's 1
QUOTA_EXCEEDED = 0x97  # a PUBACK saying "later": retried after a backoff, not dead-lettered
# message properties kept end to end: our name -> paho's
PROPERTY_NAMES = {"user_properties": "UserProperty", "content_type": "ContentType",
                  "payload_format_indicator": "PayloadFormatIndicator",
                  "response_topic": "ResponseTopic", "correlation_data": "CorrelationData",
                  "message_expiry_interval": "MessageExpiryInterval"}


def first_protocol(setting: str) -> str:
    """The protocol a first CONNECT speaks for `thing.mqtt.protocol` (`auto` starts with 5)."""
    return V311 if setting == V311 else V5


V5_CLOSES_BEFORE_PROBE = 2  # MQTT 5 CONNECTs closed in a row before 3.1.1 is tried


class ProtocolChoice:
    """Which protocol the next CONNECT speaks under `thing.mqtt.protocol`. `auto` starts with
    MQTT 5 and falls back to 3.1.1 until restart when the broker answers CONNACK "unsupported
    protocol version", or closes the connection at our MQTT 5 CONNECT (RabbitMQ 3.10 does) and
    a 3.1.1 CONNECT then passes; if that 3.1.1 attempt fails too (a refused certificate closes
    both), the close was not about the protocol and MQTT 5 is tried again. Once MQTT 5 worked,
    nothing falls back."""

    def __init__(self, setting: str, fell_back: bool = False):
        """`fell_back`: an earlier worker of this daemon run fell back for this client id."""
        self.auto = setting == "auto"
        self.current = V311 if self.auto and fell_back else first_protocol(setting)
        self.spoke_v5 = False
        self.probing = False  # trying 3.1.1 after a close at our MQTT 5 CONNECT
        self.v5_closes = 0  # MQTT 5 CONNECTs closed before CONNACK in a row

    @property
    def unproven_v5(self) -> bool:
        """Speaking MQTT 5 to a broker that has not accepted it yet."""
        return self.current == V5 and not self.spoke_v5

    def refused(self, reason: Any) -> Optional[str]:
        """A CONNACK refusal: why we fall back (now on 3.1.1), or None when it is no such case."""
        if self.auto and self.current == V5 and str(reason) == UNSUPPORTED_PROTOCOL:
            self.current = V311
            return f"CONNACK {reason_name(reason)}"
        return None

    def closed_before_connack(self) -> bool:
        """The broker closed the link before its CONNACK: True when the next attempt follows at
        once, unreported: MQTT 5 once more after a first close (a network blip must not pin the
        run to 3.1.1), then 3.1.1."""
        if not (self.auto and self.unproven_v5):
            return False
        self.v5_closes += 1
        if self.v5_closes < V5_CLOSES_BEFORE_PROBE:  # one close may be the network's: MQTT 5 again
            return True
        self.current, self.probing = V311, True
        return True

    def connected(self) -> Optional[str]:
        """A CONNACK accepted us: why we fell back, when this was the 3.1.1 try."""
        self.spoke_v5 = self.spoke_v5 or self.current == V5
        self.v5_closes = 0
        if not self.probing:
            return None
        self.probing = False
        return "it closed the connection at our MQTT 5 CONNECT, and 3.1.1 connected"

    def failed(self) -> bool:
        """An attempt failed: a 3.1.1 try goes back to MQTT 5. True when the protocol changed."""
        self.v5_closes = 0  # a failure of another kind ends a row of closes
        if not self.probing:
            return False
        self.current, self.probing = V5, False
        return True


@dataclass(frozen=True)
class BrokerLimits:
    """What the broker's CONNACK said about this link (None: not said; MQTT 3.1.1 says none)."""
    max_packet_size: Optional[int] = None
    receive_maximum: Optional[int] = None
    topic_alias_maximum: Optional[int] = None  # we send no topic aliases: any value is honoured
    server_keepalive: Optional[int] = None  # paho adopts it for its pings; our LinkWatch too
    # paho checks neither: a PUBLISH over them is a protocol error the broker closes the link
    # for (DISCONNECT 0x9B QoS not supported, 0x9A Retain not supported)
    maximum_qos: Optional[int] = None       # None: 2, all of them
    retain_available: Optional[int] = None  # None: 1, retained messages taken

    @classmethod
    def from_connack(cls, properties: Any) -> "BrokerLimits":
        if properties is None:
            return cls()
        return cls(getattr(properties, "MaximumPacketSize", None),
                   getattr(properties, "ReceiveMaximum", None),
                   getattr(properties, "TopicAliasMaximum", None),
                   getattr(properties, "ServerKeepAlive", None),
                   getattr(properties, "MaximumQoS", None),
                   getattr(properties, "RetainAvailable", None))

    def refuses(self, qos: int, retain: bool) -> Optional[str]:
        """Why a PUBLISH with this QoS and retain flag is over what the CONNACK said (the broker
        would close the link over it), or None."""
        if self.maximum_qos is not None and qos > self.maximum_qos:
            return f"QoS {qos} is over the broker's Maximum QoS ({self.maximum_qos})"
        if retain and self.retain_available == 0:
            return "retained, and the broker does not take retained messages (Retain Available 0)"
        return None

    def counters(self) -> Dict[str, Optional[int]]:
        """The figures `status()["mqtt"][link]` shows."""
        return {"broker_max_packet": self.max_packet_size, "broker_receive_maximum": self.receive_maximum,
                "broker_topic_alias_maximum": self.topic_alias_maximum,
                "broker_keepalive": self.server_keepalive, "broker_maximum_qos": self.maximum_qos,
                "broker_retain_available": self.retain_available}


def reason_name(reason: Any) -> str:
    """`Not authorized (0x87)`: a reason code's name with its value, for logs and dead letters."""
    value = getattr(reason, "value", None)
    return f"{reason} (0x{value:02X})" if isinstance(value, int) else str(reason)


def session_properties(expiry_seconds: int, max_packet: Optional[int] = None) -> "Properties":
    """A CONNECT's properties: how long the broker keeps the session after a link drops, and
    the largest packet this client takes (None: no limit; see `packet_limit`). No Receive
    Maximum: mosquitto takes a client's in place of its own in-flight window, so 100 made a
    broker set to 20 (its default) send 100 (found by review)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = expiry_seconds
    if max_packet is not None:
        properties.MaximumPacketSize = max_packet
    return properties


MQTT_STRING_BYTES = 65535  # an MQTT string's longest (a topic): a two-byte length
OVERSIZE_SEEN = 1024 * 1024  # bytes over maxPayloadBytes a PUBLISH may have and still be seen


def packet_limit(max_payload: int) -> int:
    """The ingress's Maximum Packet Size: a PUBLISH it could store (payload and properties up
    to `maxPayloadBytes`) with the longest topic and every header, and OVERSIZE_SEEN more, so
    one a little over the limit still arrives to be dropped with a WARNING and counted. A far
    bigger one was read whole before it was dropped: 64 MB took the worker to 224 MB, and a
    worker killed for memory by it was sent it again at each reconnect, a crash loop (found by
    review). The broker now discards it unsent (MQTT 5 section 3.1.2.11.4); 3.1.1 has no way."""
    return max_payload + MQTT_STRING_BYTES + 2 + 2 + 4 + 5 + OVERSIZE_SEEN  # topic and length, id, headers


def properties_size(kept: Optional[Dict[str, Any]], per_item: int = 0) -> int:
    """The bytes of the kept properties (`properties_of`) a record stores beyond its payload,
    strings counted in UTF-8 (a character may be 4 bytes); `per_item` more for each property
    and each user property pair (a response budget counts their encoding too)."""
    size = 0
    for name, value in (kept or {}).items():
        size += per_item
        if name == "user_properties":
            size += sum(_utf8_size(k) + _utf8_size(v) + per_item for k, v in value)
        elif isinstance(value, (str, bytes)):
            size += _utf8_size(value)
    return size


_INTEGER_WIDTH = {"payload_format_indicator": 1, "message_expiry_interval": 4}  # bytes on the wire


def properties_wire_size(kept: Optional[Dict[str, Any]]) -> int:
    """The bytes the kept properties took in the PUBLISH as sent (MQTT 5, 2.2.2.2): an
    identifier byte each, two length bytes before each string or binary (a user property: one
    identifier, two strings), an integer its fixed width. The inbound size limit counts this:
    an estimate above it dropped messages within the limit (found by review)."""
    size = 0
    for name, value in (kept or {}).items():
        if name == "user_properties":
            size += sum(5 + _utf8_size(k) + _utf8_size(v) for k, v in value)
        elif isinstance(value, (str, bytes)):
            size += 3 + _utf8_size(value)
        else:
            size += 1 + _INTEGER_WIDTH[name]
    return size


def _utf8_size(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)


def properties_of(properties: Any) -> Dict[str, Any]:
    """The kept properties of a received PUBLISH (its paho `Properties`) as a dict (our
    names); {} for None (MQTT 3.1.1, or a packet without properties)."""
    if properties is None:
        return {}
    found: Dict[str, Any] = {}
    for ours, theirs in PROPERTY_NAMES.items():
        value = getattr(properties, theirs, None)
        if value is not None:
            found[ours] = [list(pair) for pair in value] if ours == "user_properties" else value
    return found


def publish_properties(properties: Optional[Dict[str, Any]], expiry: Optional[int]) -> Optional["Properties"]:
    """paho `Properties` for an outgoing PUBLISH (None when there are none). `expiry` is the
    Message Expiry Interval left, in whole seconds."""
    if not properties and expiry is None:
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    packet = Properties(PacketTypes.PUBLISH)
    for ours, value in (properties or {}).items():
        if ours == "user_properties":
            packet.UserProperty = [tuple(pair) for pair in value]
        elif ours != "message_expiry_interval":  # the outbox's own `expiry` says what is left
            setattr(packet, PROPERTY_NAMES[ours], value)
    if expiry is not None:
        packet.MessageExpiryInterval = max(1, int(expiry))
    return packet


def publish_packet_size(topic: str, payload: bytes, properties: Optional[Dict[str, Any]],
                        expiry: Optional[int], qos: int) -> int:
    """The bytes of an MQTT 5 PUBLISH with these properties (`publish_properties`' arguments),
    as the broker's Maximum Packet Size counts them; a QoS 0 one has no packet id."""
    props = 5 if expiry is not None else 0  # id + four-byte integer
    for name, value in (properties or {}).items():
        if name == "user_properties":
            props += sum(5 + len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in value)
        elif name == "payload_format_indicator":
            props += 2
        elif name != "message_expiry_interval":  # strings and binary data: id + length + bytes
            props += 3 + len(value.encode("utf-8") if isinstance(value, str) else value)
    packet_id = 2 if qos else 0
    remaining = 2 + len(topic.encode("utf-8")) + packet_id + _varint_size(props) + props + len(payload)
    return 1 + _varint_size(remaining) + remaining


def _varint_size(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4
