"""The FlashLex SDK 1.4 calls (`FlashlexSDK`), served by flashlexd, for unchanged old apps.

    from flashlexd.client.compat import FlashlexSDK
    sdk = FlashlexSDK("/etc/flashlex/config.yml")      # or a config dict, or socket_path=...
    for message in sdk.getSubscribedMessages():
        print(message["message"]["payload"])
        sdk.removeMessageFromStore(message)
    sdk.collectMessage({"temp": 21.5})                   # now: queued to the egress topic

Differences from the old SDK, on purpose:
- `sortMessages` really sorts (the old one discarded its `sorted()` result); messages come by
  arrival time, newest first with `reverse=True`. `count <= 0` means all.
- `pk` is the flashlexd message id as a string; `removeMessageFromStore` acks by it.
- `message.payload` is the decoded JSON when the payload parses, else the text, else (not
  UTF-8) the bytes; the old SDK crashed on such payloads. The old store's `pos` key (a typo
  of `qos`) is kept next to `qos` for code that reads it.
- `collectMessage` publishes through the daemon's egress connection instead of the FlashLex
  HTTP API. It keeps the old return convention: 200 once durably queued, 500 on failure
  (the reason is logged and kept in `last_error`).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any, Dict, List, Optional

from flashlexd.client.connection import Client
from flashlexd.client.errors import FlashlexError
from flashlexd.client.message import Message
from flashlexd.client.wire import MAX_LIMIT, SOCKET_ENV

log = logging.getLogger("flashlexd.client.compat")


def _socket_from_config(config: Any) -> Optional[str]:
    """flashlex.app.socket.path from a config dict or file, when it says one (best effort)."""
    if isinstance(config, (str, os.PathLike)):
        try:
            import yaml  # optional: the client itself needs only msgpack
            with open(config, encoding="utf-8") as handle:
                config = yaml.safe_load(handle)
        except Exception:
            return None
    try:
        path = config["flashlex"]["app"]["socket"]["path"]
    except (KeyError, TypeError):
        return None
    return path if isinstance(path, str) and path else None


def message_to_legacy(message: Message) -> Dict[str, Any]:
    """The dict shape the old SDK stored and returned for one message."""
    try:
        text: Any = message.payload.decode("utf-8")
        try:
            payload: Any = json.loads(text)
        except ValueError:
            payload = text
    except UnicodeDecodeError:
        payload = message.payload
    stamp = datetime.datetime.fromtimestamp(message.timestamp).strftime("%Y-%m-%d %H:%M:%S")
    return {"pk": message.pk, "timestamp": message.timestamp, "datetime": stamp,
            "message": {"topic": message.topic, "payload": payload, "qos": message.qos,
                        "pos": message.qos, "retain": message.retain, "mid": message.mid}}


class FlashlexSDK:
    """The old SDK's message calls. Connects lazily, so constructing it never fails."""

    def __init__(self, config: Any = None, socket_path: Optional[str] = None,
                 timeout: float = 10.0, **_legacy: Any):
        self._config = config
        # the daemon's own precedence: --socket, then $FLASHLEXD_SOCKET, then the config file
        self._path = socket_path or os.environ.get(SOCKET_ENV) or _socket_from_config(config)
        self._timeout = timeout
        self._client: Optional[Client] = None
        self.last_error: Optional[FlashlexError] = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self._path, self._timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def getConfig(self) -> Any:
        return self._config

    def setConfig(self, config: Any) -> None:
        self._config = config

    def loadConfig(self, configFile: str) -> Any:
        import yaml  # only this legacy helper needs PyYAML
        with open(configFile, encoding="utf-8") as handle:
            return yaml.safe_load(handle)

    def getSubscribedMessages(self, count: int = -1, sortMessages: bool = True,
                              reverse: bool = False) -> List[Dict[str, Any]]:
        """Unacknowledged messages as old-SDK dicts; `count` > 0 limits how many."""
        newest_first = sortMessages and reverse
        wanted = count if count > 0 and not newest_first else None
        found: List[Message] = []
        after: Optional[int] = None
        while wanted is None or len(found) < wanted:
            page = self.client.messages(limit=min(MAX_LIMIT, wanted - len(found)) if wanted else MAX_LIMIT,
                                        after=after)
            if not page:
                break
            found.extend(page)
            after = page[-1].id
        if sortMessages:
            found.sort(key=lambda m: (m.timestamp, m.id), reverse=reverse)
        if count > 0:
            found = found[:count]
        return [message_to_legacy(m) for m in found]

    def removeMessageFromStore(self, message: Any) -> int:
        """Acknowledge one message given as an old-SDK dict (by its pk), a Message or a pk."""
        if isinstance(message, dict):
            if "pk" not in message:
                raise KeyError("pk key is required")
            message = message["pk"]
        return self.client.ack([message])

    def collectMessage(self, message: Any) -> int:
        """Publish to the egress topic: 200 once queued, 500 on failure (see `last_error`)."""
        try:
            self.client.publish(message)
        except FlashlexError as exc:
            self.last_error = exc
            log.warning("collectMessage failed: %s", exc)
            return 500
        self.last_error = None
        return 200
