"""Acks through the ack journal (ackjournal.py): the store's side, in the supervisor only.

The supervisor serves the API and is the only process that acks for the default consumer, so
it alone knows which acked messages are still in the inbox (journaled, not yet applied): it
keeps their ids (`_hidden`) and every read it serves steps over them (StoreBase._scan_page,
the named consumers' walks, the counts in `stats`). The records are applied to the inbox in
ONE LMDB commit, which also stores the applied-through seq in `meta`, when APPLY_IDS ids wait
or hold APPLY_BYTES of records (the cap counts them until then), at once while the store is
near its cap or its disk is nearly full (an app acking to make room for ingest must free it now), as
soon as the store comes near its cap while acks wait (the loop looks every NEAR_CAP_LOOK), when
the journal is half used, APPLY_SECONDS after the oldest waiting ack, and at close; at
open (the supervisor's start) whatever a crash left unapplied is applied before anything is
served. Replaying a record twice deletes nothing the second time.

Counts: a waiting id still in the inbox counts as acked, not as stored. A waiting id that the
expiry worker (or dropOldest) removes first counts as expired (dropped); its apply finds
nothing: each message is still counted once.

Named consumers' acks are not journaled: they write `cacks`, move floors and may remove a
message only when every matching consumer is done, decisions taken in one transaction with
the state they read (storeconsumers.py); they stay direct commits.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from typing import Iterable, List, Optional, Sequence, Set, Tuple

import lmdb
from flashlexd.ackjournal import FILE_BYTES, FILE_NAME, AckJournal, JournalError, Record, scan
from flashlexd.diskwait import Helper
from flashlexd.storeconsumers import BacklogCount, note_left
from flashlexd.storedamage import guarded
from flashlexd.storerecords import _ID, DiskFull, StoreError

log = logging.getLogger("flashlexd.store")
APPLY_IDS = 256  # waiting acked ids that start an apply (one LMDB commit)
APPLY_BYTES = 1024 * 1024  # ... or record bytes they hold in the inbox (counted against the cap)
APPLY_SECONDS = 60.0  # the longest an acked message stays in the inbox (hidden) before an apply
APPLY_RETRY = 5.0  # seconds between tries after an apply failed
NEAR_CAP = 0.9  # share of the cap used from which every ack is applied at once (frees space now)
NEAR_CAP_LOOK = 0.25  # seconds between the loop's looks at the cap while acks wait
LOW_DISK = 64 * 1024 * 1024  # free bytes on the data dir's filesystem below which likewise
STEP_IDS = 8  # acks per commit, at least, when their one commit found the disk full
STEP_SHARE = 4  # ... or the space reserve's pages over this (a step copies a page or so an id)
_APPLIED = b"ackjournal_applied"  # meta: the seq of the last journal record applied


class JournaledAcks:
    """Mixed into `store.Store`: uses its inbox, meta, `_write` and `_read`."""

    _journal: Optional[AckJournal] = None

    def open_ack_journal(self) -> None:
        """Apply what the journal holds beyond the applied-through seq, then journal acks from
        now on. Journal trouble never stops the start: an unreadable file is set aside (named
        in an ERROR: acks since the last apply may show their messages again), and without a
        journal acks are direct commits, as before."""
        path = self.path / FILE_NAME
        self._pending: List[int] = []
        self._pending_since: Optional[float] = None
        self._pending_bytes = 0
        self._apply_error: Optional[str] = None
        self._apply_retry_at = 0.0
        self._cap_look_at = 0.0
        records = self._journal_records(path)
        try:
            applied = self._applied_through()
        except StoreError as exc:  # damage: the store is read-only, acks are refused anyway
            log.error("ack journal not opened: %s", exc)
            return
        fresh = sorted((r for r in records if r.seq > applied), key=lambda r: r.seq)
        self._seq = max([applied] + [r.seq for r in records])
        self._check_gaps(applied, fresh)
        for record in fresh:
            self._note_pending(record.ids)
        if fresh:
            log.info("ack journal: applying %d acked message id(s) left by the last run", len(self._hidden))
            self.apply_acks()  # on failure they stay hidden, and their records where they are
        if self._pending and path.stat().st_size != FILE_BYTES:
            log.error("ack journal %s: not applied and of the wrong size; acks are direct store"
                      " commits until the next start", path)
            return
        try:
            self._journal = AckJournal(path)
        except JournalError as exc:
            log.error("%s; acks are direct store commits until the next start", exc)
            return
        if self._pending:  # new records go after the ones not applied yet
            end = max(r.end for r in fresh)
            self._journal.position = -(-end // self._journal.block) * self._journal.block

    def _journal_records(self, path) -> List[Record]:
        if not os.path.lexists(path):
            return []
        try:  # a planted link is not read through (its writer does not follow one either)
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as handle:
                return scan(handle.read())
        except OSError as exc:
            # with the pid: two boots starting at the same clock (1970 without an RTC) kept one copy
            aside = path.with_name(f"{FILE_NAME}.damaged-{int(time.time())}-{os.getpid()}")
            try:
                os.replace(path, aside)
                where = f"moved to {aside}"
            except OSError as move:
                where = f"not moved aside ({move.strerror})"
            why = "it is a symlink, not followed" if exc.errno == errno.ELOOP else exc.strerror or exc
            log.error("ack journal %s unreadable (%s): %s; messages acked since its last apply may"
                      " be delivered again", path, why, where)
            return []

    def _check_gaps(self, applied: int, fresh: Sequence[Record]) -> None:
        expected = applied + 1
        for record in fresh:
            if record.seq != expected:
                log.error("ack journal: records %d to %d missing (damaged, or a write that failed):"
                          " the messages they acked may be delivered again", expected, record.seq - 1)
            expected = record.seq + 1

    @guarded
    def _applied_through(self) -> int:
        with self._read() as txn:
            return self._counter(txn, _APPLIED)

    def _note_pending(self, ids: Iterable[int]) -> None:
        for record_id in ids:
            if record_id not in self._hidden:
                self._hidden.add(record_id)
                self._pending.append(record_id)
        if self._pending and self._pending_since is None:
            self._pending_since = time.monotonic()

    def _append_waiting(self, journal: AckJournal, ids: List[int]) -> None:
        """`journal.append`, in a helper thread while `on_disk_wait` is called (diskwait.py)
        when there is one: a record stalled by the disk must not starve the watchdog."""
        seq = self._seq + 1
        if self.on_disk_wait is None:
            journal.append(seq, ids)
            return
        helper = self._started(Helper(lambda: journal.append(seq, ids), "ack-journal"))
        helper.wait(time.monotonic(), self.on_disk_wait)
        helper.result()

    def _journal_ack(self, keys: Sequence[Sequence[bytes]]) -> List[int]:
        """`ack_each` through the journal: each call's count of ids stored and not acked yet
        (an id in two calls counts for the first), durable when this returns."""
        counts: List[int] = []
        new: List[int] = []
        taken = set()
        size = 0
        with self._read() as txn:
            for call in keys:
                count = 0
                for key in call:
                    record_id = _ID.unpack(key)[0]
                    raw = None if record_id in self._hidden or record_id in taken else txn.get(key, db=self._inbox)
                    if raw is None:
                        continue
                    size += len(raw)
                    taken.add(record_id)
                    new.append(record_id)
                    count += 1
                counts.append(count)
            leaving = self._backlogs_left(txn, map(_ID.pack, new))
            near_cap = self._near_cap(txn)
        if not new:
            return counts
        journal = self._journal
        if not journal.fits(len(new)) and not self.apply_acks():
            raise StoreError(f"ack journal full, not applied to the store: {self._apply_error}"
                             " (ack not confirmed)")
        try:
            self._append_waiting(journal, new)
        except JournalError as exc:
            self._seq += 1  # the record may be on disk: its seq is never reused
            raise StoreError(f"{exc.strerror or exc} (ack not confirmed)") from None
        self._seq += 1
        gone = self.vanished()  # the journal went with the data dir: the ack would be lost
        if gone is not None:
            raise StoreError(f"{gone} (ack not confirmed)")
        self._note_pending(new)
        note_left(leaving)
        self._pending_bytes += size
        if near_cap:
            self.apply_acks()
        else:
            self.apply_acks_if_due(time.monotonic())
        return counts

    def _near_cap(self, txn: lmdb.Transaction) -> bool:
        return self._used_bytes(txn) >= NEAR_CAP * self.cap_bytes or self._disk_low()

    def _disk_low(self) -> bool:
        """A full disk stops data.mdb from growing: ingest then waits for pages that acks free
        inside the file, which a waiting ack does not free until it is applied."""
        try:
            found = os.statvfs(self.path)
        except OSError:
            return False
        return found.f_bavail * found.f_frsize < LOW_DISK

    def _apply_due(self, now: float) -> bool:
        if not self._pending:
            return False
        return (len(self._pending) >= APPLY_IDS or self._pending_bytes >= APPLY_BYTES
                or self._journal is None or self._journal.used >= 0.5
                or now - self._pending_since >= APPLY_SECONDS or self._filled_since(now))

    def _filled_since(self, now: float) -> bool:
        """Whether the store came near its cap (or its disk ran low) after acks were made
        below it, looked at every NEAR_CAP_LOOK. Their records held the room until an apply:
        under `reject` ingest waited up to APPLY_SECONDS for the room an app had freed, and
        `dropOldest` dropped unacked messages meanwhile (found by review)."""
        if now < self._cap_look_at:
            return False
        self._cap_look_at = now + NEAR_CAP_LOOK
        try:
            with self._read() as txn:
                return self._near_cap(txn)
        except (StoreError, lmdb.Error):  # the apply itself would meet it: said there
            return True

    def apply_acks_if_due(self, now: float) -> None:
        """The supervisor loop's tick: an apply when one is due (after a failed one, at most
        every APPLY_RETRY seconds: a full disk or a hung worker holding the lock)."""
        if self._apply_due(now) and (self._apply_error is None or now >= self._apply_retry_at):
            self.apply_acks()

    def apply_acks(self) -> bool:
        """Remove the waiting ids from the inbox in one commit that records the applied-through
        seq; the journal is then written from its start again. False (logged) if the commit
        failed: the ids stay hidden and the records stay in the journal for the next try."""
        if not self._pending:
            if self._journal is not None:
                self._journal.position = 0
            return True
        try:
            self._apply_commit([_ID.pack(i) for i in self._pending], self._seq)
        except StoreError as exc:
            if self._apply_error is None:  # once per streak: the loop retries every APPLY_RETRY
                log.warning("ack journal: %d acked message(s) not applied to the store yet (they stay"
                            " acked; retried every %gs): %s", len(self._pending), APPLY_RETRY, exc)
            self._apply_error, self._apply_retry_at = str(exc), time.monotonic() + APPLY_RETRY
            return False
        if self._apply_error is not None:
            log.info("ack journal: %d acked message(s) applied to the store", len(self._pending))
            self._apply_error = None
        self._hidden.clear()
        self._pending, self._pending_since, self._pending_bytes = [], None, 0
        if self._journal is not None:
            self._journal.position = 0
        return True

    @guarded
    def _apply_commit(self, keys: List[bytes], through: int) -> None:
        def work(txn: lmdb.Transaction) -> None:
            for key in keys:
                self._delete_inbox(txn, key)
            self._set_counter(txn, _APPLIED, through)

        try:
            self._write(work, reserve=False)
        except DiskFull:
            self._delete_in_steps(keys)
            self._write(lambda txn: self._set_counter(txn, _APPLIED, through))

    def _delete_in_steps(self, keys: Sequence[bytes]) -> Set[bytes]:
        """Delete inbox records a few at a time, a commit each (the keys it removed): how acks
        go in when one commit of them all found no space left. A delete copies each leaf page
        it changes, and acks scattered over the inbox change a leaf each: a step's pages fit in
        the space reserve (spacereserve.py), and each commit frees pages a later one reuses."""
        step = max(STEP_IDS, self._reserve.size // self._page_size // STEP_SHARE)
        removed: Set[bytes] = set()
        for start in range(0, len(keys), step):
            part = keys[start:start + step]

            def work(txn: lmdb.Transaction, part: Sequence[bytes] = part
                     ) -> Tuple[List[bytes], List[BacklogCount]]:
                leaving = self._backlogs_left(txn, part)
                return [key for key in part if self._delete_inbox(txn, key)], leaving

            gone, leaving = self._write(work)
            removed.update(gone)
            note_left(leaving)
        return removed

    def _close_journal(self) -> None:
        if self._journal is not None and os.getpid() == self._pid:  # never from a forked child
            self.apply_acks()
            self._journal.close()
            self._journal = None

    def pending_in(self, txn: lmdb.Transaction) -> int:
        """Waiting acked ids still in the inbox (counted as acked, not as stored)."""
        return sum(1 for i in self._hidden if txn.get(_ID.pack(i), db=self._inbox) is not None)
