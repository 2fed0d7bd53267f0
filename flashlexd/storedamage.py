"""How the store tells damage from other errors, and what it does when it meets some.

LMDB does not checksum pages: a garbled page surfaces as one of several LMDB errors, or as a
record that no longer decodes, or as an impossible value inside one that does. `guarded` wraps
the Store's public methods: any of these becomes the store's StoreDamaged (one log line, via
`Store._damaged`), and once a store has met damage its writes are refused up front (read-only:
writing into a damaged tree could spread the damage; ingress then acknowledges nothing).
"""
from __future__ import annotations

import functools
import struct
from typing import Any, Callable

import lmdb
import msgpack

# LMDB's ways of saying that a page it read is not what the file's structure promised
# (BadTxnError: a transaction that met one of these is unusable, and says so on the next call)
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError,
                 lmdb.CursorFullError, lmdb.IncompatibleError, lmdb.BadDbiError, lmdb.BadTxnError)
WRITES = frozenset({"append", "ack", "ack_each", "purge", "expire", "note_clock", "outbox_append",
                    "outbox_append_each", "outbox_remove", "outbox_drop", "outbox_dead_letter",
                    "dead_retry", "note_session", "note_queued_online", "note_link_up", "note_session_topics",
                    "note_fallback", "forget_fallbacks",
                    "forget_unconfirmed", "consumer_declare", "consumer_register", "consumer_ack", "consumer_ack_each", "consumer_reset_step",
                    "consumer_remove_step", "consumer_trim_step", "consumer_catch_up_step",
                    "_apply_commit"})


class CorruptRecord(ValueError):
    """A stored value that does not decode as the record its database holds."""


# What a garbled record that still decodes leads to: an id or time that does not fit its field
# (struct.error, OverflowError), or py-lmdb tripping over a garbage node (SystemError).
IMPOSSIBLE_VALUES = (CorruptRecord, struct.error, OverflowError, SystemError)


def describe(exc: Exception) -> str:
    if isinstance(exc, lmdb.BadTxnError):  # what LMDB says after a failed page read
        return f"a page did not read back, LMDB aborted the transaction ({exc})"
    return f"{type(exc).__name__}: {exc}"


def guarded(method: Callable) -> Callable:
    """Damage met inside a Store method becomes the store's StoreDamaged; a write to a store
    that met damage is refused before it starts."""
    writes = method.__name__ in WRITES

    @functools.wraps(method)
    def run(store: Any, *args: Any, **kwargs: Any) -> Any:
        if writes and store.damage is not None:
            raise store._damaged(None)
        try:
            return method(store, *args, **kwargs)
        except DAMAGE_ERRORS + IMPOSSIBLE_VALUES as exc:
            raise store._damaged(describe(exc)) from None
    return run


def unpack_record(raw: bytes, fields: int) -> list:
    """A stored msgpack array of at least `fields` items (later schemas append stamp fields);
    CorruptRecord for anything else."""
    try:
        record = msgpack.unpackb(raw)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptRecord(f"a record does not decode ({exc})") from None
    if not isinstance(record, list) or len(record) < fields:
        raise CorruptRecord(f"a record is not an array of {fields} or more fields")
    return record
