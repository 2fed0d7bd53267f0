"""What the API returns, as small frozen records (built from the wire dicts)."""
from __future__ import annotations

import datetime as _dt
import json as _json
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass(frozen=True)
class Message:
    """One inbox message. `pk` is the id as a string (what `ack` and the old SDK use)."""
    id: int
    topic: str
    payload: bytes
    timestamp: float
    qos: int = 1
    retain: bool = False
    mid: int = 0
    expires_at: Optional[float] = None

    @property
    def pk(self) -> str:
        return str(self.id)

    @property
    def datetime(self) -> _dt.datetime:
        """The arrival time, as a local aware datetime."""
        return _dt.datetime.fromtimestamp(self.timestamp).astimezone()

    def text(self, errors: str = "strict") -> str:
        return self.payload.decode("utf-8", errors)

    def json(self) -> Any:
        """The payload parsed as JSON; raises ValueError when it is not JSON."""
        return _json.loads(self.payload)

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> "Message":
        # Hot path (a batch per call): filling __dict__ skips the frozen dataclass __init__,
        # which costs one object.__setattr__ per field; the fields are the same.
        message = object.__new__(cls)
        message.__dict__.update(id=data["id"], topic=data["topic"], payload=data["payload"],
                                timestamp=data["timestamp"], qos=data.get("qos", 1),
                                retain=data.get("retain", False), mid=data.get("mid", 0),
                                expires_at=data.get("expires_at"))
        return message


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

    @property
    def size(self) -> int:
        return len(self.payload)

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> "OutboxEntry":
        return cls(id=int(data["id"]), topic=data["topic"], payload=bytes(data["payload"]),
                   created=float(data["created"]), qos=int(data.get("qos", 1)),
                   retain=bool(data.get("retain", False)), attempts=data.get("attempts"),
                   reason=data.get("reason"), dead_at=data.get("dead_at"))
