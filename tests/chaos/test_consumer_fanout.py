"""Named consumers under faults: three apps with overlapping filters and a slow fourth one with
maxBacklog read one inbox through the real daemon while three independent publishers flood it,
a random worker is SIGKILLed every 0.5 s and the whole daemon loses power once.

Each app gets every matching message the broker had a PUBACK for, none twice once it acked it,
first copies in store order; no message leaves the inbox before every matching app acked it (a
message that left early would be missing for the app that had not); once all acked, only the
slow app's last maxBacklog messages stay, and everything it did not get is counted as dropped.
Short in `make test`, 20,000 messages under FLASHLEXD_CHAOS=full.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import yaml

from flashlexd.client import FlashlexError, connect
from flashlexd.topics import topic_matches
from tests.broker import INGRESS_TOPIC, wait_for
from tests.chaos.conftest import (AckedPublisher, Daemons, chaos_config, chaos_timeout,
                                  daemon_status, eventually, power_cut, reopen, rng, scale,
                                  wait_ready)
from tests.chaos.results import Result
from tests.broker import open_store, publish

TOPICS = ("fan/a/x", "fan/a/y", "fan/b/x")
APPS = {"all": "#", "a": "fan/a/#", "x": "fan/+/x"}  # overlapping: fan/a/x is in all three
SLOW, SLOW_FILTER, SLOW_BACKLOG = "slow", "fan/b/#", 50  # never acks


class ConsumerApp(threading.Thread):
    """An app reading as one named consumer: wait, note, ack; reconnects when the daemon is gone
    (a call that failed may deliver its batch again: only acked messages must never come back)."""

    def __init__(self, socket_path: Path, name: str):
        super().__init__(daemon=True, name=f"consumer-{name}")
        self.socket_path, self.consumer = str(socket_path), name
        self.delivered: List[Tuple[int, str, bytes]] = []
        self.acked: Set[int] = set()
        self.after_ack = 0  # deliveries of an id whose ack had returned: must stay 0
        self.failed_calls = 0
        self.error: Any = None
        self._halt = threading.Event()

    def run(self) -> None:
        client = None
        try:
            while not self._halt.is_set():
                try:
                    if client is None:
                        client = connect(self.socket_path, timeout=5, consumer=self.consumer)
                    batch = client.wait(timeout=0.5, limit=200)
                    for message in batch:
                        self.after_ack += message.id in self.acked
                        self.delivered.append((message.id, message.topic, message.payload))
                    if batch:
                        client.ack(batch)
                        self.acked.update(m.id for m in batch)
                except FlashlexError:
                    self.failed_calls += 1
                    if client is not None:
                        client.close()
                        client = None
                    self._halt.wait(0.05)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            if client is not None:
                client.close()

    def firsts(self) -> List[Tuple[int, str, bytes]]:
        seen: Set[int] = set()
        return [d for d in self.delivered if not (d[0] in seen or seen.add(d[0]))]  # type: ignore[func-returns-value]

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        assert not self.is_alive() and self.error is None, f"{self.consumer}: {self.error!r}"


def fanout_config(broker: Any, directory: Path) -> Path:
    path = chaos_config(broker, directory, mqtt={"subscriptions": ["fan/#"]}, db={"sweepSeconds": 0.3})
    document = yaml.safe_load(path.read_text())
    consumers: Dict[str, Any] = {name: {"filter": f} for name, f in APPS.items()}
    consumers[SLOW] = {"filter": SLOW_FILTER, "maxBacklog": SLOW_BACKLOG}
    document["flashlex"]["app"]["consumers"] = consumers
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def kill_a_worker(daemon: Any, random: Any) -> bool:
    workers = daemon.children()
    if not workers:
        return False
    try:
        os.kill(workers[random.choice(sorted(workers))], signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


@chaos_timeout(120, 900)
def test_three_apps_with_overlapping_filters_under_kills_and_a_power_cut(broker: Any, tmp_path: Path,
                                                                        daemons: Daemons) -> None:
    count = scale(500, 6_667)  # per topic: 1,500 or 20,001 messages in all
    rate = scale(120, 600)  # per publisher: the short run lasts a few seconds of kills
    random = rng("consumer fanout")
    result = Result("consumer fanout")
    config = fanout_config(broker, tmp_path / "etc")
    store = open_store(config)
    daemon = daemons.start(config)
    apps = {name: ConsumerApp(daemon.socket_path, name) for name in APPS}
    for app in apps.values():
        app.start()
    publishers = [AckedPublisher(broker, topic, tmp_path / f"acks-{i}.log", rate=rate, count=count,
                                 client_id=f"fanout-pub-{i}") for i, topic in enumerate(TOPICS)]
    kills, cut = 0, False
    deadline = time.monotonic() + scale(90, 800)
    total = count * len(TOPICS)
    while any(p.process.poll() is None for p in publishers) or store.stats()["received"] < total:
        assert time.monotonic() < deadline, f"not stored in time: {result}"
        time.sleep(0.5)  # the kill cadence
        if not cut and store.stats()["received"] >= total // 2:
            power_cut(daemon)
            store = reopen(store, config)
            daemon = daemons.start(config)
            cut = True
        elif wait_ready(daemon, 30, connected=()) and kill_a_worker(daemon, random):
            kills += 1
    for publisher in publishers:
        publisher.stop()
    wait_ready(daemon)
    # the broker delivers in order, redeliveries first: once this marker reached "all", all
    # it held for the daemon is through ingress (the marker itself leaves once "all" acked it)
    publish(broker, INGRESS_TOPIC, b"settle-fanout")
    wait_for(lambda: any(p == b"settle-fanout" for _, _, p in apps["all"].delivered), 30,
             "the settle marker delivered to 'all'")
    sent = {topic: [payload for _, _, payload in p.acks()] for topic, p in zip(TOPICS, publishers)}

    def expected(topic_filter: str) -> Set[Tuple[str, bytes]]:
        return {(t, p) for t in TOPICS if topic_matches(topic_filter, t) for p in sent[t]}

    for name, app in apps.items():
        want = expected(APPS[name])
        eventually(lambda: want <= {(t, p) for _, t, p in app.delivered}, scale(30, 120))
    # the slow app's upkeep runs every sweep: all that stays is its backlog
    eventually(lambda: store.inbox_count() <= SLOW_BACKLOG, 30)
    for app in apps.values():
        app.stop()

    figures: Dict[str, Dict[str, int]] = {}
    for name, app in apps.items():
        want = expected(APPS[name])
        firsts = app.firsts()
        got = [(t, p) for _, t, p in firsts if t != INGRESS_TOPIC]  # settle markers: "all" only
        ids = [i for i, _, _ in firsts]
        in_topic_order = all([p for t, p in got if t == topic] == sent[topic]
                             for topic in TOPICS if topic_matches(APPS[name], topic))
        figures[name] = {"missing": len(want - set(got)), "unknown": len(set(got) - want),
                         "twice": len(got) - len(set(got)), "after_ack": app.after_ack,
                         "unordered": int(ids != sorted(ids) or not in_topic_order),
                         "redelivered": len(app.delivered) - len(firsts)}
    status = daemon_status(daemon) or {}
    slow = next(c for c in status.get("consumers", []) if c["name"] == SLOW)
    slow_stored = len(sent["fan/b/x"])
    left = [m for m in store.messages(limit=10 ** 6)]
    result.set(messages=sum(len(v) for v in sent.values()), kills=kills, power_cut=int(cut),
               **{f"{n}": "/".join(str(v) for v in f.values()) for n, f in figures.items()},
               slow_dropped=slow["dropped"], slow_backlog=slow["backlog"], inbox_left=len(left))
    line = result.emit()
    clean = {"missing": 0, "unknown": 0, "twice": 0, "after_ack": 0, "unordered": 0}
    for name, f in figures.items():
        assert {k: f[k] for k in clean} == clean, f"{name}: {f}; {line}"
    assert cut and kills >= scale(2, 8), line
    assert slow["backlog"] == len(left) <= SLOW_BACKLOG, line
    assert all(m.topic == "fan/b/x" for m in left), line  # every other message left once all acked
    assert slow["dropped"] + slow["backlog"] == slow_stored, line
