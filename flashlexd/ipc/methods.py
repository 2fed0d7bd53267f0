"""The local API's methods, on top of the store and the supervisor's view of the workers.

Every param is checked here (type, range, unknown names) so a bad call gets `bad_params` and a
message naming the param, never a traceback in the daemon. Responses are bounded: a call
returns at most `MAX_LIMIT` records and stops adding records once the response reaches the
frame budget (always at least one record, so a large message is still deliverable).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar, Union

from flashlexd.consumers import MAX_CONSUMERS, RESET_TARGETS, RESET_WAYS, ConsumerCallError, UnknownConsumer, backlog_bound
from flashlexd.wire import (CONSUMER_NAME_RULE, ID_LIMIT, MAX_IDS_PER_ACK, MAX_LIMIT, MAX_WAIT_SECONDS, Code,
                            valid_consumer_name)
from flashlexd.ipc import mqttprops
from flashlexd.ipc.consumeraccess import ConsumerAccess
from flashlexd.ipc.protocol import Pending, RpcFailure, store_busy
from flashlexd.ipc.sharedcommit import SharedCommits
from flashlexd.ipc.walk import Steps, Walk
from flashlexd.mqttv5 import properties_size, publish_packet_size
from flashlexd.runtime import ApiRules
from flashlexd.store import COUNTERS, DiskFull, Store, StoreBusy, StoreError, StoreFull
from flashlexd.topics import AWS_SERVICE_PREFIX, publish_topic_problem, valid_filter

# Inbox records one `paged` messages/wait call with a topic filter looks at, whatever the inbox
# holds (the cursor says where to go on): ~1 ms of the supervisor's loop here (500 records: a
# named consumer's read took 3 ms with the floor's move it made then, 6 ms in a loaded `make bench`).
SCAN_BUDGET = 250
# records past their own expiry, not swept yet, an unfiltered read passes at most in one turn of
# the loop (~4 us each): all of them, 0.6-0.9 s at 200,000 (re-read 31); a walk of SCAN_BUDGET
# made a look (`wait(timeout=0)`) answer [] with messages behind a few (re-read 32)
EXPIRED_PAST = 2000
_RECORD_ENVELOPE = 160  # msgpack bytes of one record's field names and numbers, roughly
_MISSING = object()
T = TypeVar("T")
log = logging.getLogger(__name__)


class _Params:
    """Typed reads of one call's params; anything left unread is an unknown param."""

    def __init__(self, method: str, params: Dict[str, Any], uid: Optional[int] = None):
        self.method, self.params, self.read, self.uid = method, params, set(), uid

    def bad(self, name: str, expected: str, value: Any = _MISSING) -> RpcFailure:
        got = "" if value is _MISSING else f", got {type(value).__name__} {_show(value)}"
        return RpcFailure(Code.BAD_PARAMS, f"{self.method}: param '{name}' must be {expected}{got}")

    def get(self, name: str) -> Any:
        self.read.add(name)
        return self.params.get(name)

    def integer(self, name: str, default: Optional[int], low: int, high: int) -> Optional[int]:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.bad(name, f"an integer from {low} to {high}", value)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.bad(name, f"a number of seconds from {low:g} to {high:g}", value)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.bad(name, "true or false", value)
        return value

    def record_id(self, name: str, value: Any) -> int:
        """A message id: an int or its pk string (the decimal id)."""
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < ID_LIMIT:
            raise self.bad(name, "a message id (integer or pk string)", value)
        return value

    def ids(self, name: str) -> List[int]:
        """A list of at most MAX_IDS_PER_ACK record ids."""
        ids = self.get(name)
        if not isinstance(ids, list) or len(ids) > MAX_IDS_PER_ACK:
            raise self.bad(name, f"a list of at most {MAX_IDS_PER_ACK} message ids", ids)
        if all(type(value) is int and 0 <= value < ID_LIMIT for value in ids):
            return ids  # what the client sends: checked at a fifth of record_id's cost
        return [self.record_id(name, value) for value in ids]

    def topic_filter(self, name: str) -> Optional[str]:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not valid_filter(value):
            raise self.bad(name, "an MQTT topic filter", value)
        return value

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.params if k not in self.read)
        if unknown:
            known = ", ".join(sorted(self.read)) or "none"
            raise RpcFailure(Code.BAD_PARAMS,
                             f"{self.method}: unknown param {_show(unknown[0])} (accepted: {known})")


