"""The MQTT side of a worker: a `Connection` that keeps a paho-mqtt 2.x client (built by
`mqttclient` from the FlashLex config) connected from the worker's own select loop.

No paho thread and no `loop_forever`: the worker's loop waits on `Connection.wait_fds()`,
calls `on_ready()` and `service()`, so every callback runs on the worker's main thread and a
heartbeat proves the MQTT work is progressing. paho's loop would also pace reconnects by
sleeping, and its connect blocks; here `ReconnectBackoff` only says when the next CONNECT is
due, a `Dialer` connects without blocking, and a `LinkWatch` says when a link stopped answering.

Sessions are persistent with a fixed client id: MQTT 3.1.1 `clean_session=False`, or MQTT 5
never Clean Start and a Session Expiry Interval: the broker keeps our subscriptions and
unacknowledged messages across disconnects, worker restarts and a store replaced by a new one.
`protocol: auto` speaks MQTT 5 and falls back to 3.1.1 until restart for a broker without it
(`mqttv5.ProtocolChoice` has the rules); `BrokerLimits` holds what an MQTT 5 CONNACK said.
"""
from __future__ import annotations

import logging
import re
import select
import socket
import ssl
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from paho.mqtt.enums import MQTTErrorCode

from flashlexd.pahoimport import paho
from flashlexd.reconnect import ReconnectBackoff
from flashlexd.config import Config
from flashlexd.dialer import Dialer
from flashlexd.linkwatch import LinkWatch, Verdict
from flashlexd.logs import KindThrottle, since_last
from flashlexd.mqttclient import (_ABRUPT_CLOSE, WEBSOCKET_PATH, LastError, LinkCredentials, build_client,
                                  describe_error, uses_alpn, websocket_hint)
from flashlexd.mqttv5 import V5, V311, BrokerLimits, ProtocolChoice, reason_name
from flashlexd.publishread import Publish, message_fields
from flashlexd.timesync import CLOCK_RETRY_SECONDS, clock_problem

log = logging.getLogger(__name__)

FAILURE_LOG_SECONDS = 600.0  # the same connection failure again within this: DEBUG, counted
MAX_PACKETS_PER_PASS = 1024
# a close this soon after a refusing PUBACK (MQTT 5: one with a failure reason code; 3.1.1: any,
# as it cannot say) is the publish's refusal: mosquitto 2.0 writes the PUBACK and the close back
# to back. Short, because an egress publishing steadily has a PUBACK in any wider window, and a
# clone's kicks, landing at random, would never be counted
PUBACK_THEN_CLOSE_SECONDS = 0.1
# what an overdue acknowledgement answers, as a dead link's reason names it: the ingress's
# UNSUBSCRIBE is mostly its own delivery check (workers/barrier.py), none a user asked for
ANSWER_TO = {"SUBACK": "SUBACK (the answer to the link's SUBSCRIBE)",
             "UNSUBACK": "UNSUBACK (the answer to the link's UNSUBSCRIBE: its check that its PUBACKs"
                         " were taken, or a filter no longer configured)"}
QUICK_DROPS = 3  # drops by the broker soon after CONNACK, none of ours the cause: a client-id conflict?
# MQTT 5 DISCONNECT reasons that say why the broker closed the link, none of them a publish's
# doing: Server busy, Server shutting down, Keep alive timeout, Session taken over,
# Administrative action, Use another server, Server moved, Connection rate exceeded,
# Maximum connect time; and a throttling broker's Message rate too high, Quota exceeded (AWS
# IoT Core's DISCONNECT over a quota): no entry's doing either
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT: another connection with our client id
NOT_AN_ENTRYS_FAULT = frozenset({0x89, 0x8B, 0x8D, 0x8E, 0x96, 0x97, 0x98, 0x9C, 0x9D, 0x9F, 0xA0})


def _ago(seconds: float) -> str:
    """How long ago, for a log line. A span from before this process is on the wall clock: after
    a reboot into a clock behind (fake-hwclock, 1970) it is negative, and unknown."""
    return f"{seconds:.0f}s ago" if seconds >= 0 else "at a time the clock is now behind"


def _outage(down: Optional[float], tries: int) -> str:
    """What the "connected" line adds: how long the link was down and how many attempts it
    took, so that the log says when an outage ended and what it cost (it did not: review
    "ops", an 11-minute outage's last 90 failures counted nowhere)."""
    parts = [] if down is None else [f"{down:.0f}s down"]
    if tries > 1:
        parts.append(f"{tries} attempts")
    return f" after {', '.join(parts)}" if parts else ""


