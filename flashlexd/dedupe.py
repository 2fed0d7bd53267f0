"""Application dedupe keys (`flashlex.app.db.dedupe`): the one defence against a broker's
redeliveries after its OWN crash.

A broker that acknowledged a PUBLISH but had not yet persisted our PUBACK when it crashed
restores the message and sends it again with DUP=0 (RabbitMQ does), on a new or a resumed
session: MQTT alone cannot tell it from a new message. When the application puts a unique id in
its messages, the store refuses a second message with the same id within `window_seconds`.

`json:<dotted.path>` reads the id from a JSON payload; `mqtt5:<user-property>` from an MQTT 5
user property, so it takes effect only once the daemon speaks MQTT 5 (today's 3.1.1 messages
carry none). A message without the key (not JSON, path missing, null or empty) is stored
normally: an empty id made every message carrying it a duplicate of the first (found by review).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

SOURCES = ("json", "mqtt5")
DEFAULT_WINDOW_SECONDS = 3600.0


@dataclass(frozen=True)
class DedupeKey:
    source: str                  # "json" or "mqtt5"
    name: str                    # dotted JSON path, or the user property's name
    window_seconds: float = DEFAULT_WINDOW_SECONDS

    @classmethod
    def parse(cls, spec: str, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> "DedupeKey":
        """`json:a.b` or `mqtt5:name`; ValueError says what is wrong."""
        source, _, name = spec.partition(":")
        if source not in SOURCES or not name.strip():
            raise ValueError(f"expected json:<dotted.path> or mqtt5:<user-property-name>, got {spec!r}")
        if source == "json" and not all(name.split(".")):
            raise ValueError(f"empty part in the JSON path {name!r}")
        return cls(source, name.strip(), window_seconds)

    def of(self, payload: bytes, properties: Any = None) -> Optional[bytes]:
        """The message's key (bytes), or None when it has none."""
        if self.source == "mqtt5":
            for name, value in getattr(properties, "UserProperty", None) or ():
                if name == self.name:
                    return value.encode() or None  # empty: no id (every such message was one)
            return None
        try:
            value: Any = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        for part in self.name.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return None
        if value is None or value == "":  # no id, not one id shared by all such messages
            return None
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
