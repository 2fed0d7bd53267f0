"""The records the API carries, defined once: the store builds them (`to_dict` is their wire
form), the client rebuilds them from the wire (`from_wire`). Stdlib only: `flashlexd.client`
re-exports them and must stay light."""
from __future__ import annotations

import datetime as _dt
import json as _json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


_new, _set = object.__new__, object.__setattr__


@dataclass(frozen=True)
class Message:
    """One inbox message. `pk` is the id as a string (what `ack` and the old SDK use).
    `timestamp` is when it arrived, on the wall clock, corrected for a clock step the daemon
    saw since (README "Clock steps"); `age` its real age in seconds when it was read."""
    id: int
    topic: str
    payload: bytes
    timestamp: float
    qos: int = 1
    retain: bool = False
    mid: int = 0
    expires_at: Optional[float] = None
    age: Optional[float] = None
    # MQTT 5: user_properties ([[name, value], ...] in order), content_type,
    # payload_format_indicator, response_topic, correlation_data, message_expiry_interval; {} under 3.1.1
    properties: Dict[str, Any] = field(default_factory=dict)

    @property
    def pk(self) -> str:
        return str(self.id)

    @property
    def received_at(self) -> float:
        """When the ingress stored it (wall clock, step-corrected; its batch's commit, up to
        `ingestCommitMs` after it arrived): the same as `timestamp`."""
        return self.timestamp

    @property
    def datetime(self) -> _dt.datetime:
        """The arrival time, as a local aware datetime."""
        return _dt.datetime.fromtimestamp(self.timestamp).astimezone()

    def text(self, errors: str = "strict") -> str:
        return self.payload.decode("utf-8", errors)

    def json(self) -> Any:
        """The payload parsed as JSON; raises ValueError when it is not JSON."""
        return _json.loads(self.payload)

    def to_dict(self) -> Dict[str, Any]:
        """The wire form (with `pk`, what the old SDK's apps read)."""
        return {"id": self.id, "pk": self.pk, "timestamp": self.timestamp, "topic": self.topic,
                "payload": self.payload, "qos": self.qos, "retain": self.retain, "mid": self.mid,
                "expires_at": self.expires_at, "age": self.age, "properties": self.properties}

    def user_property(self, name: str) -> Optional[str]:
        """The first value of user property `name`, or None."""
        return next((value for key, value in self.properties.get("user_properties", ()) if key == name), None)

    @classmethod
    def filled(cls, fields: Dict[str, Any]) -> "Message":
        """A message whose __dict__ is `fields` (every field, by name; the caller gives the
        dict up). Hot paths (a batch per call: the store's reads, the client's) use it: the
        frozen dataclass __init__ costs one object.__setattr__ per field, twice the time."""
        message = _new(cls)
        _set(message, "__dict__", fields)
        return message

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> "Message":
        return cls.filled({"id": data["id"], "topic": data["topic"], "payload": data["payload"],
                           "timestamp": data["timestamp"], "qos": data.get("qos", 1),
                           "retain": data.get("retain", False), "mid": data.get("mid", 0),
                           "expires_at": data.get("expires_at"), "age": data.get("age"),
                           "properties": data.get("properties") or {}})


@dataclass(frozen=True)
class OutboxEntry:
    """A publish waiting in the outbox for the egress connection, or a dead letter: one the
    broker kept refusing, with the `reason`, the `attempts` made and when (`dead_at`). For a
    queued entry those three are None (the egress counts attempts in memory)."""
    id: int
    topic: str
    payload: bytes
    created: float
    qos: int = 1
    retain: bool = False
    attempts: Optional[int] = None
    reason: Optional[str] = None
    dead_at: Optional[float] = None
    age: Optional[float] = None
    properties: Dict[str, Any] = field(default_factory=dict)  # given to `publish` (Message's names)

    @property
    def size(self) -> int:
        return len(self.payload)

    def to_dict(self) -> Dict[str, Any]:
        """The wire form; `dead_at` only for a dead letter."""
        wire = {"id": self.id, "created": self.created, "topic": self.topic,
                "payload": self.payload, "qos": self.qos, "retain": self.retain, "age": self.age,
                "attempts": self.attempts, "reason": self.reason, "properties": self.properties}
        if self.dead_at is not None:
            wire["dead_at"] = self.dead_at
        return wire

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> "OutboxEntry":
        age = data.get("age")
        return cls(id=int(data["id"]), topic=data["topic"], payload=bytes(data["payload"]),
                   created=float(data["created"]), qos=int(data.get("qos", 1)),
                   retain=bool(data.get("retain", False)), attempts=data.get("attempts"),
                   reason=data.get("reason"), dead_at=data.get("dead_at"),
                   age=None if age is None else float(age), properties=data.get("properties") or {})