class Connection:
    """One MQTT connection kept up from a worker's loop.

    `on_change(connected, error)` is called when the connection comes up (error None) and on
    each failed attempt or drop (with a one-line reason); `on_publishes(found)` for the
    PUBLISH packets received (a list of `publishread.Publish`: most are read straight out of
    the socket's bytes, the rest decoded by paho), `on_publish(mid)` for each of ours the
    broker acknowledged.

    No step blocks the loop: the connect and TLS handshake run through a `Dialer` the loop's
    select() waits on, and connectDisconnectTimeout bounds the attempt up to the CONNACK. Once
    up, a `LinkWatch` gives every acknowledgement a deadline (mqttOperationTimeout) and the
    broker's silence one (1.5 x keepalive at most); past either, the socket is closed and the
    usual reconnect follows. `fresh_client` builds a new paho client for every attempt, so paho
    resends nothing by itself: the egress resends its in-flight entries itself, paced and in
    order, and can send a suspect one alone.
    """

    def __init__(self, config: Config, client_id: str,
                 on_change: Callable[[bool, Optional[str]], None],
                 on_publishes: Optional[Callable[[List[Publish]], None]] = None,
                 on_publish: Optional[Callable[[int, Any], None]] = None,
                 clock: Callable[[], float] = time.monotonic, fresh_client: bool = False,
                 track_session: bool = False, session_seen_at: Optional[float] = None,
                 on_build: Optional[Callable[[paho.Client], None]] = None,
                 fell_back: bool = False, on_fall_back: Optional[Callable[[], None]] = None,
                 connected_ago: Optional[float] = None,
                 on_connect_sent: Optional[Callable[[], None]] = None,
                 session_broker: Optional[str] = None, broker_unknown: bool = False,
                 max_packet: Optional[int] = None):
        """`track_session`: warn when the broker loses this client id's persistent session
        (ingress: what the broker held for us is gone; the egress resends from its outbox, so
        the broker keeps nothing of value for it). `session_seen_at`: when (wall clock) an
        earlier process last had the link up (the store remembers it), so a session lost while
        no process ran is reported too: for the ingress, when a link was last up on this broker
        (`Thing.broker_identity`; None: a session never was, so none can be lost there).
        `session_broker`: the identity of the last link's broker (None: none, or unknown); on
        another one what the old one queued stays there: the first link says so.
        `broker_unknown`: earlier links on a broker the store does not name (an upgrade): no
        session there may be a move while stopped, not a loss. `connected_ago`: seconds since
        an earlier process last sent a CONNECT as this client id, so a worker replaced moments
        after does not CONNECT again within MIN_CONNECT_INTERVAL (AWS IoT Core's limit is per
        client id);
        `on_connect_sent()` is called before each CONNECT goes out, to note it for the next.
        `on_build(client)` sets up each paho client built (a protocol fallback builds anew).
        `on_publish(mid, reason)` gets the PUBACK's reason code. `fell_back`: an earlier worker
        of this daemon run found the broker without MQTT 5, so `auto` starts on 3.1.1 (no probe
        per worker restart); `on_fall_back()` is called when this one finds it. `max_packet`:
        the largest packet the broker may send this link (MQTT 5; None: no limit)."""
        self.thing = config.thing
        self.client_id = client_id
        self.max_packet = max_packet
        self.on_change = on_change
        self.on_publishes, self.on_publish = on_publishes, on_publish
        self.clock = clock
        self.fresh_client = fresh_client
        mqtt = config.thing.mqtt
        self.choice = ProtocolChoice(mqtt.protocol, fell_back)
        self.on_fall_back = on_fall_back
        self.on_build = on_build
        self.limits = BrokerLimits()  # from the last CONNACK
        self._rebuild = False  # the next attempt needs a new client (another protocol)
        self.timeout = mqtt.connect_timeout
        self.keepalive = mqtt.keepalive
        self.credentials = LinkCredentials(self.thing.keys, alpn=uses_alpn(self.thing))
        self.watch = LinkWatch(mqtt.keepalive, mqtt.operation_timeout, clock)
        self.backoff = ReconnectBackoff(mqtt.backoff, clock)
        if connected_ago is not None:
            self.backoff.connected_elsewhere(connected_ago)
        self.on_connect_sent = on_connect_sent
        self.client = self._build()
        self.dialer: Optional[Dialer] = None
        self.connected = False
        self.closing = False
        self.handled = 0  # PUBLISH and PUBACK packets passed on: how on_ready sees progress
        self.taken_straight = 0  # PUBLISH packets read without paho (publishread.py)
        self.sessions_lost = 0
        self.throttled = 0       # links closed because the broker stopped acknowledging publishes
        self.entry_drops_excused = True  # set by the egress (PoisonWatch.excuses_drops)
        self.track_session = track_session
        self._had_session = track_session and session_seen_at is not None
        self._seen_at = session_seen_at
        self.broker = self.thing.broker_identity
        self._session_broker = session_broker if track_session else None
        self._broker_unknown = broker_unknown
        self.moved_from: Optional[str] = None  # the last link's broker, when this link is on another
        self._up_since: Optional[float] = None
        self._down_since: Optional[float] = None
        self._quick_drops = 0    # consecutive drops by the broker soon after CONNACK
        self._clone_sign: Optional[str] = None  # the last sign of another client on our id
        self._last_refusal: Optional[float] = None  # when this link's last PUBACK that may refuse came
        self._subscribes_due: Dict[int, List[str]] = {}  # SUBSCRIBE packet id -> its filters
        self._subscribe_closes = 0  # links in a row closed while a SUBSCRIBE was unanswered
        # the last close's SUBSCRIBEs left unanswered (their filters, in the order sent): the
        # ingress finds a filter the broker refuses so (workers/subscriptions.py)
        self.unanswered_at_close: List[List[str]] = []
        self._asked_again: Optional[int] = None  # the SUBSCRIBE asking again for a refused filter
        self._quiet_failure = False  # this drop is logged at DEBUG: that SUBSCRIBE's expected close
        self._failure_lines = KindThrottle(FAILURE_LOG_SECONDS)  # by a failure's shape
        self._dead_reason: Optional[str] = None
        self.last_verdict: Optional[Verdict] = None  # why we closed the last link ourselves
        # the broker's DISCONNECT (MQTT 5) named a cause that is no entry's doing (session
        # taken over, shutting down, server moved...): the poison search must not count it
        self.closed_for_other_cause = False
        # the link ended without the broker's TLS close, or (MQTT 5) before the broker had all
        # we sent: most likely the path's doing, which the poison search counts as a fraction
        # of a drop (workers/poison.py)
        self.cut_by_path = False
        self.session_present = False  # the last CONNACK's: the broker kept what it held for us
        self.attempts = 0  # connection attempts begun: did the broker take the first after a drop?
        self._attempts_at_link = 0  # `attempts` when the last link came up
        self._told_down = False  # a failure was logged at ERROR since the last "connected" line
        self._connack_due: Optional[float] = None
        self._errors = LastError()
        self._recycling = False  # our DISCONNECT is out: a reconnect, not a failure

    @property
    def protocol(self) -> str:
        """"5" or "3.1.1": what the link speaks (or its next CONNECT will)."""
        return self.choice.current

    def _build(self) -> paho.Client:
        client = build_client(self.thing, self.client_id, self.timeout, context=self.credentials.context, dialed=True,
                              protocol=self.protocol, max_packet=self.max_packet)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        if self.on_publishes is not None:
            def message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
                self.handled += 1
                self._deliver([message_fields(msg)])
            client.on_message = message
        if self.on_publish is not None:
            acknowledged = self.on_publish

            def published(client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
                self.handled += 1
                self.watch.answered("PUBACK", mid)
                if self.protocol != V5 or getattr(reason, "is_failure", False):
                    self._last_refusal = self.clock()
                acknowledged(mid, reason)
            client.on_publish = published
        if self.on_build is not None:
            self.on_build(client)
        return client

    # -- requests whose acknowledgement is awaited ------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool,
                properties: Any = None) -> paho.MQTTMessageInfo:
        """`properties`: paho `Properties` (MQTT 5 only; dropped under 3.1.1, which has none)."""
        info = self.client.publish(topic, payload, qos, retain,
                                   properties=properties if self.protocol == V5 else None)
        if qos and info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.watch.expect("PUBACK", info.mid)
        return info

    def subscribe(self, topics: Sequence[Tuple[str, int]],
                  again: bool = False) -> Tuple[MQTTErrorCode, Optional[int]]:
        """Under MQTT 5 a topic's retained message comes only with a new subscription (Retain
        Handling 1): the ingress subscribes again at every connect, and the same retained
        message would come (and be stored) again each time the broker kept our session.
        `again`: it asks again for a filter the broker refused by closing the link
        (workers/subscriptions.py): a close at it is expected, logged at DEBUG, no drop news."""
        if self.protocol == V5:
            from paho.mqtt.subscribeoptions import SubscribeOptions
            rc, mid = self.client.subscribe([(topic, SubscribeOptions(qos=qos, retainHandling=1))
                                             for topic, qos in topics])
        else:
            rc, mid = self.client.subscribe(list(topics))
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self.watch.expect("SUBACK", mid)
            self._subscribes_due[mid] = [topic for topic, _ in topics]
            if again:
                self._asked_again = mid
        return rc, mid

    def unsubscribe(self, topics: Union[str, List[str]]) -> Tuple[MQTTErrorCode, Optional[int]]:
        rc, mid = self.client.unsubscribe(topics)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self.watch.expect("UNSUBACK", mid)
        return rc, mid

    def acknowledged(self, kind: str, mid: int) -> Optional[List[str]]:
        """A SUBACK or UNSUBACK arrived (the worker's paho callback says so). A SUBACK's
        filters, as its SUBSCRIBE listed them; None for an UNSUBACK or an earlier link's SUBACK.
        The last SUBACK due ends a run of failures: the link is up and subscribed."""
        self.watch.answered(kind, mid)
        if kind != "SUBACK" or mid not in self._subscribes_due:
            return None
        filters = self._subscribes_due.pop(mid)
        if not self._subscribes_due:
            self._subscribed()
        return filters

    @property
    def subscribes_due(self) -> int:
        """This link's SUBSCRIBEs not answered yet."""
        return len(self._subscribes_due)

    @property
    def subscribe_closes(self) -> int:
        """Links in a row closed while one of their SUBSCRIBEs was unanswered."""
        return self._subscribe_closes

    # -- the worker loop's hooks ------------------------------------------------------------------

    def wait_fds(self) -> Tuple[Sequence[Any], Sequence[Any]]:
        if self.dialer is not None:
            return self.dialer.wait_fds()
        sock = self.client.socket()
        if sock is None:
            return (), ()
        return (sock,), ((sock,) if self.client.want_write() else ())

    def on_ready(self, readable: Sequence[Any], writable: Sequence[Any],
                 max_packets: int = MAX_PACKETS_PER_PASS, enough: Optional[Callable[[], bool]] = None) -> None:
        """Write what is queued, then read up to `max_packets` packets that are already here,
        or until `enough()` says so after a run of them (the first run is always read).

        Reads go on while they yield messages, with no select() per packet (paho's own loop
        does one): a read that finds nothing (or only a PINGRESP, SUBACK...) ends the pass and
        the worker's select() says when there is more. Whole PUBLISH packets are taken
        straight from the bytes read; paho reads every other packet, one `loop_read` each."""
        if self.dialer is not None:
            if readable or writable:
                self._dial_step()
            return
        sock = self.client.socket()
        if sock is not None and sock in writable:
            self.client.loop_write()
        if sock is not None and (sock in readable or self._buffered(sock)):
            self.watch.heard_from()
            budget = max(1, max_packets)
            while budget > 0:
                taken = self._take_publishes(budget)
                if taken is None:
                    break  # the socket has nothing more now
                if taken:
                    budget -= taken
                    if enough is not None and enough():
                        break
                    continue
                before = self.handled
                if self.client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                budget -= 1
                sock = self.client.socket()
                if sock is None or (self.handled == before and not self._buffered(sock)):
                    break
                if enough is not None and enough():
                    break
            if self.client.inside_packet():
                self.watch.arriving()

    def _take_publishes(self, limit: int) -> Optional[int]:
        """PUBLISH packets read without paho (`DialedClient.take_publishes`): how many, or
        None when the socket has nothing now."""
        if self.on_publishes is None:
            return 0
        found = self.client.take_publishes(limit)
        if found:
            self.handled += len(found)
            self.taken_straight += len(found)
            self._deliver(found)
        return None if found is None else len(found)

    def _deliver(self, found: List[Publish]) -> None:
        self.watch.delivered()
        self.on_publishes(found)  # type: ignore[misc]

    def _buffered(self, sock: Any) -> bool:
        """Input already here that select() on `sock` cannot see: read by paho's client
        (DialedClient) or decrypted by TLS, not taken yet."""
        return self.client.buffered() or _tls_pending(sock)

    def clone_suspected(self) -> Optional[str]:
        """The last sign that another client uses our client id (links closed soon after
        CONNACK, QUICK_DROPS in a row; a DISCONNECT "Session taken over"), until a link lives
        `stableConnectionTimeSecond`: for `status`, up or down. It was said only while the link
        was down, so a monitor saw a clone's victim healthy about a quarter of the time (review
        "ops")."""
        if self._clone_sign is not None and self.connected and \
                self.clock() - (self._up_since or 0.0) >= self.backoff.policy.stable_seconds:
            self._clone_sign = None
        return self._clone_sign

    def service(self) -> float:
        """Connect when due, give up on a silent broker, keep alive. Returns the seconds until
        this wants to run again."""
        if self.closing:
            return 1.0
        if self.dialer is not None:
            self._dial_step()
            return self.dialer.next_wait() if self.dialer is not None else 0.0
        if not self.connected and self._connack_due is None:
            if self.backoff.wait() > 0:
                return self.backoff.wait()
            self._attempt()
            return 0.0
        if not self.connected and self._connack_due is not None and self.clock() >= self._connack_due:
            self._connack_due = None
            self._abort_socket()
            self._failed(f"no CONNACK from {self.thing.endpoint}:{self.thing.mqtt.port}"
                         f" within {self.timeout:g}s")
            return self.backoff.wait()
        if self.connected:
            verdict = self.watch.verdict()
            if verdict is not None:
                self._declare_dead(verdict)
                return 0.0
        self.client.loop_misc()
        sock = self.client.socket()
        if sock is not None and self._buffered(sock):
            return 0.0  # already read or decrypted, more than select() can see
        wait = min(1.0, self.keepalive / 4)  # paho's keepalive ping is sent from here
        if self.connected:
            wait = min(wait, self.watch.next_check())
        elif self._connack_due is not None:
            wait = min(wait, max(0.0, self._connack_due - self.clock()))
        return wait

    def flush(self, timeout: float) -> None:
        """Block until queued packets are written (or `timeout`); for shutdown only."""
        deadline = self.clock() + timeout
        while self.client.socket() is not None and self.client.want_write():
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            select.select([], [self.client.socket()], [], remaining)
            self.client.loop_write()

    def pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """For a graceful stop: read and write the link until `done()` (what the worker waits
        for came: PUBACKs, an UNSUBACK), the link drops, or `timeout` passes; whether `done()`
        came true. Nothing else runs meanwhile: no reconnect, no keepalive."""
        deadline = self.clock() + timeout
        while not done():
            reads, writes = self.wait_fds()
            left = deadline - self.clock()
            if not self.connected or not reads or left <= 0:
                return False
            ready_r, ready_w, _ = select.select(list(reads), list(writes), [], min(left, 0.1))
            self.on_ready(ready_r, ready_w)
        return True

    def close(self, timeout: float) -> None:
        """Flush what is queued (acks, publishes), send DISCONNECT, and stop reconnecting."""
        self.closing = True
        if self.dialer is not None:
            self.dialer.close()
            self.dialer = None
        if self.connected:
            self.flush(timeout)
            self.client.disconnect()
            self.flush(timeout)

    def recycle(self) -> bool:
        """End the link with a DISCONNECT and connect again as soon as a CONNECT may go, the
        session kept: the broker resends what we left unacknowledged on purpose only on a new
        connection (MQTT 5 forbids resending on the same one). Not a failure: no ERROR, no
        longer backoff. Whether it began now (not when down, or already under way)."""
        if not self.connected or self._recycling:
            return False
        self._recycling = True
        self.client.disconnect()  # written after the queued PUBACKs, in order
        return True

    # -- attempts, paho callbacks -----------------------------------------------------------------

    def _attempt(self) -> None:
        self.attempts += 1
        self._up_since = None  # until its CONNACK
        if self.credentials.renewed() or self.fresh_client or self._rebuild:
            self._rebuild = False
            self.client = self._build()
        # the CONNECT carries our keepalive: a client kept across links still has the last
        # CONNACK's Server Keep Alive, and a broker that sends none takes the CONNECT's
        self.client._keepalive = self.thing.mqtt.keepalive
        self._errors.take()
        self.client.enable_logger(self._errors)  # until CONNACK: why an attempt failed
        self.dialer = Dialer(self.thing.endpoint, self.thing.mqtt.port, self.credentials.context, self.timeout,
                             self.clock, websocket_path=WEBSOCKET_PATH if self.thing.mqtt.use_websocket else None)
        self._dial_step()

    def _dial_step(self) -> None:
        assert self.dialer is not None
        try:
            sock = self.dialer.step()
        except (OSError, ssl.CertificateError, ValueError) as exc:
            self.dialer = None
            self._failed(describe_error(exc, self.thing, self.timeout),
                         retry_in=CLOCK_RETRY_SECONDS if clock_problem(exc, self.thing, self.timeout) else None)
            return
        if sock is None:
            return
        # connectDisconnectTimeout bounds the whole attempt, lookup and handshake included,
        # up to CONNACK (not the handshake and then the CONNACK wait once more)
        deadline, self.dialer = self.dialer.deadline, None
        self.client.dialed = sock  # type: ignore[attr-defined]
        self._connack_due = deadline  # set first: CONNECT may already fail inside
        self.backoff.attempted()  # the second to the next CONNECT counts from here, not from
        # the start of the dial (a slow name lookup or handshake must not shorten it)
        if self.on_connect_sent is not None:
            self.on_connect_sent()  # first: a process replacing this one keeps the pace
        try:
            self.client.reconnect()  # takes the socket, writes CONNECT
        except (OSError, ssl.CertificateError, ValueError) as exc:
            self._connack_due = None
            self._failed(describe_error(exc, self.thing, self.timeout))

    def _declare_dead(self, verdict: Verdict) -> None:
        """Close a link that stopped answering; `_on_disconnect` then reports the reason."""
        where = f"{self.thing.endpoint}:{self.thing.mqtt.port}"
        self.last_verdict = verdict
        unacknowledged = self.watch.pending("PUBACK")
        if verdict is Verdict.SILENT:  # how long in truth: after a suspend, far past the limit
            silent = max(self.watch.silence_limit, self.watch.silent_for())
            self._dead_reason = (f"no answer from {where} for {silent:.1f}s"
                                 f" (keepalive {self.keepalive}s): broker frozen or path down")
        elif verdict is Verdict.OVERTAKEN:
            self.throttled += 1
            self._dead_reason = (f"{where} acknowledged later publishes but not packet"
                                 f" {self.watch.overtaken_mid()} for {self.watch.operation_timeout:g}s"
                                 f" (dropped, as over a quota); resending the {unacknowledged}"
                                 f" unacknowledged on a new connection")
        elif unacknowledged:
            self.throttled += 1
            publishes = "1 publish" if unacknowledged == 1 else f"{unacknowledged} publishes"
            self._dead_reason = (f"{publishes} to {where} not acknowledged within"
                                 f" {self.watch.operation_timeout:g}s{self._silence_said(' or dropping them (a quota)')}"
                                 f"; resending them on a new connection")
        else:
            awaited = " or ".join(ANSWER_TO[kind] for kind in ANSWER_TO if self.watch.pending(kind))
            self._dead_reason = (f"no {awaited or 'SUBACK or UNSUBACK'} from {where} within"
                                 f" {self.watch.operation_timeout:g}s{self._silence_said('')}")
        self._abort_socket()

    def _silence_said(self, or_else: str) -> str:
        """Whether the broker still spoke while an acknowledgement was overdue: a frozen broker
        (or a path gone) sends nothing at all, and within `mqttOperationTimeout` under
        1.5 x keepalive its silence was told as throttling, "though the link is alive" (found by
        review). A broker dropping our publishes may be as silent: said too (`or_else`)."""
        if self._heard_nothing():
            return f", nothing at all heard from it for {self.watch.silent_for():.1f}s: frozen, the path down{or_else}"
        return (" though it still answers (throttled, slow, or it took one it refuses without a word)"
                if or_else else " though it still answers")

    def _heard_nothing(self) -> bool:
        """Whether the broker has sent nothing at all for a while (a second, or half the
        operation timeout): frozen, or the path down."""
        return self.watch.silent_for() >= min(1.0, self.watch.operation_timeout / 2)

    def _abort_socket(self) -> None:
        """Shut the socket down under paho: its next read finds the end and closes it."""
        sock = self.client.socket()
        if sock is None:
            return
        try:
            getattr(sock, "_socket", sock).shutdown(socket.SHUT_RDWR)  # the websocket wrapper's socket
        except OSError:
            pass
        self.client.loop_read()

    def _refusal(self, reason: Any) -> str:
        """A refusing CONNACK's reason in words. paho names a 3.1.1 return code past 5 (none is
        defined) "Unspecified error", and AWS IoT Core answers 7 to a client its policy does not
        let connect (its "MQTT differences"): said so, or the user has nothing to look at."""
        if self.protocol == V311 and str(reason) == "Unspecified error":
            return (f"{reason} (a return code MQTT 3.1.1 does not define: AWS IoT Core's answer when"
                    f" the thing's policy does not allow iot:Connect for this client id)")
        return str(reason)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._connack_due = None
        fallback = self.choice.refused(reason) if reason.is_failure else None
        if fallback is not None:
            self._rebuild = True
            self._fall_back(fallback)
            self.backoff.lost(broker_fault=False)  # the next CONNECT as soon as one may go
            return
        if reason.is_failure:
            # paho closes the socket after this callback and calls _on_disconnect
            self._failed(f"broker {self.thing.endpoint}:{self.thing.mqtt.port} refused the"
                         f" connection of client id {self.client_id!r}: {self._refusal(reason)}")
            return
        now = self.clock()
        self.connected = True
        self.last_verdict = None
        self.closed_for_other_cause = self.cut_by_path = self._recycling = False
        self._subscribes_due, self._asked_again = {}, None
        self._last_refusal = None  # an earlier link's PUBACK excuses no close of this one
        self._adopt_limits(BrokerLimits.from_connack(properties))
        fallback = self.choice.connected()
        if fallback is not None:
            self._fall_back(fallback)
        self.backoff.connected()
        self.watch.up()
        self.client.disable_logger()  # paho logs twice per packet; a drop is worded without it
        present = self.session_present = bool(flags.session_present)
        # a link that keeps dropping soon after its CONNACK and is taken again at the first
        # attempt (a clone of our client id) is one episode: its lines, as its failures', once
        # and then every FAILURE_LOG_SECONDS. Attempts that failed first were an outage, now
        # over: this link's lines, and its failures', are news again
        tries = self.attempts - self._attempts_at_link  # this one included
        if tries > 1:
            self._failure_lines.clear()
        self._attempts_at_link = self.attempts
        # a drop the log told of is followed by its reconnect, whatever the throttle says
        count = max(self._failure_lines.due("connected", now), int(self._told_down))
        self._told_down = False
        if count:
            log.info("connected to %s:%d as %r with MQTT %s (session present: %s)%s%s",
                     self.thing.endpoint, self.thing.mqtt.port, self.client_id, self.protocol,
                     present, _outage(None if self._down_since is None else now - self._down_since, tries),
                     since_last(count, "connects"))
        self.moved_from = self._moved_from()
        if self._had_session and not present and self._broker_unknown:
            log.warning("the broker %s:%d holds no session of client id %r: it lost the one of before"
                        " the upgrade, or the device was moved while stopped (the store named no broker)",
                        self.thing.endpoint, self.thing.mqtt.port, self.client_id)
        elif self._had_session and not present:  # on this broker, moved back to it or not
            self.sessions_lost += 1
            away = (now - self._down_since if self._down_since is not None
                    else time.time() - (self._seen_at or time.time()))  # before this process
            count = self._failure_lines.due("session lost", now)
            if count:
                log.warning("the broker %s:%d lost the session of client id %r (session present:"
                            " false): what it held for us since the link was last up %s is gone%s",
                            self.thing.endpoint, self.thing.mqtt.port, self.client_id, _ago(away),
                            since_last(count, "sessions lost"))
        self._had_session = self.track_session
        self._session_broker, self._broker_unknown = self.broker, False
        self._up_since = now
        self.on_change(True, None)  # the ingress subscribes from here
        if not self._subscribes_due:
            self._subscribed()

    def _moved_from(self) -> Optional[str]:
        """The last link's broker when this link is on another (the config moved the device):
        if it is another broker indeed (two names may reach one), it still holds its session,
        and what it queued for the client id stays there until the device goes back. Said once
        per move; None: the same broker, or none known."""
        old = self._session_broker
        if old is None or old == self.broker:
            return None
        log.warning("client id %r now connects to %s, its last link was to %s (thing.endpoint changed):"
                    " if it is another broker, the messages it queued for client id %r stay there until"
                    " the device goes back to it", self.client_id, self.broker, old, self.client_id)
        return old

    def _subscribed(self) -> None:
        """Up, every SUBSCRIBE answered (the failure lines are forgotten once the link has
        lived `stableConnectionTimeSecond`: `_drop_reason`)."""
        self._subscribe_closes = 0

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if client is not self.client:
            return  # a replaced client closing its old socket
        self.unanswered_at_close = []  # set again below if this close left a SUBSCRIBE unanswered
        if not self.connected:
            if self._connack_due is not None:  # dropped between our CONNECT and its CONNACK
                self._connack_due = None
                if self.choice.closed_before_connack():  # retried with 3.1.1 before it is reported
                    self._rebuild = True
                    self._errors.take()
                    # unreported, but paced as any failure: a broker that refuses our
                    # certificate by closing the link (TLS 1.3) closes every one of these, and
                    # without growing the waits 2 of every 3 attempts went at the base quiet time
                    self.backoff.lost()
                    return
                self._failed(self._drop_reason(reason, before_connack=True))
            return
        self.connected = False
        self._down_since = self.clock()
        # a run of failures was over: this drop is news again. Not after a link we closed for not
        # acknowledging: however long it lived (30 s of mqttOperationTimeout, past the 20 s of
        # stableConnectionTimeSecond), it made no progress, and a stall lasting hours (RabbitMQ
        # on an entry over its max_message_size) logged an ERROR and a "connected" at every link
        lived = self._down_since - (self._up_since or self._down_since)
        if lived >= self.backoff.policy.stable_seconds and self.last_verdict is not Verdict.UNACKNOWLEDGED:
            self._failure_lines.clear()
        if self.closing:
            self.on_change(False, None)
            return
        if self._recycling:
            self._recycling = False
            self.backoff.ended()
            self.on_change(False, None)
            return
        by_packet = getattr(flags, "is_disconnect_packet_from_server", False)  # the broker said why
        self.closed_for_other_cause = by_packet and getattr(reason, "value", None) in NOT_AN_ENTRYS_FAULT
        self.cut_by_path = not by_packet and (self.client.cut_abruptly or self._cut_mid_upload())
        entry_fault = self._entry_fault()
        if by_packet:
            self._errors.take()
            self._dead_reason = None
            said = (f"the broker {self.thing.endpoint}:{self.thing.mqtt.port} disconnected client id"
                    f" {self.client_id!r}: {reason_name(reason)}")
            if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
                self._clone_sign = said
            self._failed(said, entry_fault)
            return
        self._failed(self._drop_reason(reason, before_connack=False), entry_fault)

    def _fall_back(self, why: str) -> None:
        """`auto` met a broker without MQTT 5: 3.1.1 until restart (logged once)."""
        log.warning("broker %s:%d does not speak MQTT 5 (%s): using MQTT 3.1.1 until restart",
                    self.thing.endpoint, self.thing.mqtt.port, why)
        if self.on_fall_back is not None:
            self.on_fall_back()

    def _adopt_limits(self, limits: BrokerLimits) -> None:
        """Honour the CONNACK's Server Keep Alive (paho pings by it; the silence deadline
        follows). The egress reads `limits` for its window (Receive Maximum) and the Maximum
        Packet Size; we send no topic aliases, so any Topic Alias Maximum is honoured."""
        self.limits = limits
        # Server Keep Alive 0 is "no keepalive": paho stops pinging and an idle link hears
        # nothing, which the LinkWatch takes for a dead broker every 1.5 x keepalive. A PINGREQ
        # may be sent at any time, so we keep pinging at our own keepalive and keep the silence
        # deadline. A CONNACK without one: our own keepalive again, for paho's pings (a client
        # kept across links still has the earlier link's) and for the silence deadline
        keepalive = limits.server_keepalive or self.thing.mqtt.keepalive
        self.client._keepalive = keepalive
        if keepalive != self.keepalive:
            self.keepalive = keepalive
            self.watch = LinkWatch(keepalive, self.thing.mqtt.operation_timeout, self.clock)

    def _drop_reason(self, reason: Any, before_connack: bool) -> str:
        where = f"{self.thing.endpoint}:{self.thing.mqtt.port}"
        exc, message = self._errors.take()
        dead, self._dead_reason = self._dead_reason, None
        if dead is not None:
            self._quick_drops = 0
            return f"connection to {where} closed: {dead}"
        if not before_connack and self._entry_fault():  # a clone's kick looks the same: not counted
            pending = self.watch.pending("PUBACK")
            entries = "one entry" if pending == 1 else f"{pending} entries"
            return f"connection to {where} closed by the broker with {entries} in flight (refused?)"
        if before_connack and (exc is None or isinstance(exc, _ABRUPT_CLOSE)):
            # With TLS 1.3 the broker checks our certificate after our side of the handshake
            # is done, so its refusal often shows up only as a closed connection.
            v5 = " (or does not speak MQTT 5: see `protocol`)" if self.choice.unproven_v5 else ""
            return (f"TLS: the broker at {where} closed the connection before CONNACK: it refused"
                    f" the client certificate {self.thing.keys.cert} or does not allow client id"
                    f" {self.client_id!r}{v5}{websocket_hint(self.thing)}")
        if reason == "Keep alive timeout":  # paho: no PINGRESP in time
            return f"connection to {where} lost: no answer within keepalive ({self.keepalive}s)"
        closed = exc is None or isinstance(exc, _ABRUPT_CLOSE)
        if closed and self._subscribes_due and not before_connack:
            self._quick_drops = 0  # RabbitMQ refuses a SUBSCRIBE so: no clone on our client id
            return self._closed_while_subscribing(where, message)
        if exc is not None:
            return describe_error(exc, self.thing, self.timeout)
        lived = self.clock() - (self._up_since or 0.0)
        if lived >= self.backoff.policy.stable_seconds:
            self._quick_drops = 0
        elif not self.watch.pending("PUBACK") and not self._just_refused():
            self._quick_drops += 1
        # else our publish may have been the cause: not counted, and not a reason to forget
        # the quick drops before it (a clone of a device that publishes steadily kicks it
        # with a PUBACK pending as often as not)
        if self._quick_drops >= QUICK_DROPS:
            self._clone_sign = (f"connection to {where} closed {self._quick_drops} times soon after"
                                f" CONNACK with nothing of ours in flight: another client is using"
                                f" client id {self.client_id!r}? (or the network cuts links)")
            return self._clone_sign
        return f"connection to {where} lost: {message or 'closed by the broker or the network'}"

    def _just_refused(self) -> bool:
        """mosquitto 2.0 PUBACKs a publish its ACL denies (0x87 under MQTT 5, a plain PUBACK
        under 3.1.1) and closes the link at once: such a close is no sign of a clone."""
        return self._last_refusal is not None and self.clock() - self._last_refusal < PUBACK_THEN_CLOSE_SECONDS

    def _closed_while_subscribing(self, where: str, message: Optional[str]) -> str:
        """RabbitMQ (3.1.1) refuses a SUBSCRIBE outside the user's permissions by closing the
        link, without a SUBACK: the filters still unanswered are the suspects, the first one
        most of all (a broker answers a link's SUBSCRIBEs in turn). After CONNACK paho's logger
        is off, so a path reset (a NAT, Wi-Fi roaming) looks just the same: one such close is
        a drop; only a close at each SUBSCRIBE, links in a row, is a refusal. A close at the
        SUBSCRIBE asking again for a refused filter, alone in flight, is that refusal again."""
        self.unanswered_at_close = list(self._subscribes_due.values())
        filters = ", ".join(t for due in self.unanswered_at_close for t in due)
        again = list(self._subscribes_due) == [self._asked_again]
        self._subscribes_due = {}
        if again:
            self._quiet_failure = True
            return (f"connection to {where} closed by the broker at our SUBSCRIBE to {filters}, asked for"
                    f" again alone: it still refuses it")
        self._subscribe_closes += 1
        if self._subscribe_closes == 1:
            return (f"connection to {where} lost while our SUBSCRIBE to {filters} was unanswered:"
                    f" {message or 'closed by the broker or the network'}")
        first = self.unanswered_at_close[0]
        suspect = f"{first[0]}?" if len(first) == 1 else "one of them?"
        return (f"connection to {where} closed by the broker before it answered our SUBSCRIBE to"
                f" {filters}, at each of {self._subscribe_closes} links in a row: it refuses {suspect}"
                f" (check the thing's policy or permissions)")

    def _entry_fault(self) -> bool:
        """Did the broker close the link over one of our unacknowledged publishes? The egress
        then looks for it one at a time, so the drop is not the broker's trouble to wait out
        (unless its last search found none guilty: `entry_drops_excused`)."""
        return (self.entry_drops_excused and self._dead_reason is None and not self.closed_for_other_cause
                and not self.cut_by_path and self.watch.pending("PUBACK") > 0)

    def _cut_mid_upload(self) -> bool:
        """MQTT 5: did the link close while our bytes were still on their way (queued in paho,
        or not acknowledged by the peer's TCP)? An MQTT 5 broker judges a publish once it has it
        whole (its Maximum Packet Size, in the CONNACK, is checked before sending), so such a
        drop (Wi-Fi roaming, a NAT reset) is most likely the path's doing. Under 3.1.1 it counts
        in full: an entry too big for the broker is found only by the drops it causes."""
        if self.protocol != V5:
            return False
        return self.client.want_write() or self.client.unacknowledged_at_close > 0

    def _failed(self, error: str, entry_fault: bool = False, retry_in: Optional[float] = None) -> None:
        """`retry_in`: retry sooner than the backoff says (a clock waiting for time sync)."""
        if self.choice.failed():  # 3.1.1 failed as well: the protocol was not the problem
            self._rebuild = True
        if self._up_since is None:  # an attempt that failed: the path or the broker is in
            self._quick_drops = 0   # trouble, and a clone's kicks come after a CONNACK
        self.connected = False
        self.backoff.lost(broker_fault=not entry_fault)
        if retry_in is not None:
            self.backoff.due_at = min(self.backoff.due_at, self.clock() + retry_in)
        self._log_failure(error)
        self.on_change(False, error)

    def _log_failure(self, error: str) -> None:
        """A failure that lasts (a broker down for hours, a clock waiting for time sync, retried
        every 2 s) is one ERROR, then one every FAILURE_LOG_SECONDS with the count, DEBUG in
        between: not a line per attempt into the journal and the log file (`status` shows each).
        Failures that differ only in numbers (a clock, a port, a count) are the same."""
        shape = re.sub(r"\d+", "#", error)
        quiet, self._quiet_failure = self._quiet_failure, False
        if quiet:
            log.debug("%s; retrying in %.1fs", error, self.backoff.wait())
            return
        count, wait = self._failure_lines.due(shape, self.clock()), self.backoff.wait()
        if not count:
            log.debug("%s; retrying in %.1fs", error, wait)
            return
        log.error("%s; retrying in %.1fs%s", error, wait, since_last(count, "such failures"))
        self._told_down = True


def _tls_pending(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    return bool(pending and pending() > 0)
