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

And paho's reading of MQTT 5 strings is made to follow the spec (`_conforming_read_utf`).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

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

__all__ = ["paho"]


def _conforming_read_utf(buffer: Any, maxlen: int) -> Any:
    """paho's `readUTF` without its refusal of U+FEFF: MQTT 5 [MQTT-1.5.4-3] says a receiver
    MUST NOT skip or strip it, it is not malformed (mosquitto passes it on). paho dropped the
    link on it, and the broker redelivered the same PUBLISH on each new connection: one
    message with a BOM in a user property, content type or response topic wedged the ingress."""
    from paho.mqtt.properties import MalformedPacket, readInt16
    if maxlen < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = readInt16(buffer)
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    buf = buffer[2:2 + length].decode("utf-8")
    if "\0" in buf:
        raise MalformedPacket("[MQTT-1.5.4-2] Null found in UTF-8 data")
    # surrogates cannot come out of a strict UTF-8 decode: decode() already refused them
    return buf, length + 2


def _conform() -> None:
    import paho.mqtt.properties as properties
    properties.readUTF = _conforming_read_utf


_conform()
