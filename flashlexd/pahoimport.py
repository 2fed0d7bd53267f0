"""`paho.mqtt.client` without loading `urllib.request`: the daemon's modules import paho from here.

paho imports `urllib.request` at its top for one thing, reading proxy settings from the
environment in `Client._get_proxy()`, which flashlexd never reaches (its `DialedClient` makes
the socket itself, and without PySocks paho asks no proxy anyway). That import drags in
http.client and the email package: 1.4 MB of every daemon's memory (measured: a fresh
interpreter after the supervisor's imports, 16.7 -> 15.3 MB private), loaded before the fork
and never used by any of the five processes.

So before paho is imported, `urllib.request` is a stand-in module whose first attribute
lookup imports the real one and answers from it (a program that does use it afterwards gets
the real module, only later). Nothing is installed when the real module is already loaded.

And paho's reading of MQTT 5 strings is made to follow the spec (`_conforming_read_utf`), and
its reading of a property block to take linear time (`_linear_unpack`).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Dict, List, Optional, Tuple

DEFERRED = "urllib.request"


class _Deferred(types.ModuleType):
    """Stands in for a module not imported yet; the first attribute asked for imports it."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)  # also rebinds the parent's attribute
        return getattr(real, name)


def defer(name: str) -> None:
    """Make `import name` cheap until the module is used (no-op if it is loaded already)."""
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    stand_in = _Deferred(name)
    sys.modules[name] = stand_in
    setattr(importlib.import_module(parent), child, stand_in)


defer(DEFERRED)

import paho.mqtt.client as paho  # noqa: E402  (after the stand-in, on purpose)
from paho.mqtt import properties  # noqa: E402
from paho.mqtt.properties import MalformedPacket, MQTTException, VariableByteIntegers  # noqa: E402

__all__ = ["paho"]


def _conforming_read_utf(buffer: Any, maxlen: int) -> Any:
    """paho's `readUTF` without its refusal of U+FEFF: MQTT 5 [MQTT-1.5.4-3] says a receiver
    MUST NOT skip or strip it, it is not malformed (mosquitto passes it on). paho dropped the
    link on it, and the broker redelivered the same PUBLISH on each new connection: one
    message with a BOM in a user property, content type or response topic wedged the ingress."""
    if maxlen < 2 or len(buffer) < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = int.from_bytes(buffer[:2], "big")
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    buf = buffer[2:2 + length].decode("utf-8")
    if "\0" in buf:
        raise MalformedPacket("[MQTT-1.5.4-2] Null found in UTF-8 data")
    # surrogates cannot come out of a strict UTF-8 decode: decode() already refused them
    return buf, length + 2


def _linear_unpack(self: Any, buffer: Any) -> Any:
    """paho's `Properties.unpack` in linear time. paho cut the rest of the buffer after each
    property (a copy) and built the user property list anew at each pair: one PUBLISH with
    60,000 empty user properties (360 KB) took 11.6 s, growing with the square of the count,
    so the ingress sent no heartbeat, was aborted as hung, and the broker sent the same
    PUBLISH first again on each new link (found by review). The same values and checks, read
    at offsets; a property paho refuses otherwise (repeated, not for this packet, unknown)
    is malformed, as the spec calls it."""
    self.clear()
    length, at = VariableByteIntegers.decode(buffer[:4])
    end = at + length
    if end > len(buffer):
        raise MalformedPacket("Property length past the end of the packet")
    pairs: Optional[List[Any]] = None  # the user properties so far: paho's checks ran on the first
    while at < end:
        identifier, used = VariableByteIntegers.decode(buffer[at:at + 4])
        known = self.properties.get(identifier)
        if known is None:
            raise MalformedPacket(f"Unknown property identifier {identifier}")
        value, size = _property_value(buffer, at + used, end, self.types[known[0]])
        at += used + size
        if identifier == USER_PROPERTY and pairs is not None:
            pairs.append(value)  # a string pair: nothing of paho's to check again
            continue
        name = _names(self)[identifier]
        kept = self.__dict__.pop(name, None) if self.allowsMultiple(name) else None
        if hasattr(self, name):
            raise MalformedPacket(f"Property '{name}' must not exist more than once")
        try:
            setattr(self, name, value)  # paho's checks, on this value alone
        except MQTTException as exc:
            raise MalformedPacket(str(exc)) from None
        if kept is not None:  # a Subscription Identifier more: the broker's, one per match
            kept.append(value)
            object.__setattr__(self, name, kept)
        if identifier == USER_PROPERTY:
            pairs = getattr(self, name)
    return self, end


USER_PROPERTY = 38
_FIXED_SIZES = {"Byte": 1, "Two Byte Integer": 2, "Four Byte Integer": 4}  # paho's type names
_NAMES: Dict[int, str] = {}


def _names(properties: Any) -> Dict[int, str]:
    """Identifier -> attribute name (paho looks the name up in a loop over all of them)."""
    if not _NAMES:
        _NAMES.update((identifier, name.replace(" ", "")) for name, identifier in properties.names.items())
    return _NAMES


def _property_value(buffer: Any, at: int, end: int, kind: str) -> Tuple[Any, int]:
    """The value of a property of type `kind` at `at` (its block ends at `end`) and its size
    in bytes, as paho reads it; only the value's own bytes are sliced."""
    size = _FIXED_SIZES.get(kind)
    if size is not None:
        if at + size > end:
            raise MalformedPacket(f"Not enough data to read a {kind}")
        return int.from_bytes(buffer[at:at + size], "big"), size
    if kind == "Variable Byte Integer":
        return VariableByteIntegers.decode(buffer[at:min(at + 4, end)])  # type: ignore[no-any-return]
    if kind == "Binary Data":
        if end - at < 2:
            raise MalformedPacket("Not enough data to read binary data length")
        length = int.from_bytes(buffer[at:at + 2], "big")
        if length > end - at - 2:
            raise MalformedPacket("Length delimited binary data too long")
        return buffer[at + 2:at + 2 + length], length + 2
    key, size = _conforming_read_utf(_prefixed(buffer, at), end - at)
    if kind == "UTF-8 Encoded String":
        return key, size
    text, more = _conforming_read_utf(_prefixed(buffer, at + size), end - at - size)  # a pair
    return (key, text), size + more


def _prefixed(buffer: Any, at: int) -> Any:
    """The length-prefixed field at `at` and nothing after it (the reader checks its length)."""
    return buffer[at:at + 2 + int.from_bytes(buffer[at:at + 2], "big")]


def _conform() -> None:
    properties.readUTF = _conforming_read_utf
    properties.Properties.unpack = _linear_unpack


_conform()
