"""The ingress on a starved CPU, starved for real: its process in a cgroup with a CFS quota of
a sliver of one core (a Pi Zero busy with other apps)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from flashlexd.client import connect
from tests.broker import INGRESS_TOPIC, publish_lines, wait_for, write_lines
from tests.cpulimit import cpu_share
from tests.daemon import Daemon

BACKLOG = 1100  # over a batch of 1,024: over the heartbeat timeout at this share
PERCENT = 0.5


def test_a_backlog_read_on_a_starved_cpu_is_not_taken_for_a_hung_ingress(daemon_config: Path, tmp_path: Path,
                                                                         broker):
    """Review "slowcpu": at 1 % of a core, a broker's backlog came in batches of 1,024 messages,
    each read and committed in passes that send no heartbeat; one took over
    heartbeatTimeoutSeconds, the ingress was aborted as hung with nothing committed, and its
    replacement got the same backlog (5 restarts in a row, 90 s without ingest). Batches now
    start small and stay within a share of the timeout (workers/batchfit.py). Here at 0.5 % of a
    core, with the tests' 3 s heartbeat timeout."""
    daemon = Daemon(daemon_config, tmp_path).start()
    try:
        ingress = daemon.wait_workers()["ingress"]
        with connect(str(daemon.socket_path), timeout=30) as fx:
            wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 15, "the ingress connected")
            write_lines(tmp_path / "backlog", BACKLOG)
            with cpu_share(f"flashlexd-test-{os.getpid()}-{tmp_path.name}", PERCENT) as share:
                share.add(ingress)
                # the backlog all at the broker before the ingress reads any, as at a reconnect:
                # the ingress stopped meanwhile (for well under the 3 s heartbeat timeout)
                os.kill(ingress, signal.SIGSTOP)
                stopped_at = time.monotonic()
                try:
                    assert publish_lines(broker, INGRESS_TOPIC, tmp_path / "backlog").wait(60) == 0
                    published_in = time.monotonic() - stopped_at
                finally:
                    os.kill(ingress, signal.SIGCONT)
                wait_for(lambda: fx.status()["inbox"]["count"] >= BACKLOG, 180, "the backlog stored")  # ~30-60 s
            assert fx.status()["inbox"]["count"] == BACKLOG  # each once
            assert published_in < 1.5, "stopped too long to tell a false hang from a real one"
        assert "hung" not in daemon.output(), daemon.output()[-3000:]
        assert daemon.children()["ingress"] == ingress
    finally:
        daemon.stop()
