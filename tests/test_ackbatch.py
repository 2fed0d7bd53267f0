"""A batch's PUBACKs are joined into one queue entry (one write), byte for byte what paho would
have sent one by one, and nothing else in paho's queue is touched."""
from __future__ import annotations

import collections
import struct

from paho.mqtt.client import PUBACK, PUBLISH, UNSUBSCRIBE

from flashlexd.ackbatch import join_pubacks


def entry(command: int, mid: int, pos: int = 0, info=None) -> dict:
    packet = struct.pack("!BBH", command, 2, mid)
    return {"command": command, "mid": mid, "qos": 1, "pos": pos, "to_process": len(packet) - pos,
            "packet": packet, "info": info}


def test_runs_of_pubacks_become_one_entry_with_the_same_bytes_in_order():
    queue = collections.deque([entry(PUBACK, 1, pos=2), entry(PUBACK, 2), entry(PUBACK, 3),
                               entry(UNSUBSCRIBE | 2, 9), entry(PUBACK, 4), entry(PUBACK, 5),
                               entry(PUBLISH, 6, info=object()), entry(PUBACK, 7)])
    before = b"".join(p["packet"][p["pos"]:] for p in queue)
    join_pubacks(queue)
    assert [p["mid"] for p in queue] == [1, 3, 9, 5, 6, 7]  # 1 was half written: left alone
    assert b"".join(p["packet"][p["pos"]:] for p in queue) == before
    assert all(p["to_process"] == len(p["packet"]) - p["pos"] for p in queue)
    assert queue[1]["packet"] == entry(PUBACK, 2)["packet"] + entry(PUBACK, 3)["packet"]
