"""Random clock steps under load: the daemon runs under libfaketime (tests/faketime.py) while
bursts of messages arrive and the wall clock jumps by seconds to days, both ways. Nothing may be
lost (every message is seen in the inbox, then counted as expired), nothing may go early (each
lived expireSeconds of real time) and nothing may stay past its expiry by more than one sweep.

Short in `make test` (~25 s); FLASHLEXD_CHAOS=full runs five minutes at a higher rate."""
from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path
from typing import Dict, List

from flashlexd.client import connect
from tests.broker import INGRESS_TOPIC, Broker, make_certs, publish_lines, wait_for, write_lines
from tests.chaos.conftest import chaos_config, chaos_timeout, rng, scale, wait_ready
from tests.chaos.results import Result
from tests.daemon import Daemon
from tests.faketime import DAY, FakeTime

EXPIRE = 4.0
SWEEP = 0.5
SLACK = 1.5   # a shared 2-core machine under load: the sweep's and the poll's own delays
STEPS = (-2 * DAY, -DAY, -3600, -300, -30, 0, 0, 30, 300, 3600, DAY)


class Watcher:
    """Pages through the inbox over the API, as fast as it can, and remembers for each
    message when it was first and last seen and the real age the daemon gave it last."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.first: Dict[bytes, float] = {}
        self.last: Dict[bytes, float] = {}
        self.age: Dict[bytes, float] = {}
        self.widest_gap = 0.0  # the longest time between two complete passes
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with connect(str(self.socket_path)) as fx:
            previous = time.monotonic()
            while not self.stop.is_set():
                after = None
                while True:
                    batch = fx.messages(limit=1000, after=after)
                    now = time.monotonic()
                    for message in batch:
                        self.first.setdefault(message.payload, now)
                        self.last[message.payload] = now
                        self.age[message.payload] = message.age
                    if not batch:
                        break
                    after = batch[-1].id
                self.widest_gap = max(self.widest_gap, now - previous)
                previous = now


@chaos_timeout(120, 900)
def test_random_clock_steps_under_load(tmp_path: Path) -> None:
    random = rng("clock steps")
    bursts, burst_size = scale(6, 300), scale(150, 400)
    result = Result("clock steps")
    certs = make_certs(tmp_path / "certs", datetime.timedelta(days=5))
    broker = Broker(certs, tmp_path / "broker").start()
    faketime = FakeTime(tmp_path / "faketime")
    config = chaos_config(broker, tmp_path / "etc", db={"expireSeconds": EXPIRE, "sweepSeconds": SWEEP})
    daemon = Daemon(config, tmp_path / "daemon", env=faketime.env()).start()
    watcher = Watcher(daemon.socket_path)
    published: List[bytes] = []
    steps = 0
    try:
        wait_ready(daemon)
        watcher.thread.start()
        for burst in range(bursts):
            lines = write_lines(tmp_path / f"burst-{burst}", burst_size, start=burst * burst_size)
            published += lines
            publisher = publish_lines(broker, INGRESS_TOPIC, tmp_path / f"burst-{burst}",
                                      client_id=f"pub-{burst}")
            faketime.step_to(random.choice(STEPS) + random.randint(-5, 5))
            steps += 1
            assert publisher.wait(timeout=60) == 0
            pause = time.monotonic() + random.uniform(0.3, 1.2)
            wait_for(lambda: time.monotonic() >= pause, 5, "the pause between bursts")
        faketime.step_to(random.choice(STEPS))
        wanted = set(published)
        wait_for(lambda: set(watcher.first) >= wanted, 30, "every message seen in the inbox")

        def drained() -> bool:
            with connect(str(daemon.socket_path)) as fx:
                status = fx.status()
            return status["inbox"]["count"] == 0 and status["counters"]["expired"] == len(published)
        wait_for(drained, EXPIRE + 30, "every message expired")
    finally:
        watcher.stop.set()
        if watcher.thread.is_alive():
            watcher.thread.join(10)
        daemon.stop()
        broker.close()

    lived = {p: watcher.last[p] - watcher.first[p] for p in published}
    oldest = max(watcher.age[p] for p in published)
    youngest_gone = min(watcher.age[p] for p in published)
    line = str(result.set(messages=len(published), steps=steps, oldest_age_seen=f"{oldest:.2f}s",
                          youngest_last_age=f"{youngest_gone:.2f}s",
                          widest_poll_gap=f"{watcher.widest_gap:.2f}s").emit())
    assert oldest <= EXPIRE + SWEEP + SLACK, f"a message was kept past its expiry: {line}"
    assert max(lived.values()) <= EXPIRE + SWEEP + SLACK, f"a message stayed too long: {line}"
    assert youngest_gone >= EXPIRE - watcher.widest_gap - SLACK, f"a message went early: {line}"
