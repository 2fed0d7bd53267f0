"""The store's side of named consumers (flashlexd/consumers.py has the model).

Two databases: `consumers` (name -> ConsumerState) and `cacks` (name + NUL + id(8) -> empty:
an id the consumer acked above its floor). Ingest writes neither. Every decision that removes
a message is taken in the transaction of the call that makes it removable (an ack, a trim to
maxBacklog, a reset, a removal), so a crash or power cut at any point leaves either the old
state or the new one, never a message removed early or a consumer's ack lost.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import lmdb
from flashlexd.consumers import (MAX_CONSUMERS, backlog_bound, ConsumerCallError, ConsumerSpec, ConsumerState, NoRoomForConsumer, ResetPastNewest,
                                 UnknownConsumer)
from flashlexd.storebase import ScanPage, Taken
from flashlexd.storedamage import guarded
from flashlexd.storerecords import (_ID, _MAX_ID, DiskFull, Message, StoreBusy, StoreFull,
                                    _key, _Kept, _kept, _keys_of, _start, _system_topic, _topic_of,
                                    message_selector)

log = logging.getLogger("flashlexd.store")
# Inbox records one call may walk, so that the supervisor's loop (the API, the watch on the
# workers) never waits long for one; ~1-2 us a record here, several times that on a Pi.
WALK_BUDGET = 250  # an ack's floor walk beyond its own ids (2,000: an ack of one took 8 ms)
FLOOR_HINT = 250  # ids the sweep's walk of a floor passes before it commits a move
REPORT_BUDGET = 500  # records `status` walks to count the backlogs, shared by the consumers
TRIM_BUDGET = 200000  # maxBacklog's count, newest first, in the supervisor's sweep
# inbox records (or ack entries) one commit of the sweep's trims and removals passes, and records
# one read of maxBacklog's count looks at: ~2 ms each here, so that a call queued behind one
# still answers within 5 ms (500 and 2,000: 4-9 ms, and a `status` beside a reset took 7 ms)
COMMIT_STEP = 200
COUNT_STEP = 1000
# inbox records one call of a reset passes: a call with a `status` queued beside it took 5.5-5.9
# ms at 200 (a step 2.5-3.3 ms at 500,000 stored, then the status's recount); twice the commits
RESET_STEP = 100
Consumers = Dict[str, ConsumerState]
_Stamp = Tuple[float, int, Optional[float]]  # wall, boot seq, boottime (clock.py)


class Declared(NamedTuple):
    """What `consumer_declare` did: the consumers it created, those it had no room for, those
    taken out of the config that it removed to give their place to a new one, and those whose
    new filter matches stored messages the old one did not (a reader standing past them,
    `stream()`, must start over, as after a replay), and the dynamic ones it made declared,
    keeping their place and acks."""
    created: List[str]
    refused: List[str]
    gave_place: List[str]
    widened: List[str]
    adopted: List[str]


@dataclass
class BacklogCount:
    """maxBacklog's count of one consumer, newest first, carried from one read to the next.
    The supervisor serves calls between its reads and the trim's commits: a message counted
    that leaves the backlog meanwhile (acked by the consumer, or by an unnamed app) is noted in
    `left`, and the count goes on further back for each, so the trim keeps `limit` messages."""
    name: str
    limit: int
    position: Optional[int] = None  # the newest id not looked at yet (None: not started)
    start: int = 0  # the newest id when the count started: it looked at (position, start]
    counted: int = 0  # unacked messages of the consumer's filter seen so far
    left: int = 0  # of those, how many left its backlog since
    visited: int = 0
    cut: Optional[int] = None  # the newest id to drop for the consumer, once over the limit

    def over(self) -> bool:
        """More than `limit` of the messages counted are still in the backlog: the last one counted
        is not among its newest `limit`."""
        return self.counted - self.left > self.limit

    def covers(self, record_id: int) -> bool:
        """Whether the count has looked at `record_id` (and counted it, if it was unacked)."""
        return self.position is not None and self.position < record_id <= self.start


@dataclass
class FloorCatchUp:
    """The sweep's walk of one consumer's floor over what it is done with, carried from one
    read to the next; committed at its end (or every COMMIT_STEP ack entries relied on)."""
    name: str
    consumer: Optional[ConsumerState] = None  # as its first read found it, then as committed
    position: int = 0  # the last id walked over
    relied: List[bytes] = field(default_factory=list)  # inbox keys passed as acked ahead
    over: bool = False  # the walk met a record the consumer needs, or the inbox's end
    due: bool = False  # the next step commits


def note_left(counts: Iterable[BacklogCount]) -> None:
    """A committed ack took a message each of `counts` had counted out of its backlog."""
    for count in counts:
        count.left += 1


def report_share(consumers: int) -> int:
    """Records `status` walks for each of `consumers` consumers (REPORT_BUDGET split evenly)."""
    return max(1, REPORT_BUDGET // max(1, consumers))


def _matches(consumer: ConsumerState, raw: memoryview) -> bool:
    """`consumer.matches` for an inbox record, a consumer of every topic's without decoding it."""
    if consumer.filter == "#":
        return not _system_topic(raw)
    return consumer.matches(_topic_of(raw))


def _prefix(name: str) -> bytes:
    return name.encode() + b"\0"