def _store_failures(read: Callable[..., T]) -> Callable[..., T]:
    """`read`, run later by the server (a parked call's poll, a walk's step), with a store
    error as the caller's `store_error` (`handle` does that for a call answered at once)."""
    @functools.wraps(read)
    def run(*args: Any) -> T:
        try:
            return read(*args)
        except StoreError as exc:
            raise RpcFailure(Code.STORE_ERROR, str(exc)) from None
    return run


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _ReadQuery(NamedTuple):
    limit: int
    topic: Optional[str]
    after: Optional[int]
    consumer: Optional[str]
    wanted: Optional[Tuple[str, str]]  # a user property (name, value)
    paged: bool

    @property
    def filtered(self) -> bool:
        """Read by a walk over the records, not the inbox's head (walk.py)."""
        return self.consumer is not None or self.topic is not None or self.wanted is not None


def _utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _own_result(result: Union[int, ConsumerCallError]) -> int:
    """A shared commit's answer to one named ack: its count, or the error it alone met."""
    if isinstance(result, ConsumerCallError):
        raise RpcFailure(Code.BAD_PARAMS, f"ack: {result}")
    return result


class Methods:
    """The API methods; `handle(name, params)` is what `RpcServer` calls."""

    NAMES = ("status", "messages", "ack", "wait", "publish", "outbox", "retry", "drop", "purge",
             "consumers", "reset", "remove_consumer")

    def __init__(self, store: Callable[[], Store], status_provider: Callable[[], Dict[str, Any]],
                 on_outbox_added: Callable[[], None], egress_connected: Callable[[], bool],
                 rules: Callable[[], ApiRules], egress_link: Callable[[], Dict[str, Any]] = dict,
                 on_replay: Callable[[], None] = lambda: None):
        """`store` and `rules` are read on every call: the supervisor swaps both on a reload
        (see `runtime.Runtime`), so a method never works with a stale limit or a closed store.
        `egress_link`: the egress worker's latest counters and link report (its broker's limits).
        `on_replay()`: a consumer was replayed; the server should poll its parked waits (as
        after a commit) so that they deliver the replayed messages now, and first."""
        self.on_replay = on_replay
        # consumer -> the mark of its last replay (this run's sequence, so marks only grow):
        # parked waits and clients reading past it start over; `_pruned`, the highest mark
        # dropped with a consumer gone, stands for those (a count dropped to 0 hid a replay)
        self._replays: Dict[str, int] = {}
        self._replay_seq = self._pruned = 0
        # this run's token, sent with `replays`: the counts start from 0 at every start, and a
        # client must tell a new run's count from a replay (a pid is 1 at every start in a container)
        self._run = int.from_bytes(os.urandom(8), "big")
        self._store = store
        self.status_provider = status_provider
        self.on_outbox_added = on_outbox_added
        self.egress_connected = egress_connected
        self._rules = rules
        self.egress_link = egress_link
        self._table = {name: getattr(self, f"_{name}") for name in self.NAMES}
        self.acks = SharedCommits(lambda calls: self.store.ack_each(calls))
        self.consumer_acks = SharedCommits(lambda calls: self.store.consumer_ack_each(calls, time.time()))
        self.publishes = SharedCommits(self._queue_all, full_code=Code.OUTBOX_FULL)

    def handle(self, method: str, params: Dict[str, Any], uid: Optional[int] = None) -> Any:
        """`uid`: the caller's (SO_PEERCRED), for consumers limited by allowUids."""
        target = self._table.get(method)
        if target is None:
            raise RpcFailure(Code.UNKNOWN_METHOD, f"unknown method {_show(method)} "
                             f"(this daemon has: {', '.join(self.NAMES)})")
        reader = _Params(method, params, uid)
        try:
            return target(reader)
        except ConsumerCallError as exc:
            raise RpcFailure(Code.BAD_PARAMS, f"{method}: {exc}") from None
        except (StoreFull, DiskFull) as exc:  # README: a full disk is handled like a full store
            code = Code.OUTBOX_FULL if method == "publish" else Code.STORE_ERROR
            raise RpcFailure(code, str(exc)) from None
        except StoreBusy as exc:
            raise store_busy(exc) from None
        except StoreError as exc:
            raise RpcFailure(Code.STORE_ERROR, str(exc)) from None

    @property
    def store(self) -> Store:
        return self._store()

    @property
    def rules(self) -> ApiRules:
        return self._rules()

    # -- helpers ------------------------------------------------------------------------------

    def _bounded(self, records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The leading records that fit the response budget (at least one)."""
        used, budget = 0, self.rules.response_budget
        for index, record in enumerate(records):
            used += len(record["payload"]) + len(record["topic"].encode("utf-8", "surrogatepass")) \
                + _RECORD_ENVELOPE + properties_size(record.get("properties"), per_item=12)
            if used > budget and index > 0:
                return records[:index]
        return records

    def _fetch(self, limit: int, after: Optional[int]) -> List[Dict[str, Any]]:
        """An unfiltered read of the inbox: `limit` and the answer's size bound its walk."""
        page = self.store.messages_page(limit, None, after, size=self.rules.response_budget)
        return self._bounded([m.to_dict() for m in page.found])

    def _fetch_page(self, limit: int, topic: Optional[str], after: Optional[int],
                    consumer: Optional[str] = None, user_property: Optional[Tuple[str, str]] = None
                    ) -> Tuple[Dict[str, Any], Optional[int]]:
        """A `paged` answer, {"messages": [...], "cursor": id or None}, from a walk of at most
        SCAN_BUDGET records when a filter or a named consumer is given (without either every
        record is kept and `limit` bounds the walk); and the last id looked at (where a parked
        wait goes on)."""
        size = self.rules.response_budget  # the walk stops where `_bounded` would cut
        if consumer is not None:
            page = self.store.consumer_messages_page(consumer, limit, topic, after, SCAN_BUDGET, user_property,
                                                     size)
        else:
            budget: Optional[int] = None  # unfiltered: every record kept, `limit` bounds the walk
            if topic is not None or user_property is not None:
                budget = SCAN_BUDGET
            elif self.store.has_message_expiry():  # but those past their expiry (re-read 31)
                budget = limit + EXPIRED_PAST
            page = self.store.messages_page(limit, topic, after, budget, user_property, size)
        found = self._bounded([m.to_dict() for m in page.found])
        # a full response goes on after its last message: the walk's cursor would skip what it
        # left out, and none ended the client's calls short of `limit` (found by review)
        cursor = page.cursor if len(found) == len(page.found) else found[-1]["id"]
        answer: Dict[str, Any] = {"messages": found, "cursor": cursor}
        if consumer is not None:  # how often it was replayed: a reader past the replay starts over
            answer.update(replays=self._replay_mark(consumer), run=self._run)
        return answer, page.last

    def _read_query(self, p: _Params) -> "_ReadQuery":
        """The params `messages` and `wait` share, the last ones read (then `p.done()`)."""
        limit = p.integer("limit", 100, 1, MAX_LIMIT)
        topic = p.topic_filter("topic")
        after = p.get("after")
        after = None if after is None else p.record_id("after", after)
        paged = p.boolean("paged", False)
        consumer = self._consumer(p)
        wanted = mqttprops.user_property(p)
        p.done()
        return _ReadQuery(limit, topic, after, consumer, wanted, paged)

    # -- methods ------------------------------------------------------------------------------

    def _status(self, p: _Params) -> Dict[str, Any]:
        p.done()
        supervisor = dict(self.status_provider())
        wear = supervisor.pop("wear", None) or {}
        try:
            figures = self.store.stats()
            consumers = self.store.consumers_report()
        except StoreError as exc:  # a damaged store: the rest of the status still answers
            supervisor.update(inbox={}, outbox={"limit": self.rules.offline_publish_queueing},
                              store={"path": str(self.store.path), "damaged": str(exc)})
            return supervisor
        counters = {name: figures[name] for name in COUNTERS}
        counters.update(supervisor.get("counters") or {})
        egress = (supervisor.get("mqtt") or {}).get("egress") or {}
        supervisor.update({
            "version": supervisor.get("version"),
            "uptime": supervisor.get("uptime"),
            "workers": supervisor.get("workers") or [],
            "mqtt": supervisor.get("mqtt") or {},
            "inbox": {"count": figures["inbox_count"], "oldest": figures["inbox_oldest"],
                      "oldest_age": figures["inbox_oldest_age"],
                      "last_id": figures["inbox_last_id"]},
            "outbox": {"count": figures["outbox_count"], "oldest": figures["outbox_oldest"],
                       "oldest_age": figures["outbox_oldest_age"],
                       "limit": self.rules.offline_publish_queueing, "dead": figures["dead_count"],
                       # reported by the egress worker with its counters (heartbeat-fresh)
                       "oldest_inflight_age": egress.get("oldest_inflight_age")},
            "store": {"used_bytes": figures["used_bytes"], "cap_bytes": figures["cap_bytes"],
                      "when_full": figures["when_full"], "path": str(self.store.path),
                      "acks_waiting": figures["acks_waiting"], **wear,
                      # damage met by another read (figures may still read): read-only all the same
                      **({"damaged": self.store.damage} if self.store.damage else {})},
            "counters": counters,
            "consumers": consumers,
        })
        return supervisor

    def _walks(self, q: "_ReadQuery") -> bool:
        """Whether a read goes by a bounded walk (walk.py): a filter or a named consumer, or
        messages with their own expiry stored, which every read leaves out once past it: an
        unbounded read passed them one by one until the sweep (0.6-0.9 s a call, the loop held,
        at 200,000 expired; re-read 31), now EXPIRED_PAST a turn at most."""
        return q.filtered or self.store.has_message_expiry()

    def _messages(self, p: _Params) -> Any:
        q = self._read_query(p)
        if q.paged:
            return self._fetch_page(q.limit, q.topic, q.after, q.consumer, q.wanted)[0]
        if self._walks(q):
            return self._walked(q.limit, q.topic, q.after, q.consumer, q.wanted, None)
        return self._fetch(q.limit, q.after)

    def _ack(self, p: _Params) -> Any:
        ids = p.ids("ids")
        consumer = self._consumer(p)
        p.done()
        window = self.rules.write_window
        if consumer is not None:
            if window > 0:
                return self.consumer_acks.join((consumer, ids), window, _own_result)
            return self.store.consumer_ack(consumer, ids, time.time())
        return self.acks.join(ids, window) if window > 0 else self.store.ack(ids)

    def _wait(self, p: _Params) -> Any:
        timeout = p.number("timeout", 30.0, 0.0, MAX_WAIT_SECONDS)
        q = self._read_query(p)
        if q.paged:
            return self._wait_paged(timeout, q.limit, q.topic, q.after, q.consumer, q.wanted)
        if self._walks(q):
            return self._walked(q.limit, q.topic, q.after, q.consumer, q.wanted, timeout)
        found = self._fetch(q.limit, q.after)
        if found or timeout == 0:
            return found

        @_store_failures
        def poll() -> Optional[List[Dict[str, Any]]]:  # run by the server on notify_inbox()
            return self._fetch(q.limit, q.after) or None
        return Pending(deadline=time.monotonic() + timeout, poll=poll, timeout_result=[])

    def _walked(self, limit: int, topic: Optional[str], after: Optional[int], consumer: Optional[str],
                wanted: Optional[Tuple[str, str]], timeout: Optional[float]) -> Any:
        """An unpaged read with a filter or for a named consumer (`timeout` None: `messages`):
        the bare list callers of the protocol before `paged` expect, read one page per turn of
        the server's loop (walk.py)."""
        def fetch(room: int, start: Optional[int]) -> Tuple[Dict[str, Any], Optional[int]]:
            try:
                return self._fetch_page(room, topic, start, consumer, wanted)
            except UnknownConsumer:  # removed while walked (a store_error, found by re-read):
                return {"messages": [], "cursor": None}, start  # nothing more; a next call registers it

        walk = Walk(_store_failures(fetch), limit, after, self._bounded, waits=timeout is not None)
        found = walk.step()
        if found is not None:
            return found
        replayed = self._replayed(consumer)

        def poll() -> None:  # the server steps the walk on its next turns
            if not walk.walking and replayed():  # parked: a walk under way goes on
                walk.position = after
            walk.poll()
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        return Pending(deadline=deadline, poll=poll, timeout_result=[], walk=walk)

    def count_replay(self, consumer: str) -> None:
        """A replay of `consumer` made elsewhere (a reload widening its filter over stored
        messages): its parked waits and streams start over, as after a `reset`."""
        self._count_replay(consumer)
        self.on_replay()

    def _count_replay(self, consumer: str) -> None:
        """Mark a replay of `consumer`. Past MAX_CONSUMERS marks, those of consumers gone
        (removed, idle, out of the config) are dropped: an app replaying and removing consumers
        under fresh names would otherwise grow them for good; a name dropped reads as the
        highest mark dropped, so no client sees its mark go back (it missed the replays after)."""
        self._replay_seq += 1
        self._replays[consumer] = self._replay_seq
        if len(self._replays) > MAX_CONSUMERS:
            stored = {consumer.name for consumer in self.store.consumer_states()}
            for name in stored - self._replays.keys():  # pinned at what they read: a prune is
                self._replays[name] = self._pruned  # no replay of theirs (found by re-read)
            for name in [n for n in self._replays if n not in stored and n != consumer]:
                self._pruned = max(self._pruned, self._replays.pop(name))

    def _replay_mark(self, consumer: Optional[str]) -> int:
        return self._replays.get(consumer, self._pruned) if consumer else 0

    def _replayed(self, consumer: Optional[str]) -> Callable[[], bool]:
        """For a parked wait: True (once) when `consumer` was replayed since the last ask. Its
        walk stands past the replayed messages, which are the consumer's to read again."""
        seen = [self._replay_mark(consumer)]

        def replayed() -> bool:
            now = self._replay_mark(consumer)
            changed, seen[0] = now != seen[0], now
            return changed
        return replayed

    def _wait_paged(self, timeout: float, limit: int, topic: Optional[str],
                    after: Optional[int], consumer: Optional[str],
                    wanted: Optional[Tuple[str, str]]) -> Any:
        """`wait` with a bounded walk: a page with messages or a cursor answers at once (the
        client calls again from the cursor); a walk that reached the end parks the request, and
        each poll walks on from where the last one stopped, not from `after` again. A replay of
        the consumer answers at once, even with nothing after `after` (a stream reading on from
        its last message stands past the replayed ones: its `replays` tells it to start over).
        Timed out at the end, it answers `seen`, the last id its walk looked at: the client's
        next wait of the same query goes on after it (it read the whole inbox again from the
        start at every such call: a wait in a loop for a rare topic over 500,000 messages held
        the daemon's loop most of the time, found by review)."""
        answer, last = self._fetch_page(limit, topic, after, consumer, wanted)
        if answer["messages"] or answer["cursor"] is not None or timeout == 0:
            return answer
        position = [last if last is not None else after]
        timed_out = dict(answer, messages=[], cursor=None, seen=position[0])
        replayed = self._replayed(consumer)

        @_store_failures
        def poll() -> Optional[Dict[str, Any]]:  # run by the server on notify_inbox()
            again = replayed()
            if again:
                position[0] = after
            try:
                found, seen = self._fetch_page(limit, topic, position[0], consumer, wanted)
            except UnknownConsumer:  # removed while parked: told as the replay its removal
                # counted (it was a store_error, ending the app's stream: found by re-read)
                return {"messages": [], "cursor": None, "replays": self._replay_mark(consumer),
                        "run": self._run}
            if found["messages"] or found["cursor"] is not None or again:
                return found
            if seen is not None:
                position[0] = timed_out["seen"] = seen
            return None
        return Pending(deadline=time.monotonic() + timeout, poll=poll, timeout_result=timed_out)

    def _publish(self, p: _Params) -> Any:
        payload = p.get("payload")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if not isinstance(payload, bytes):
            raise p.bad("payload", "bytes or a string", payload)
        topic = p.get("topic")
        if topic is None:
            topic = self.rules.egress_topic  # checked when the config was loaded
        elif not isinstance(topic, str):
            raise p.bad("topic", "an MQTT topic (a string)", topic)
        else:
            problem = publish_topic_problem(topic, self.rules.max_topic_bytes,
                                            self.rules.max_topic_slashes)
            if problem:
                raise RpcFailure(Code.BAD_PARAMS, f"publish: param 'topic' {problem}: "
                                 f"{_show(topic)} (nothing was queued)")
        qos = p.integer("qos", 1, 0, 1)
        retain = p.boolean("retain", False)
        if retain and topic.startswith(AWS_SERVICE_PREFIX):  # on any endpoint: a custom domain too
            raise RpcFailure(Code.BAD_PARAMS, f"publish: param 'retain': AWS IoT Core keeps no retained"
                             f" message on its reserved topics ({_show(topic)}) (nothing was queued)")
        properties = mqttprops.publish_properties(p)
        p.done()
        if properties and properties.get("payload_format_indicator") == 1 and not _utf8(payload):
            # a broker refuses it (AWS IoT Core: 0x99), later and far from the call (review "mqtt5")
            raise RpcFailure(Code.BAD_PARAMS, "publish: properties say payload_format_indicator 1 (UTF-8"
                             " text), and the payload is not UTF-8 (nothing was queued)")
        rules = self.rules
        if len(payload) > rules.max_publish_bytes:
            raise RpcFailure(Code.PAYLOAD_TOO_LARGE, f"publish: payload of {len(payload)} bytes "
                             f"exceeds flashlex.thing.mqtt.maxPayloadBytes ({rules.max_publish_bytes})"
                             f" (nothing was queued)")
        cap = rules.offline_publish_queueing
        if cap == 0 and not self.egress_connected():
            raise RpcFailure(Code.EGRESS_OFFLINE, "egress is not connected and offlinePublishQueueing"
                             " is 0: publish refused (nothing was queued)")
        self._check_packet_size(topic, payload, properties, qos)
        entry = (topic, payload, qos, retain, properties)
        if rules.write_window > 0:
            return self.publishes.join(entry, rules.write_window, self._queued)
        (outbox_id,) = self.store.outbox_append([entry], max_entries=cap if cap > 0 else -1)
        self.on_outbox_added()
        return {"id": outbox_id}

    def _queue_all(self, entries: List[Tuple[Any, ...]]) -> List[Optional[int]]:
        """The publishes of one shared commit (sharedcommit.py); None: the outbox was full."""
        cap = self.rules.offline_publish_queueing
        ids = self.store.outbox_append_each(entries, max_entries=cap if cap > 0 else -1)
        if any(i is not None for i in ids):
            self.on_outbox_added()
        return ids

    def _queued(self, outbox_id: Optional[int]) -> Dict[str, int]:
        if outbox_id is None:
            raise RpcFailure(Code.OUTBOX_FULL, f"outbox is full ({self.rules.offline_publish_queueing}"
                             " entries, offlinePublishQueueing)")
        return {"id": outbox_id}

    def _check_packet_size(self, topic: str, payload: bytes, properties: Dict[str, Any],
                           qos: int) -> None:
        """While the egress link is up on MQTT 5, refuse what its broker's Maximum Packet Size
        would refuse (the egress dead-letters such entries queued earlier)."""
        egress = self.egress_link()
        limit = egress.get("broker_max_packet")
        if not (egress.get("connected") and limit):
            return
        size = publish_packet_size(topic, payload, properties, properties.get("message_expiry_interval"),
                                   qos)
        if size > limit:
            raise RpcFailure(Code.BAD_PARAMS, f"publish: a {size}-byte packet exceeds the broker's Maximum"
                             f" Packet Size ({limit} bytes) (nothing was queued)")

    def _outbox(self, p: _Params) -> Dict[str, Any]:
        """Queued entries (or, with dead=true, dead letters), oldest first, with the counts."""
        limit = p.integer("limit", 10, 0, MAX_LIMIT)
        dead = p.boolean("dead", False)
        after = p.get("after")
        after = None if after is None else p.record_id("after", after)
        p.done()
        figures = self.store.stats()
        if not limit:
            entries: List[Dict[str, Any]] = []
        elif dead:
            entries = [d.to_dict() for d in self.store.dead_letters(limit, after, self.rules.response_budget)]
        else:  # attempts are counted by the egress worker, in memory: not known here
            entries = [e.to_dict() for e in self.store.outbox_peek(limit, after, self.rules.response_budget)]
        for entry in entries:
            entry["size"] = len(entry["payload"])
        return {"count": figures["outbox_count"], "dead": figures["dead_count"],
                "limit": self.rules.offline_publish_queueing,
                "oldest_age": figures["outbox_oldest_age"],
                "entries": self._bounded(entries)}

    def _retry(self, p: _Params) -> List[int]:
        """Dead letters back to the outbox's tail; returns their new outbox ids."""
        ids = p.ids("ids")
        p.done()
        moved = self.store.dead_retry(ids)
        if moved:
            self.on_outbox_added()
        return moved

    def _drop(self, p: _Params) -> int:
        """Delete queued entries (or, with dead=true, dead letters); returns how many went."""
        ids = p.ids("ids")
        dead = p.boolean("dead", False)
        p.done()
        return self.store.outbox_drop(ids, dead=dead)

    def _purge(self, p: _Params) -> int:
        confirm = p.get("confirm")
        p.done()
        if confirm is not True:
            raise RpcFailure(Code.CONFIRM_REQUIRED, "purge removes every inbox message: "
                             "call it with confirm=true")
        return self.store.purge()

    # -- named consumers (flashlexd/consumers.py) ---------------------------------------------

    def _consumer(self, p: _Params, required: bool = False) -> Optional[str]:
        """The call's consumer (None: the default one), checked and registered on first use."""
        name = p.get("consumer")
        if name is None and not required:
            return None
        return ConsumerAccess(self.store, self.rules.consumers, self.count_replay).admit(p.method, name, p.uid)

    def _consumers(self, p: _Params) -> List[Dict[str, Any]]:
        p.done()
        report = self.store.consumers_report()
        for entry in report:  # the bound that holds (a dynamic one's was "-" under dynamicMaxBacklog)
            entry["max_backlog"] = backlog_bound(entry["max_backlog"], entry["dynamic"],
                                                 self.rules.consumers.dynamic_max_backlog)
        return report

    def _reset(self, p: _Params) -> Any:
        """Replay (`to="earliest"`), skip (`"latest"`) or start at a message id, a commit of at
        most RESET_STEP records at a time. `paged`: one commit per call, answering `done` and,
        while not done, the `to` of the next call (what `flashlexd.client` sends); otherwise
        one commit per turn of the server's loop (walk.py's `Steps`), answered at the end. The
        answer's `way` goes with the next call's `to` (an id, even for "latest"): how the reset
        goes is decided by its first call (Store.consumer_reset_way). A name not stored is
        refused unless `register` (the client's own consumer, which its first call registers):
        an unnamed app's `reset("dispaly", "latest")` registered a consumer of every topic and
        its skip released every stored message, emptying the inbox for the unnamed apps too."""
        name = p.get("consumer")
        if not p.boolean("register", False) and valid_consumer_name(name) \
                and self.store.consumer_state(name) is None:
            raise RpcFailure(Code.BAD_PARAMS, f"reset: no consumer named {name!r} (an app's own"
                             " consumer is registered by its first call)")
        consumer = self._consumer(p, required=True)
        to = p.get("to")
        if to not in RESET_TARGETS:
            if to is None or (isinstance(to, str) and not to.isdigit()):
                raise p.bad("to", "earliest, latest or a message id", to)
            to = p.record_id("to", to)
        way = p.get("way")  # a paged reset's next call: the way its first one went
        if way is not None and way not in RESET_WAYS:
            raise p.bad("way", "skip, start or replay (the `way` a paged reset's answer gave)", way)
        paged = p.boolean("paged", False)
        p.done()
        target = self.store.consumer_reset_target(to)
        way = way or self.store.consumer_reset_way(consumer, to, target)  # type: ignore[arg-type]

        def step() -> Tuple[Dict[str, Any], bool]:
            floor, done = self.store.consumer_reset_step(consumer, target, way)  # type: ignore[arg-type]
            if done and way != "skip":  # its acks from the target on were forgotten
                self._count_replay(consumer)  # type: ignore[arg-type]
                self.on_replay()
            answer: Dict[str, Any] = {"consumer": consumer, "acked_through": floor}
            if paged and done:
                answer.update(to=None)
            elif paged:
                answer.update(to=target + 1, way=way)
            return answer, done

        return _stepped(step, paged)

    def _remove_consumer(self, p: _Params) -> Any:
        """Remove a dynamic consumer now, as `consumerIdleDays` does once it is unused that long
        (an app's typo, or an app retired, otherwise holds its messages and one of the
        MAX_CONSUMERS places for days): the messages only it held leave, a commit of at most
        COMMIT_STEP records at a time, `paged` as `reset` is. A declared one goes by the config."""
        name = p.get("consumer")
        if not valid_consumer_name(name):
            raise p.bad("consumer", CONSUMER_NAME_RULE, name)
        paged = p.boolean("paged", False)
        p.done()
        state = self.store.consumer_state(name)
        if state is None:
            raise RpcFailure(Code.BAD_PARAMS, f"remove_consumer: no consumer named {name!r}")
        if not state.dynamic:
            raise RpcFailure(Code.BAD_PARAMS, f"remove_consumer: consumer {name!r} is declared in"
                             " flashlex.app.consumers: take it out of the config and reload first")

        def step() -> Tuple[Dict[str, Any], bool]:
            if self.store.consumer_remove_step(name, math.inf) is None:
                return {"consumer": name}, False
            removed = self.store.consumer_state(name) is None  # else declared by a reload meanwhile
            if removed:
                log.warning("consumer %r removed by uid %s; the messages it alone still held back were released",
                            name, p.uid)
                self._count_replay(name)  # a new one of the name starts at the earliest message
                self.on_replay()  # its parked waits hear of it now
            return {"consumer": name, "removed": removed}, True

        return _stepped(step, paged)


def _stepped(step: Callable[[], Tuple[Dict[str, Any], bool]], paged: bool) -> Any:
    """A call done a bounded commit at a time (`step()`: its answer so far, and whether it is
    done). `paged`: one step per call, the answer saying `done` (the client calls on); otherwise
    one step per turn of the server's loop (walk.py's `Steps`), answered at the end."""
    if paged:
        answer, done = step()
        return dict(answer, done=done)

    def unpaged() -> Optional[Dict[str, Any]]:
        answer, done = step()
        return answer if done else None

    done = unpaged()
    if done is not None:
        return done
    return Pending(deadline=float("inf"), poll=lambda: None, walk=Steps(_store_failures(unpaged)))
