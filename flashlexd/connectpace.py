"""When each link's last CONNECT went out, kept in memory that the daemon's processes share.

AWS IoT Core allows one CONNECT a second per client id. A worker replaced after a crash or a
hang must not CONNECT within a second of its predecessor's last one, which may have gone out
a moment before it died, before the link was up and anything was noted in the store. So the
supervisor maps one small anonymous shared region (`share`) before it forks the fork server:
every worker inherits it, stamps each CONNECT there just before it goes out, and a new worker
reads its predecessor's stamp. CLOCK_MONOTONIC, the same for every process of a boot, which a
clock step does not move. Nothing is written to disk (no SD-card wear, nothing a full disk
refuses); a power cut forgets it, and a reboot takes more than a second anyway. A worker run on
its own (tests, `python -m flashlexd.workers`) finds none (`shared()` is None).
"""
from __future__ import annotations

import mmap
import struct
import time
from typing import Optional

_STAMP = struct.Struct("=q")  # monotonic nanoseconds of the last CONNECT; 0: none yet
LINKS = ("ingress", "egress")


class ConnectPace:
    def __init__(self) -> None:
        self._region = mmap.mmap(-1, _STAMP.size * len(LINKS))  # anonymous, MAP_SHARED

    def sent(self, link: str) -> None:
        _STAMP.pack_into(self._region, _STAMP.size * LINKS.index(link), time.monotonic_ns())

    def seconds_since(self, link: str) -> Optional[float]:
        """Seconds since a CONNECT of `link` went out from any process sharing this; None: none."""
        (stamp,) = _STAMP.unpack_from(self._region, _STAMP.size * LINKS.index(link))
        return None if stamp <= 0 else (time.monotonic_ns() - stamp) / 1e9


_shared: Optional[ConnectPace] = None


def share() -> None:
    """In the supervisor, before the fork server is forked: the region its workers inherit."""
    global _shared
    _shared = ConnectPace()


def shared() -> Optional[ConnectPace]:
    return _shared
