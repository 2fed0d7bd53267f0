"""Every message that crosses the supervisor <-> worker link, in one place.

On the wire a message is a msgpack map with its kind under `t` and its fields beside it (the
framing is `channel.Channel`'s). Each kind is a small frozen dataclass here; `encode` turns one
into that map and `decode` turns a received map back into one (None for anything unknown or
malformed: a torn message from a killed peer is dropped, the next heartbeat repeats the state).

  worker -> supervisor:  Heartbeat, StateReport, MqttReport, Committed
  supervisor -> worker:  Stop, OutboxQueued

A worker may build a message by kind (`build`, what `Worker.report` uses); fields a kind does
not declare are not sent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, Union

KIND = "t"  # the map key holding a message's kind


@dataclass(frozen=True)
class Heartbeat:
    """The worker's loop made progress; carries its counters (shown by `status`)."""
    counters: Dict[str, Any] = field(default_factory=dict)
    kind = "hb"


@dataclass(frozen=True)
class StateReport:
    """The worker's own lifecycle: starting, ready (serving), stopping (finishing its batch)."""
    state: str
    kind = "state"


@dataclass(frozen=True)
class MqttReport:
    """The worker's broker connection went up or down (`error` says why it is down)."""
    connected: bool
    error: Optional[str] = None
    subscriptions: Optional[List[List[Any]]] = None  # the ingress's [filter, granted QoS] when up
    kind = "mqtt"


@dataclass(frozen=True)
class Committed:
    """Ingress committed new inbox records: the supervisor wakes API `wait` calls."""
    kind = "committed"


@dataclass(frozen=True)
class Stop:
    """Finish the current batch and exit (sent with SIGTERM)."""
    kind = "stop"


@dataclass(frozen=True)
class OutboxQueued:
    """Something was queued for egress through the API: publish it now, not at the next poll."""
    kind = "outbox"


LinkMessage = Union[Heartbeat, StateReport, MqttReport, Committed, Stop, OutboxQueued]
_BY_KIND: Dict[str, Type[Any]] = {cls.kind: cls for cls in
                                  (Heartbeat, StateReport, MqttReport, Committed, Stop, OutboxQueued)}


def encode(message: LinkMessage) -> Dict[str, Any]:
    """The wire map of `message`."""
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    fields[KIND] = message.kind
    return fields


def decode(raw: Any) -> Optional[LinkMessage]:
    """The message a received map holds, or None when it is not one this version knows."""
    if not isinstance(raw, dict):
        return None
    cls = _BY_KIND.get(raw.get(KIND))  # type: ignore[arg-type]
    if cls is None:
        return None
    try:
        return _checked(build(cls.kind, **raw))
    except (TypeError, ValueError):
        return None


def build(kind: str, **fields: Any) -> LinkMessage:
    """The message of `kind` from keyword fields; undeclared fields are left out. Raises
    ValueError for an unknown kind and TypeError for a missing field."""
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ValueError(f"unknown link message kind {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in fields.items() if name in names})


def _checked(message: LinkMessage) -> LinkMessage:
    """Field types a peer could get wrong, checked where the supervisor relies on them."""
    if isinstance(message, Heartbeat) and not isinstance(message.counters, dict):
        raise ValueError("heartbeat counters must be a map")
    if isinstance(message, StateReport) and not isinstance(message.state, str):
        raise ValueError("state must be a string")
    return message
