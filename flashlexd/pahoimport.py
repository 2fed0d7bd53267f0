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