class _AcksAhead:
    """`id in acked`: a consumer's ack entries above id `start`, asked in ascending id order by
    a walk over the inbox. A cursor moves along with the walk, so a page reads only the entries
    in its range: a set of them all cost a read or `status` 47 ms once 50,000 had piled up
    behind a floor that fell behind."""

    def __init__(self, txn: lmdb.Transaction, db: object, name: str, start: int):
        self._prefix = _prefix(name)
        self._cursor = txn.cursor(db=db)
        found = self._cursor.set_range(self._prefix + _ID.pack(start + 1))
        self._next = self._entry() if found else None

    def _entry(self) -> Optional[int]:
        key, size = self._cursor.key(), len(self._prefix)
        return _ID.unpack(key[size:])[0] if bytes(key[:size]) == self._prefix else None

    def __contains__(self, record_id: int) -> bool:
        while self._next is not None and self._next < record_id:
            self._next = self._entry() if self._cursor.next() else None
        return self._next == record_id


class ConsumerStore:
    """Mixed into `store.Store`: uses its inbox, `_write` and `_read`."""

    # -- state --------------------------------------------------------------------------------

    def _consumers_in(self, txn: lmdb.Transaction) -> Consumers:
        return {bytes(key).decode(): ConsumerState.unpack(key, raw)
                for key, raw in txn.cursor(db=self._consumer_db)}

    def _consumer_in(self, txn: lmdb.Transaction, name: str) -> ConsumerState:
        raw = txn.get(name.encode(), db=self._consumer_db)
        if raw is None:
            raise UnknownConsumer(f"no consumer named {name!r} (declare it in flashlex.app.consumers"
                                  " or let the app register it)")
        return ConsumerState.unpack(name.encode(), raw)

    def _save(self, txn: lmdb.Transaction, consumer: ConsumerState) -> None:
        txn.put(consumer.name.encode(), consumer.pack(), db=self._consumer_db)

    def _seen(self, consumer: ConsumerState, now: float) -> None:
        """Note a use at wall time `now`, stamped as records are (this boot, its boottime), so
        that `consumers` re-bases it after a clock step; idleness still reads the wall time."""
        consumer.last_seen, consumer.seen_seq = now, self._frames.current.seq
        consumer.seen_boottime = now - self._frames.clock.now().offset

    def _acked(self, txn: lmdb.Transaction, consumer: ConsumerState, key: bytes) -> bool:
        return txn.get(_prefix(consumer.name) + key, db=self._consumer_acks) is not None

    def _forget_ack(self, txn: lmdb.Transaction, consumer: ConsumerState, key: bytes) -> None:
        """Drop the consumer's ack entry for `key`, if it has one."""
        txn.delete(_prefix(consumer.name) + key, db=self._consumer_acks)

    def _done(self, txn: lmdb.Transaction, consumer: ConsumerState, key: bytes) -> bool:
        return _ID.unpack(key)[0] <= consumer.floor or self._acked(txn, consumer, key)

    def _settled(self, txn: lmdb.Transaction, key: bytes, topic: str,
                 others: Iterable[ConsumerState]) -> bool:
        return all(not d.matches(topic) or self._done(txn, d, key) for d in others)

    def _leave_if_settled(self, txn: lmdb.Transaction, key: bytes, topic: str,
                          others: Sequence[ConsumerState]) -> bool:
        """A consumer is done with `key` without holding an ack entry for it (it acks it, or its
        floor passes it): the message leaves the inbox if every other matching consumer is done
        with it too, with their entries for it. True if it left. It counts in the derived
        `acked` total when this is an ack; the callers that let it go otherwise (a maxBacklog
        trim, a reset's skip, a consumer removed or narrowed) count it in `released`
        (`_released`: 989,980 trimmed messages were counted as acked, none acked by an app:
        found by review). `others` is read twice: a list, not an iterator."""
        if not self._settled(txn, key, topic, others):
            return False
        self._delete_inbox(txn, key)
        record_id = _ID.unpack(key)[0]
        for consumer in others:
            if record_id > consumer.floor:  # at or below the floor: no acks-ahead entry exists
                self._forget_ack(txn, consumer, key)
        return True

    def _records(self, txn: lmdb.Transaction, after: int, through: int,
                 wanted: Callable[[bytes, str], bool]) -> List[Tuple[bytes, str]]:
        """(key, topic) of the inbox records past `after` up to id `through` that
        `wanted(key, topic)` keeps, read before the caller deletes any. Callers bound the range
        to COMMIT_STEP records (`_step_end`)."""
        found: List[Tuple[bytes, str]] = []
        cursor = txn.cursor(db=self._inbox)
        if not _start(cursor, after):
            return found
        for key, raw in cursor:
            if _ID.unpack(key)[0] > through:
                break
            topic = _topic_of(raw)
            if wanted(key, topic):
                found.append((bytes(key), topic))
        return found

    def _advance(self, txn: lmdb.Transaction, consumer: ConsumerState, budget: int = WALK_BUDGET) -> None:
        """Move the floor over every record the consumer is done with, looking at `budget`
        records at most, and drop the ack entries it now covers."""
        floor, _ = self._floor_walk(txn, consumer, consumer.floor, budget)
        self._forget_acks_through(txn, consumer, floor, budget)  # any left: harmless, later
        consumer.floor = floor

    def _floor_walk(self, txn: lmdb.Transaction, consumer: ConsumerState, start: int, budget: int,
                    relied: Optional[List[bytes]] = None) -> Tuple[int, bool]:
        """How far past id `start` the consumer is done with every record (acked ahead, or not
        its topic), looking at `budget` records at most: (that id, whether the walk is over: it
        met a record the consumer still needs, or passed the newest record, and then the ids up
        to the last one given out, which are gone for good). The inbox keys it passed as acked
        ahead go to `relied`, which stops the walk at COMMIT_STEP of them."""
        cursor = txn.cursor(db=self._inbox)
        position = start
        if _start(cursor, start):
            for steps, (key, raw) in enumerate(cursor, 1):
                if steps > budget:
                    return position, False
                if _matches(consumer, self._checked(raw)):
                    if not self._acked(txn, consumer, key):
                        return position, True
                    if relied is not None:
                        relied.append(bytes(key))
                position = _ID.unpack(key)[0]
                if relied is not None and len(relied) >= COMMIT_STEP:
                    return position, False
        return max(position, self._counter(txn, b"inbox_last_id")), True

    def _forget_acks_through(self, txn: lmdb.Transaction, consumer: ConsumerState, floor: int,
                             budget: Optional[int] = None) -> bool:
        """Drop the consumer's ack entries up to id `floor`, at most `budget` of them; True
        when none is left."""
        prefix = _prefix(consumer.name)
        cursor = txn.cursor(db=self._consumer_acks)
        if not cursor.set_range(prefix):
            return True
        limit = prefix + _ID.pack(floor)
        dropped = 0
        while cursor.key()[:len(prefix)] == prefix and cursor.key() <= limit:
            if budget is not None and dropped >= budget:
                return False
            if not cursor.delete():
                break
            dropped += 1
        return True

    # -- registration -------------------------------------------------------------------------

    @guarded
    def consumer_declare(self, specs: Sequence[ConsumerSpec], now: float) -> Declared:
        """Make the stored consumers agree with the config: declared ones are created (from the
        earliest stored message) or get the config's filter and maxBacklog; a consumer no longer
        declared becomes dynamic (the idle rule then removes it). A new one beyond MAX_CONSUMERS
        stored takes the place of one this reload takes out of the config (a rename: named in
        `gave_place`, removed), else (apps registered the rest) it is not created: it is named
        in `refused`."""
        def work(txn: lmdb.Transaction) -> Declared:
            stored = self._consumers_in(txn)
            declared = {spec.name for spec in specs}
            undeclared = [c.name for c in stored.values() if not c.dynamic and c.name not in declared]
            result = Declared([], [], [], [], [])
            changed = []  # (as it was, as it is now): a filter that may no longer match what it
            # held, or may match what its floor passed unseen
            for spec in specs:
                consumer = stored.get(spec.name)
                if consumer is None and len(stored) - len(result.gave_place) >= MAX_CONSUMERS:
                    if not undeclared:
                        result.refused.append(spec.name)
                        continue
                    result.gave_place.append(undeclared.pop(0))
                if consumer is None:
                    consumer = stored[spec.name] = ConsumerState(spec.name)
                    self._seen(consumer, now)
                    result.created.append(spec.name)
                elif consumer.filter != spec.filter:
                    changed.append((replace(consumer), consumer))  # a copy with a memo of its own
                if consumer.dynamic and spec.name not in result.created:
                    result.adopted.append(spec.name)
                consumer.filter, consumer.max_backlog, consumer.dynamic = spec.filter, spec.max_backlog, False
                self._save(txn, consumer)
            for before, after in changed:
                matched_past_floor = self._release_unmatched(txn, before, after, stored)
                if self._reopen_widened(txn, before, after) or matched_past_floor:
                    result.widened.append(after.name)
            for name in result.gave_place:  # once the new ones hold what they match
                self._remove_now(txn, stored.pop(name), stored)
            for name in undeclared:  # those that gave no place: dynamic from now on
                consumer = stored[name]
                consumer.dynamic = True
                self._seen(consumer, now)
                self._save(txn, consumer)
            return result

        return self._write(work)  # type: ignore[return-value]

    def _remove_now(self, txn: lmdb.Transaction, gone: ConsumerState, rest: Consumers) -> None:
        """Remove `gone` in this commit, as `consumer_remove_step` does a step at a time: a
        consumer taken out of the config gives its place to one the same reload declares (a
        rename with MAX_CONSUMERS stored was refused until the old one was removed by hand).
        One walk of the records past its floor, and of its ack entries, in the reload's commit."""
        self._release(txn, gone, rest, _MAX_ID)
        self._forget_acks_through(txn, gone, _MAX_ID)
        txn.delete(gone.name.encode(), db=self._consumer_db)

    def _release_unmatched(self, txn: lmdb.Transaction, before: ConsumerState, after: ConsumerState,
                           consumers: Consumers) -> bool:
        """A reload changed a consumer's filter: the messages past its floor it held under the old
        filter (unacked) and no longer matches leave if every consumer matching them now is done
        with them (their acks found it holding them, and nothing else would take them out).
        True when the same walk found one past the floor that only the new filter matches."""
        others = [d for d in consumers.values() if d.name != after.name]
        newly_matched = [False]

        def held(key: bytes, topic: str) -> bool:
            if after.matches(topic) and not before.matches(topic):
                newly_matched[0] = True
                return False
            return before.matches(topic) and not after.matches(topic) and _ID.unpack(key)[0] not in self._hidden \
                and not self._acked(txn, before, key) and any(d.matches(topic) for d in others)

        self._released(txn, [self._leave_if_settled(txn, key, topic, others)
                             for key, topic in self._records(txn, before.floor, _MAX_ID, held)])
        return newly_matched[0]

    def _reopen_widened(self, txn: lmdb.Transaction, before: ConsumerState, after: ConsumerState) -> bool:
        """A reload changed a consumer's filter: the stored messages at or below its floor that the
        new filter matches and the old one did not were never its own, so it has not seen them
        (it gets every stored message its filter matches). The floor goes back to just before
        the first of them, and each record from there to the old floor that the old filter
        matched (done for it) gets an ack entry. One walk of the records up to the old floor,
        in the reload's commit. The floor does not say under which filter a record was done: one
        acked under an earlier filter and passed over by a narrower one since comes again.
        True when it reopened."""
        matched = self._records(txn, 0, before.floor, lambda key, topic: after.matches(topic))
        unseen = next((i for i, (_, topic) in enumerate(matched) if not before.matches(topic)), None)
        if unseen is None:
            return False
        for key, topic in matched[unseen + 1:]:
            if before.matches(topic):
                txn.put(_prefix(after.name) + key, b"", db=self._consumer_acks)
        after.floor = _ID.unpack(matched[unseen][0])[0] - 1
        self._save(txn, after)
        return True

    @guarded
    def consumer_register(self, name: str, now: float) -> bool:
        """A dynamic consumer of every topic, from the earliest stored message, unless it exists
        (then its last use is noted). True when it was created."""
        def work(txn: lmdb.Transaction) -> bool:
            raw = txn.get(name.encode(), db=self._consumer_db)
            if raw is None and txn.stat(self._consumer_db)["entries"] >= MAX_CONSUMERS:
                raise NoRoomForConsumer(name)
            consumer = ConsumerState(name) if raw is None else ConsumerState.unpack(name.encode(), raw)
            self._seen(consumer, now)
            self._save(txn, consumer)
            return raw is None

        return self._write(work)  # type: ignore[return-value]

    @guarded
    def consumer_state(self, name: str) -> Optional[ConsumerState]:
        with self._read() as txn:
            raw = txn.get(name.encode(), db=self._consumer_db)
            return None if raw is None else ConsumerState.unpack(name.encode(), raw)

    # -- reading and acking -------------------------------------------------------------------

    @guarded
    def consumer_messages(self, name: str, limit: int = 100, topic: Optional[str] = None,
                          after: Optional[int] = None,
                          user_property: Optional[Tuple[str, str]] = None) -> List[Message]:
        """The consumer's unacked messages past `after`, oldest first (its filter, then `topic`
        and `user_property` as in `messages`)."""
        return self.consumer_messages_page(name, limit, topic, after, None, user_property).found

    @guarded
    def consumer_messages_page(self, name: str, limit: int = 100, topic: Optional[str] = None,
                               after: Optional[int] = None, budget: Optional[int] = None,
                               user_property: Optional[Tuple[str, str]] = None,
                               size: Optional[int] = None) -> ScanPage[Message]:
        """`consumer_messages`, looking at no more than `budget` inbox records (None: no bound;
        the page's cursor says where to go on, as `messages_page`'s does). A read writes
        nothing: the sweep moves the floor over what the consumer is done with (reads did, a
        commit of ~36 KB every 250 records they passed: 14.7 MB for a rare topic's consumer
        reading past 100,000 other messages)."""
        page: ScanPage[Message] = ScanPage([], None)
        with self._read() as txn:
            consumer = self._consumer_in(txn, name)
            start = max(consumer.floor, after or 0)
            acked = _AcksAhead(txn, self._consumer_acks, consumer.name, start)
            cursor = txn.cursor(db=self._inbox)
            if limit <= 0 or not _start(cursor, start):
                return page
            timeline = self._frames.snapshot_timeline(txn)
            keep = message_selector(topic, user_property)
            looked = 0
            taken = Taken(size)
            for key, raw in cursor:
                if budget is not None and looked >= budget:
                    page.cursor = page.last  # not looked at yet: the next call starts here
                    break
                looked += 1
                previous, page.last = page.last, _ID.unpack(key)[0]
                raw = self._checked(raw)
                if page.last in acked or page.last in self._hidden or not _matches(consumer, raw):
                    continue
                if page.found and taken.past(raw):
                    page.cursor = page.last = previous  # the next call starts at it
                    break
                message = self._message(key, raw, timeline)
                if keep is None or keep(message):
                    page.found.append(message)
                    taken.took(raw)
                    if len(page.found) >= limit:
                        break
        return page

    @guarded
    def consumer_ack(self, name: str, ids: Iterable[int], now: float) -> int:
        """Acknowledge for one consumer; idempotent. A message every matching consumer is done
        with leaves the inbox in the same transaction. Returns how many ids were new acks."""
        result = self.consumer_ack_each([(name, ids)], now)[0]
        if isinstance(result, ConsumerCallError):
            raise result
        return result

    @guarded
    def consumer_ack_each(self, calls: Sequence[Tuple[str, Iterable[int]]],
                          now: float) -> List[Union[int, ConsumerCallError]]:
        """`consumer_ack` of several calls in ONE transaction (apps' acks sharing a commit,
        `apiCommitMs`: a commit per call wrote ~30-50 KiB per message stored with 4-5 consumers
        acking, review "consumers"); each call's count, or the error of its own that it met
        before writing anything (a consumer removed meanwhile), which the others do not share."""
        keyed = [(name, _keys_of(ids), self._backlog_counts.get(name)) for name, ids in calls]

        def work(txn: lmdb.Transaction) -> Tuple[List[Union[int, ConsumerCallError]], List[BacklogCount]]:
            results: List[Union[int, ConsumerCallError]] = []
            counted: List[BacklogCount] = []
            for name, keys, count in keyed:
                try:
                    results.append(self._ack_in(txn, name, keys, count, counted, now))
                except ConsumerCallError as exc:  # raised before this call wrote anything
                    results.append(exc)
            return results, counted

        results, counted = self._write(work)  # type: ignore[misc]
        note_left(counted)
        return results

    def _ack_in(self, txn: lmdb.Transaction, name: str, keys: List[bytes], count: Optional[BacklogCount],
                counted: List[BacklogCount], now: float) -> int:
        """One consumer's acks in `txn`; how many were new (maxBacklog counts passed: `counted`)."""
        consumers = self._consumers_in(txn)
        consumer = consumers.get(name) or self._consumer_in(txn, name)
        others = [d for d in consumers.values() if d.name != name]
        new = 0
        for key in keys:
            if self._done(txn, consumer, key):
                continue
            raw = txn.get(key, db=self._inbox)
            if raw is None or _ID.unpack(key)[0] in self._hidden:
                continue  # gone already: expired, dropped, or acked by the default consumer
            topic = _topic_of(raw)
            if not consumer.matches(topic):
                continue
            new += 1
            if count is not None and count.covers(_ID.unpack(key)[0]):
                counted.append(count)
            if not self._leave_if_settled(txn, key, topic, others):
                txn.put(_prefix(name) + key, b"", db=self._consumer_acks)
        self._advance(txn, consumer, WALK_BUDGET + 2 * new)  # a batch in order: past it
        self._seen(consumer, now)
        self._save(txn, consumer)
        return new

    # -- figures ------------------------------------------------------------------------------

    @guarded
    def consumers_report(self) -> List[Dict[str, object]]:
        """Each consumer with its backlog (unacked matching messages) and the age of its oldest.
        It walks the backlogs, REPORT_BUDGET records for all the consumers together (the API
        server's loop must not stall on a huge store, however many consumers apps register):
        past its share, a consumer's `backlog` is a lower bound and `backlog_exact` false. Read
        once per snapshot (`_per_snapshot`); between commits only the ages move."""
        with self._read() as txn:
            counted = self._per_snapshot(txn, "consumers", self._count_backlogs)
            timeline = self._frames.snapshot_timeline(txn) if counted else None
        report = []
        for entry, oldest, seen in counted:
            entry = dict(entry)
            entry["oldest_age"] = self._message(*oldest, timeline).age if oldest else None
            entry["last_seen"] = timeline.arrival(*seen) if seen[0] and timeline else None
            report.append(entry)
        return report

    def _count_backlogs(self, txn: lmdb.Transaction) -> List[Tuple[Dict[str, object], Optional[_Kept], _Stamp]]:
        """`consumers_report` but the times: each consumer's entry, its oldest unacked record and
        the stamp of its last use."""
        consumers = self._consumers_in(txn).values()
        share = report_share(len(consumers))
        counted = []
        for consumer in consumers:
            backlog, oldest, exact = self._backlog(txn, consumer, share)
            entry = consumer.public()
            entry["backlog"], entry["backlog_exact"] = backlog, exact
            counted.append((entry, oldest, (consumer.last_seen, consumer.seen_seq, consumer.seen_boottime)))
        return counted

    def _backlog(self, txn: lmdb.Transaction, consumer: ConsumerState,
                 budget: int) -> Tuple[int, Optional[_Kept], bool]:
        """(unacked matching messages, the oldest one's key and record, whether counted to the end)."""
        acked = _AcksAhead(txn, self._consumer_acks, consumer.name, consumer.floor)
        cursor = txn.cursor(db=self._inbox)
        count, oldest, visited = 0, None, 0
        if _start(cursor, consumer.floor):
            for key, raw in cursor:
                visited += 1
                if visited > budget:
                    return count, oldest, False
                record_id = _ID.unpack(key)[0]
                if record_id not in acked and record_id not in self._hidden \
                        and _matches(consumer, self._checked(raw)):
                    count += 1
                    oldest = oldest or _kept(key, self._checked(raw), 7)
        return count, oldest, True

    # -- moving a consumer, trimming, removing ------------------------------------------------

    def consumer_reset(self, name: str, to: Union[str, int]) -> int:
        """Move the consumer to the earliest stored message (replay), past the latest (skip), or
        to just before message id `to`. Messages skipped over count as done for it (and may leave
        the inbox); a replay, or a start at an id, forgets its acks from there on. Returns the new floor. One commit per RESET_STEP
        records (`consumer_reset_step`)."""
        target = self.consumer_reset_target(to)
        way = self.consumer_reset_way(name, to, target)
        while True:
            floor, done = self.consumer_reset_step(name, target, way)
            if done:
                return floor

    @guarded
    def consumer_reset_target(self, to: Union[str, int]) -> int:
        """The floor a reset `to` ("earliest", "latest" or a message id) aims at, fixed when the
        reset starts (messages stored while it goes on are not skipped)."""
        if to == "earliest":
            return 0
        with self._read() as txn:
            newest = self._counter(txn, b"inbox_last_id")
        if to == "latest":
            return newest
        if int(to) - 1 > newest:  # the id after the newest is where "latest" stands
            raise ResetPastNewest(int(to), newest)
        return max(0, int(to) - 1)  # to 0 or 1: from the earliest, as "earliest"

    @guarded
    def consumer_reset_way(self, name: str, to: Union[str, int], target: int) -> str:
        """How a reset `to` floor `target` goes (RESET_WAYS), decided once when it starts: an
        ack's or the sweep's walk may take the floor past a skip's target between its steps, and
        a step deciding anew replayed then (every ack forgotten, the floor back at the target:
        messages already acked delivered again). "latest" skips, never forgetting an ack (not
        even one made between its steps, of a message stored meanwhile). An id starts at that
        message, whatever was acked: past the floor it goes forwards, then forgets the acks from
        there on ("start": it kept them, so the same command replayed or not by where the floor
        stood); at or below it, it replays from there, as "earliest" does from the start."""
        if to == "latest":
            return "skip"
        with self._read() as txn:
            return "start" if target > self._consumer_in(txn, name).floor else "replay"

    @guarded
    def consumer_reset_step(self, name: str, target: int, way: str) -> Tuple[int, bool]:
        """One commit of a reset towards floor `target` going `way`: at most RESET_STEP inbox
        records passed (forwards: done once the floor is at the target or past it), then ("start")
        or else ("replay": to the floor or before it) COMMIT_STEP ack entries forgotten.
        Returns the floor and whether the reset is done: a reset over a large store never holds
        the supervisor's loop (or LMDB's write lock) for long, and each step leaves a state a
        reset may stop in (some of the way moved)."""
        def work(txn: lmdb.Transaction) -> Tuple[int, bool]:
            consumers = self._consumers_in(txn)
            consumer = consumers.get(name) or self._consumer_in(txn, name)
            if way != "replay" or target > consumer.floor:  # forwards only by passing the records
                done = consumer.floor >= target or \
                    self._skip_step(txn, consumer, target, consumers, RESET_STEP, count_dropped=False)
                if done and way == "start" and consumer.floor == target:  # not overtaken by its acks
                    done = self._forget_acks_through(txn, consumer, _MAX_ID, COMMIT_STEP)
            else:
                done = self._forget_acks_through(txn, consumer, _MAX_ID, COMMIT_STEP)
                if done:
                    consumer.floor = target
            self._save(txn, consumer)
            return consumer.floor, done

        return self._write(work)  # type: ignore[return-value]

    def _skip_step(self, txn: lmdb.Transaction, consumer: ConsumerState, target: int,
                   consumers: Consumers, budget: int, count_dropped: bool) -> bool:
        """`_skip_to` over at most `budget` records; True once the floor is at `target`."""
        end = self._step_end(txn, consumer.floor, target, budget)
        self._skip_to(txn, consumer, end, consumers, count_dropped)
        return end == target

    def _step_end(self, txn: lmdb.Transaction, after: int, target: int, budget: int) -> int:
        """The id of the inbox record `budget` records past id `after`, or `target` if that
        comes first."""
        cursor = txn.cursor(db=self._inbox)
        if not _start(cursor, after):
            return target
        for seen, key in enumerate(cursor.iternext(values=False), 1):
            record_id = _ID.unpack(key)[0]
            if record_id >= target:
                return target
            if seen >= budget:
                return record_id
        return target

    def _skip_to(self, txn: lmdb.Transaction, consumer: ConsumerState, target: int,
                 consumers: Consumers, count_dropped: bool) -> None:
        """The floor moves to `target`; the consumer's unacked messages on the way are done for
        it (counted as dropped when `count_dropped`). Those an unnamed app acked are not counted:
        the ack journal's next apply removes them (storeacks.py)."""
        passed = self._records(txn, consumer.floor, target, lambda key, topic: consumer.matches(topic)
                               and _ID.unpack(key)[0] not in self._hidden
                               and not self._acked(txn, consumer, key))
        others = [d for d in consumers.values() if d.name != consumer.name]
        # done for it without an ack entry: its floor passes them
        self._released(txn, [self._leave_if_settled(txn, key, topic, others) for key, topic in passed])
        if count_dropped:
            consumer.dropped += len(passed)
        self._forget_acks_through(txn, consumer, target, COMMIT_STEP)  # any left: harmless, later
        consumer.floor = target

    def consumers_upkeep(self, now: float, idle_seconds: Optional[float],
                         clock_steps: Sequence[Tuple[float, float]] = (),
                         dynamic_max_backlog: Optional[int] = None) -> Iterator[Optional[str]]:
        """The sweep's work, one bounded step per `next()` (a commit of COMMIT_STEP records or a
        read of COUNT_STEP): dynamic consumers unused for `idle_seconds` go (yields each name
        removed, else None), and every consumer is trimmed to its maxBacklog, a dynamic one to
        `dynamic_max_backlog` (its oldest unacked go, counted as dropped). One commit used to do it all: 0.5-1 s at 500,000 stored for one
        narrow consumer with a maxBacklog, every sweep, inside the supervisor's loop. Between two
        steps the loop serves calls (see BacklogCount for the acks made meanwhile).
        `clock_steps`: forward steps of the wall clock, (wall time just after, seconds), which
        add no idle time to a consumer used before them (consumerkeeper.py)."""
        for consumer in self.consumer_states():
            if not consumer.dynamic or idle_seconds is None:
                continue
            idle_since = now - idle_seconds - sum(size for after, size in clock_steps
                                                  if consumer.last_seen < after - size / 2)
            if consumer.last_seen < idle_since:
                removed = None
                while removed is None:
                    removed = self.consumer_remove_step(consumer.name, idle_since)
                    yield consumer.name if removed else None
        for consumer in self.consumer_states():  # first: maxBacklog's count stops at the floor
            walk = FloorCatchUp(consumer.name)
            while not self.consumer_catch_up_step(walk):
                yield None
            yield None
        for consumer in self.consumer_states():
            limit = backlog_bound(consumer.max_backlog, consumer.dynamic, dynamic_max_backlog)
            if limit is None:
                continue
            count = self._backlog_counts[consumer.name] = BacklogCount(consumer.name, limit)
            try:
                while True:  # counted messages that left meanwhile move the cut further back
                    while not self.consumer_count_step(count):
                        yield None
                    if count.cut is None or self.consumer_trim_step(consumer.name, count.cut):
                        break
                    yield None
            finally:
                if self._backlog_counts.get(consumer.name) is count:  # not a newer sweep's
                    del self._backlog_counts[consumer.name]
            yield None

    @guarded
    def consumer_states(self) -> List[ConsumerState]:
        """Every consumer as stored now."""
        with self._read() as txn:
            return list(self._consumers_in(txn).values())

    @guarded
    def consumer_remove_step(self, name: str, idle_since: float) -> Optional[bool]:
        """One commit of removing dynamic consumer `name`, unused since wall time `idle_since`:
        the messages only it held leave, COMMIT_STEP records (and then ack entries) a commit (a
        reset's or trim's step took 72-74 ms over 50,000 orphan entries). None while there is more;
        then True (removed), or False (used again meanwhile: it stays, moved as far as it got)."""
        def work(txn: lmdb.Transaction) -> Optional[bool]:
            consumers = self._consumers_in(txn)
            gone = consumers.pop(name, None)
            if gone is None or not gone.dynamic or gone.last_seen >= idle_since:
                return False
            end = self._step_end(txn, gone.floor, _MAX_ID, COMMIT_STEP)
            self._release(txn, gone, consumers, end)
            forgotten = self._forget_acks_through(txn, gone, end, COMMIT_STEP)
            if end < _MAX_ID or not forgotten:  # its ack entries go first, a bounded number a step
                # past the inbox's end: every id given out so far is released
                gone.floor = end if end < _MAX_ID else max(gone.floor, self._counter(txn, b"inbox_last_id"))
                self._save(txn, gone)
                return None
            txn.delete(gone.name.encode(), db=self._consumer_db)
            return True

        return self._write(work)  # type: ignore[return-value]

    def _release(self, txn: lmdb.Transaction, gone: ConsumerState, rest: Consumers, through: int) -> None:
        """The messages past `gone`'s floor up to id `through` that only it still held leave (a
        message no other consumer matches stays, for unnamed apps and expiry)."""
        others = list(rest.values())

        def held(key: bytes, topic: str) -> bool:
            return gone.matches(topic) and _ID.unpack(key)[0] not in self._hidden and \
                not self._acked(txn, gone, key) and any(d.matches(topic) for d in others)

        self._released(txn, [self._leave_if_settled(txn, key, topic, others)  # while its acks still say
                             for key, topic in self._records(txn, gone.floor, through, held)])

    def _released(self, txn: lmdb.Transaction, left: List[bool]) -> None:
        """Count the messages that left (True in `left`) without an ack: one write a step."""
        self._add_counter(txn, b"released", sum(left))

    @guarded
    def consumer_count_step(self, count: BacklogCount) -> bool:
        """One read of maxBacklog's count (no write lock), newest first, at most COUNT_STEP
        records: True when it is over, with `count.cut` set when the backlog is over the limit
        (a cut still good: no read). A count stops at TRIM_BUDGET records: a narrow filter's
        backlog spread thinner than that is not trimmed."""
        if count.cut is not None:
            if count.over():
                return True
            count.cut = None  # some it counted left: it goes on further back
        with self._read() as txn:
            raw = txn.get(count.name.encode(), db=self._consumer_db)
            if raw is None:
                return True
            consumer = ConsumerState.unpack(count.name.encode(), raw)
            if count.position is None:
                count.position = count.start = self._counter(txn, b"inbox_last_id")
                if count.position - consumer.floor <= count.limit:
                    return True  # fewer ids than the limit past the floor: nothing to count
            cursor = txn.cursor(db=self._inbox)  # on the newest record at or below `position`
            found = cursor.prev() if cursor.set_range(_key(count.position + 1)) else cursor.last()
            if not found:
                return True
            for _ in range(COUNT_STEP):
                record_id = _ID.unpack(cursor.key())[0]
                if record_id <= consumer.floor or count.visited >= TRIM_BUDGET:
                    return True
                count.visited += 1
                count.position = record_id - 1
                if record_id not in self._hidden and _matches(consumer, self._checked(cursor.value())) \
                        and not self._acked(txn, consumer, cursor.key()):
                    count.counted += 1
                    if count.over():
                        count.cut = record_id
                        return True
                if not cursor.prev():
                    return True
            return False

    def _backlogs_left(self, txn: lmdb.Transaction, keys: Iterable[bytes]) -> List[BacklogCount]:
        """The maxBacklog counts under way that counted inbox records `keys` as unacked, which an
        unnamed app's ack in `txn` takes from every consumer: a count once per record. The
        caller notes them in `left` once `txn` is committed."""
        if not self._backlog_counts:
            return []
        consumers = self._consumers_in(txn)  # as now: acks since the count may have moved floors
        left = []
        for key in set(keys):
            record_id, raw = _ID.unpack(key)[0], txn.get(key, db=self._inbox)
            for count in self._backlog_counts.values():
                consumer = consumers.get(count.name)
                if raw is not None and consumer is not None and count.covers(record_id) and \
                        _matches(consumer, self._checked(raw)) and not self._done(txn, consumer, key):
                    left.append(count)
        return left

    @guarded
    def consumer_catch_up_step(self, walk: FloorCatchUp) -> bool:
        """One step of the sweep's walk of a consumer's floor over what it is done with: a read
        (no write lock) of COUNT_STEP records at most, or the commit that moves the floor; True
        when the walk is over. It commits when it got FLOOR_HINT ids or more past the floor (a
        commit for a few records every sweep would wear an SD card). An ack's walk passes its
        own batch and WALK_BUDGET records more, and reads write nothing: an app that reads on
        from its last message (`stream`, `after=`) and acks batches fell behind for good over
        other apps' messages, its ack entries piling up, `status` counting from far back."""
        if walk.due:
            walk.due = False
            try:
                moved = self._write(lambda txn: self._catch_up(txn, walk), reserve=False)
            except (StoreBusy, StoreFull, DiskFull) as exc:  # optional work: the next sweep
                log.debug("consumer %r: floor not caught up this time: %s", walk.name, exc)
                return True
            return walk.over or not moved
        with self._read() as txn:
            if walk.consumer is None:  # as it is now, not as the sweep began: acks move floors
                raw = txn.get(walk.name.encode(), db=self._consumer_db)
                if raw is None:
                    return True
                walk.consumer = ConsumerState.unpack(walk.name.encode(), raw)
                walk.position = walk.consumer.floor
            walk.position, walk.over = self._floor_walk(txn, walk.consumer, walk.position, COUNT_STEP,
                                                        walk.relied)
        walk.due = len(walk.relied) >= COMMIT_STEP or \
            walk.over and walk.position - walk.consumer.floor >= FLOOR_HINT
        return walk.over and not walk.due

    def _catch_up(self, txn: lmdb.Transaction, walk: FloorCatchUp) -> bool:
        """Move the floor to where the walk got, if what the walk saw still holds: the filter
        is the same, the floor has not gone back (a replay) nor past it, and every record it
        passed as acked ahead is acked still or gone. Else False: the next sweep walks again."""
        raw = txn.get(walk.name.encode(), db=self._consumer_db)
        if raw is None or walk.consumer is None:
            return False
        consumer = ConsumerState.unpack(walk.name.encode(), raw)
        if consumer.filter != walk.consumer.filter or \
                not walk.consumer.floor <= consumer.floor < walk.position:
            return False
        for key in walk.relied:
            if _ID.unpack(key)[0] > consumer.floor and not self._acked(txn, consumer, key) \
                    and txn.get(key, db=self._inbox) is not None:
                return False
        for key in walk.relied:  # these first: older entries left (orphans) are harmless
            self._forget_ack(txn, consumer, key)
        self._forget_acks_through(txn, consumer, walk.position, COMMIT_STEP)
        consumer.floor = walk.position
        self._save(txn, consumer)
        walk.consumer, walk.relied = consumer, []  # the walk goes on from here
        return True

    @guarded
    def consumer_trim_step(self, name: str, cut: int) -> bool:
        """One commit of a maxBacklog trim: the consumer's unacked messages up to id `cut` are
        dropped for it (counted), COMMIT_STEP records a commit. True when done."""
        def work(txn: lmdb.Transaction) -> bool:
            consumers = self._consumers_in(txn)
            consumer = consumers.get(name)
            if consumer is None or consumer.floor >= cut:
                return True
            done = self._skip_step(txn, consumer, cut, consumers, COMMIT_STEP, count_dropped=True)
            self._save(txn, consumer)
            return done

        return self._write(work)  # type: ignore[return-value]

    def _count_drops(self, txn: lmdb.Transaction, dropped: List[Tuple[bytes, bytes]]) -> None:
        """The cap dropped these inbox records: each consumer that had not acked one counts it."""
        consumers = self._consumers_in(txn)
        if not consumers:
            return
        for key, raw in dropped:
            topic = _topic_of(raw)
            for consumer in consumers.values():
                if consumer.matches(topic) and not self._done(txn, consumer, key):
                    consumer.dropped += 1
                self._forget_ack(txn, consumer, key)
        for consumer in consumers.values():
            self._save(txn, consumer)
