"""The per-message expiry of inbox messages (MQTT 5's Message Expiry Interval): its own small
index, written only for messages that carry one, so the others cost no extra write.

  msgexpiry  boot seq(4) + expiry_ms(8) + inbox id(8) -> b""

Times are in their boot's frame, as in the batch `expiry` index (store.py), so a clock step
does not move them. A message acked, dropped at the cap (dropOldest) or expired first by
`expireSeconds` takes its entry along (`forget`; StoreBase._delete_inbox), and `purge` empties
the index: entries count toward the cap, and left behind until due they filled it (acks at a
steady rate, a day's interval), or made each dropOldest append drop more messages until only
the batch itself was left. An entry whose message is gone all the same (a key that does not
match) is removed by the sweep once due.
"""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

import lmdb
from flashlexd.storerecords import _SEQ, _expiry_prefix

DB_NAME = b"msgexpiry"


class MessageExpiry:
    """The `msgexpiry` database of one store handle."""

    def __init__(self, db: object):
        self.db = db

    def index(self, txn: lmdb.Transaction, seq: int, due: Iterable[Tuple[float, bytes]]) -> None:
        """Index (expires_at in boot `seq`'s frame, inbox key) pairs, inside the append."""
        txn.cursor(db=self.db).putmulti((_expiry_prefix(seq, at) + key, b"") for at, key in due)

    def sweep(self, txn: lmdb.Transaction, cutoff: Callable[[int], bytes],
              remove: Callable[[bytes], bool], budget: int) -> int:
        """Remove (`remove(inbox key)`, True if it was still stored) up to `budget` messages whose
        expiry is before `cutoff(seq)` (an expiry_ms key part, per boot seq). Returns how many."""
        index = txn.cursor(db=self.db)
        removed = visited = seq = 0
        while visited < budget and index.set_range(_SEQ.pack(seq)):
            entry = index.key()
            seq = _SEQ.unpack(entry[:4])[0]
            if entry[4:12] >= cutoff(seq):
                seq += 1  # nothing more due in this boot's part
                continue
            visited += 1
            removed += remove(bytes(entry[12:]))
            index.delete()
        return removed

    def forget(self, txn: lmdb.Transaction, keys: Iterable[bytes]) -> None:
        """Remove these entries (keys as `index` wrote them: StoreBase._expiry_entries)."""
        for key in keys:
            txn.delete(key, db=self.db)

    def pending(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self.db)["entries"]
