"""The FlashLex SDK (`flashlexiot` 0.9.16, `flashlexiot.sdk`) served by flashlexd, for unchanged apps.

    from flashlexd.client.compat import FlashlexSDK      # was: from flashlexiot.sdk import FlashlexSDK
    sdk = FlashlexSDK(config)                            # the loaded config dict (or a file path)
    for message in sdk.getSubscribedMessages():
        print(message["message"]["payload"])
        sdk.removeMessageFromStore(message)
    sdk.collectMessage({"temp": 21.5})                   # 200, or 500 and a logged reason

Every public method of the old `FlashlexSDK` is here, and its module functions `openFile` and
`createToken`. The rule: an old app never sees a record shape, an exception or a return value the old SDK
could not produce. So:
- Only messages whose payload is a JSON value (what the old service's `json.loads` accepted)
  are returned, in the old record shape. Others are left in the inbox for native clients (not
  acknowledged), counted in `skipped_messages()`, and logged once per message by this layer;
  they go when `flashlex.app.db.expireSeconds` expires them (or a native client acks them).
- While the daemon is down (or not answering) the calls give the old SDK's answers: `[]`,
  500, None; one warning per outage, and the same object carries on when the daemon is back.
  Other daemon failures surface as `OSError`, as the old file store's did.
- Unknown pks raise `KeyError(pk)`, a dict without `pk` raises `KeyError('pk key is required')`.
The README's migration section lists what still differs.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from flashlexd.client.connection import Client, socket_path as resolved_socket
from flashlexd.client.errors import ConnectionLost, DaemonNotRunning, FlashlexError, RpcTimeout
from flashlexd.client.message import Message
from flashlexd.client.escape import printable
from flashlexd.client.wire import CONSUMER_NAME_RULE, ID_LIMIT, MAX_LIMIT, SOCKET_ENV, Code, valid_consumer_name

log = logging.getLogger("flashlexd.client.compat")

_UNAVAILABLE = (DaemonNotRunning, RpcTimeout)  # the daemon is down, restarting or hung


def _unavailable(exc: FlashlexError) -> bool:
    """Down, hung, or answering `busy` (at its connection cap or read budget): for an old app
    all the same, the FlashLex service not being there, so the old answers, not an exception."""
    return isinstance(exc, _UNAVAILABLE) or getattr(exc, "code", None) == Code.BUSY
_NOT_DECODED = object()


class _SkipLog:
    """Non-JSON messages this process has left for native clients: counted, logged once each.
    Kept per process (not per SDK object) because apps often make a new object per loop."""

    def __init__(self) -> None:
        self.count = 0
        self._logged: Set[Tuple[str, int]] = set()  # (socket path, message id)
        self._lock = threading.Lock()

    def note(self, path: str, message: Message) -> None:
        with self._lock:
            if (path, message.id) in self._logged:
                return
            self._logged.add((path, message.id))
            self.count += 1
        until = ("until a native client acknowledges it (no flashlex.app.db.expireSeconds)"
                 if message.expires_at is None else
                 "until it expires at " + datetime.datetime.fromtimestamp(message.expires_at)
                 .strftime("%Y-%m-%d %H:%M:%S"))
        log.warning("flashlexd message %s on %s is not JSON (%d bytes): not returned to FlashLex SDK"
                    " calls; it stays in the inbox %s", message.pk, printable(message.topic),
                    len(message.payload), until)

    def forget_except(self, path: str, present: Set[int]) -> None:
        """After a full scan: forget messages that are gone, so the set stays inbox-sized."""
        with self._lock:
            self._logged = {(p, i) for p, i in self._logged if p != path or i in present}


_SKIPPED = _SkipLog()


class _Outages:
    """Sockets found unavailable since they last answered. Kept per process, like _SkipLog: an
    app that makes a new SDK object per loop pass gets one warning per outage, not per pass."""

    def __init__(self) -> None:
        self._down: Set[str] = set()
        self._lock = threading.Lock()

    def went_down(self, path: str) -> bool:
        """Note `path` as down; True only for the first note of this outage."""
        with self._lock:
            first = path not in self._down
            self._down.add(path)
        return first

    def came_back(self, path: str) -> bool:
        """Note `path` as answering; True when it was down."""
        with self._lock:
            was_down = path in self._down
            self._down.discard(path)
        return was_down


_OUTAGES = _Outages()


def skipped_messages() -> int:
    """How many distinct non-JSON messages FlashLex SDK calls in this process have left alone."""
    return _SKIPPED.count


def json_payload(message: Message) -> Any:
    """The payload as the old service decoded it (`json.loads(payload.decode('utf-8'))`), or
    `_NOT_DECODED` when that raised: such a message never reached the old store."""
    try:
        return json.loads(message.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _NOT_DECODED


def message_to_legacy(message: Message, payload: Any) -> Dict[str, Any]:
    """The record the old service stored (flashlexiot/backend/callbacks.py, handleMessage):
    `pos` (sic) is the QoS and `retain` an int, as its MQTT client gave them."""
    stamp = datetime.datetime.fromtimestamp(message.timestamp).strftime("%Y-%m-%d %H:%M:%S")
    return {"pk": message.pk, "timestamp": message.timestamp, "datetime": stamp,
            "message": {"topic": message.topic, "payload": payload, "pos": message.qos,
                        "retain": int(message.retain), "mid": message.mid}}


def _document(config: Any) -> Any:
    """The config as a mapping: a dict as given, a file path read (best effort, PyYAML)."""
    if not isinstance(config, (str, os.PathLike)):
        return config
    try:
        import yaml  # optional: the client itself needs only msgpack
        with open(config, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except Exception as exc:  # the socket path then comes from $FLASHLEXD_SOCKET or the default
        log.warning("%s: cannot read the config for its socket path (%s); using the default",
                    os.fspath(config), exc)
        return None


_warned_sections: Set[str] = set()


def _socket_from_config(document: Any) -> Optional[str]:
    """flashlex.app.socket.path when the config says one. Top-level sections other than
    `flashlex` (an app's own settings) are warned about once and ignored, as `flashlexd run` does."""
    if isinstance(document, dict):
        for key in document:
            if key != "flashlex" and str(key) not in _warned_sections:
                _warned_sections.add(str(key))
                log.warning("%s: unknown top-level section, ignored", key)
    try:
        path = document["flashlex"]["app"]["socket"]["path"]
    except (KeyError, TypeError):
        return None
    return path if isinstance(path, str) and path else None


def openFile(fileName: str) -> str:
    """The old module function: a text file's content."""
    with open(fileName, "r") as handle:
        return handle.read()


def createToken(thingId: str, payload: Dict[str, Any], privateKey: str) -> str:
    """The old module function: an RS256 JWT with `kid` = the thing id, as a str. Needs PyJWT
    and cryptography (`pip install PyJWT cryptography`), as the old SDK did; the old code's
    `.decode('utf-8')` only worked with PyJWT 1.x, this works with 1.x and 2.x."""
    import jwt  # only this legacy helper needs PyJWT
    token = jwt.encode(payload, privateKey, algorithm="RS256", headers={"kid": thingId})
    return token.decode("utf-8") if isinstance(token, bytes) else token


def _pk_id(pk: Any) -> int:
    """A pk the daemon knows as an id; anything else is a key the old store would not have held."""
    if isinstance(pk, str) and pk.isascii() and pk.isdigit() and len(pk) <= 20 and int(pk) < ID_LIMIT \
            and str(int(pk)) == pk:  # "0001" is not the pk "1": the old store matched exact strings
        return int(pk)
    raise KeyError(pk)


class FlashlexSDK:
    """`flashlexiot.sdk.FlashlexSDK`'s methods. Connects lazily: constructing it never fails."""

    def __init__(self, config: Any = None, socket_path: Optional[str] = None, timeout: float = 10.0,
                 consumer: Optional[str] = None):
        """`consumer`: a named consumer whose reads and removals are this app's alone (the old
        SDK's removal takes a message from every app: two old apps on one device split the
        messages between them; review "consumers"). A bad name raises ValueError here."""
        if consumer is not None and not valid_consumer_name(consumer):
            raise ValueError(f"consumer must be {CONSUMER_NAME_RULE}, not {consumer!r}")
        self._config, self._consumer = config, consumer
        # the config the app names before $FLASHLEXD_SOCKET: with two things on a device, one
        # exported for flashlexctl sent an app to the other thing's messages without a word
        configured, exported = _socket_from_config(_document(config)), os.environ.get(SOCKET_ENV)
        if not socket_path and configured and exported and exported != configured:
            log.warning("the config names socket %s: used, not $%s (%s; the daemon takes that"
                        " variable before its config, if it shares this environment)",
                        configured, SOCKET_ENV, exported)
        self._path = resolved_socket(socket_path or configured or exported)
        self._timeout = timeout
        self._client: Optional[Client] = None
        self.last_error: Optional[BaseException] = None

    @property
    def client(self) -> Client:
        """The native client under this object (connects on first use)."""
        if self._client is None:
            self._client = Client(self._path, self._timeout, self._consumer)
            self._client._warn_away = False  # one warning per outage: this layer's (_note_outage)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __del__(self) -> None:
        """The old SDK had nothing to close, so its apps never call `close()`: an object going
        away closes its connection (an unclosed socket is a ResourceWarning under `-X dev`)."""
        if getattr(self, "_client", None) is not None:
            self.close()

    # -- config (the old SDK kept it as given; loadConfig read YAML) ---------------------------

    def getConfig(self) -> Any:
        return self._config

    def setConfig(self, config: Any) -> None:
        self._config = config

    def loadConfig(self, configFile: str) -> Any:
        import yaml  # only this legacy helper needs PyYAML
        with open(configFile, encoding="utf-8") as handle:
            return yaml.safe_load(handle)

    # -- the store -----------------------------------------------------------------------------

    def getSubscribedMessages(self, count: int = -1, sortMessages: bool = True,
                              reverse: bool = False) -> List[Dict[str, Any]]:
        """JSON messages in arrival order, the first `count` when `count` > 0. `sortMessages`
        and `reverse` change nothing, as in the old SDK (it discarded its `sorted()` result)."""
        try:
            found = self._json_messages(count if count > 0 else None)
        except FlashlexError as exc:
            return self._failed(exc, [])
        self._answered()
        return [message_to_legacy(message, payload) for message, payload in found]

    def _json_messages(self, wanted: Optional[int]) -> List[Tuple[Message, Any]]:
        found: List[Tuple[Message, Any]] = []
        skipped: Set[int] = set()
        after: Optional[int] = None
        while wanted is None or len(found) < wanted:
            page = self.client.messages(limit=MAX_LIMIT, after=after)
            if not page:
                _SKIPPED.forget_except(self.client.path, skipped)
                break
            for message in page:
                payload = json_payload(message)
                if payload is _NOT_DECODED:
                    skipped.add(message.id)
                    _SKIPPED.note(self.client.path, message)
                elif wanted is None or len(found) < wanted:
                    found.append((message, payload))
            after = page[-1].id
        return found

    def removeMessageFromStore(self, message: Any) -> None:
        """Acknowledge the message with this record's pk. KeyError for a record without one or
        an unknown pk, as the old store raised; while the daemon is down the message stays (it
        is returned again later) and a warning says so."""
        if 'pk' in message:  # the old test, kept: a str argument behaves as it did
            pk = message['pk']
        else:
            raise KeyError('pk key is required')
        record_id = _pk_id(pk)
        named = {} if self._consumer is None else {"consumer": self._consumer}
        try:
            try:
                removed: Optional[int] = self.client.call("ack", ids=[record_id], **named)
            except ConnectionLost:  # a restart: the ack may be done, its answer lost with the link
                self.client.call("ack", ids=[record_id], **named)
                removed = None  # a 0 now says nothing of the pk: no KeyError for a removed record
        except FlashlexError as exc:
            return self._failed(exc, None)
        self._answered()
        if removed == 0:
            raise KeyError(pk)
        return None

    def setMessageToStore(self, message: Dict[str, Any]) -> None:
        """Put a record's payload on its topic through the daemon, so it comes back through the
        broker (when ingress subscribes to that topic) as a new message with the daemon's pk.
        Unlike reads, this cannot answer as if nothing happened: a down daemon is an OSError."""
        body = json.dumps(message["message"]["payload"])  # TypeError, as the old store's dump raised
        topic = message["message"].get("topic")
        if not topic:  # the old SDK stored it locally; it goes through the broker here (review "compat")
            raise ValueError("setMessageToStore: the record has no message.topic (flashlexd publishes"
                             " it to the broker on that topic, to come back through the ingress)")
        try:
            self.client.publish(body.encode("utf-8"), topic=topic,
                                qos=1 if message["message"].get("pos", 1) else 0)
        except FlashlexError as exc:
            self._note_outage(exc)
            raise OSError(f"setMessageToStore: {exc}") from exc
        self._answered()

    def collectMessage(self, message: Any) -> int:
        """Queue `json.dumps(message)` (the old SDK's request body) to the egress topic: 200 once
        durably queued, 500 when it cannot be encoded or queued (the reason is logged)."""
        try:
            body = json.dumps(message)
        except (TypeError, ValueError, RecursionError) as exc:
            self.last_error = exc
            log.warning("collectMessage: not sent, the message is not JSON-serialisable: %s", exc)
            return 500
        try:
            self.client.publish(body.encode("utf-8"))
        except FlashlexError as exc:  # the old SDK's `except:` answered 500 to every failure
            self.last_error = exc
            if _unavailable(exc):
                self._note_outage(exc)
            else:
                log.warning("collectMessage: not queued: %s", exc)
            return 500
        self._answered()
        self.last_error = None
        return 200

    # -- the daemon's availability -------------------------------------------------------------

    def _failed(self, exc: FlashlexError, answer: Any) -> Any:
        """The old SDK's answer while the daemon is unavailable; other failures as OSError
        (what the old SDK's file store raised), with the daemon's reason."""
        self.last_error = exc
        if not _unavailable(exc):
            raise OSError(f"flashlexd: {exc}") from exc
        self._note_outage(exc)
        return answer

    def _note_outage(self, exc: FlashlexError) -> None:
        if _unavailable(exc) and _OUTAGES.went_down(self._path):
            log.warning("%s; FlashLex SDK calls answer [] / 500 and remove nothing until it is back",
                        exc)

    def _answered(self) -> None:
        if _OUTAGES.came_back(self._path):
            log.info("flashlexd answers again on %s", self._path)
