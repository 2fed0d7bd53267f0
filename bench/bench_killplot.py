"""Ingest while workers are being killed: a steady QoS 1 publish into a running daemon while a
random live worker is SIGKILLed every 0.5 s, against the same publish without kills, in the same
run; the inbox count is sampled every 100 ms and the run is drawn (docs/ingest-during-kills.png).

    .venv/bin/python bench/bench_killplot.py [--messages 30000] [--rate 3000] [--runs 3]
                                             [--plot docs/ingest-during-kills.png]

Broker: mosquitto on loopback (tests/broker.py); the daemon's ingress uses its mutual-TLS
listener, the publisher (mosquitto_pub -l, QoS 1, 100 in flight) its plain one, fed ~200-byte
JSON lines at `--rate` messages/s (paced in 10 ms steps), so the offered load is the same with
and without kills. The daemon is `flashlexd run` (tests/daemon.py) with the production
supervisor settings except `crashLoopRestarts: 100000` (so it never gives up) and
`restartBackoffMaxSeconds: 1` (the restart backoff doubles from 0.1 s for a worker killed
within 10 s of its start, up to this cap). Kills start when the publish starts and stop when the
last line is written; the victim is chosen with random.Random(run). Every 100 ms the benchmark
reads the inbox count from the store (nobody acks, so it counts the messages committed). At
the end every stored payload is read back: lost = published - distinct, duplicates = stored -
distinct. Medians of `--runs` runs per side; the plot shows the kill run with the median
completion time, with the no-kill run of the same round in grey.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchlib import (INGRESS_TOPIC, ROOT, Broker, Daemon, daemon_config, make_certs, median,
                      payload_lines, verdict, wait_up)
from bench_ingest import wipe_session
from tests.broker import open_store

KILL_EVERY = 0.5
SAMPLE_EVERY = 0.1
SUPERVISOR = {"crashLoopRestarts": 100000, "crashLoopWindowSeconds": 60, "restartBackoffMaxSeconds": 1}
COLORS = {"ingress": "#d62728", "egress": "#ff7f0e", "expiry": "#7f7f7f"}


class PacedPublisher:
    """mosquitto_pub -l fed `lines` at `rate` lines/s from a thread; `.written` counts them."""

    def __init__(self, broker: Broker, client_id: str, lines: List[bytes], rate: float):
        self.lines, self.rate, self.written = lines, rate, 0
        self.started: Optional[float] = None
        self.finished: Optional[float] = None
        self.process = subprocess.Popen(
            ["mosquitto_pub", *broker.client_args(plain=True), "-i", client_id, "-q", "1", "-M", "100",
             "-t", INGRESS_TOPIC, "-l"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        broker.peers.append(self.process)
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def start(self) -> "PacedPublisher":
        self.started = time.monotonic()
        self.thread.start()
        return self

    def _feed(self) -> None:
        assert self.process.stdin is not None and self.started is not None
        step = 0.01
        while self.written < len(self.lines):
            due = min(len(self.lines), int((time.monotonic() - self.started) * self.rate) + 1)
            if due > self.written:
                self.process.stdin.write(b"".join(line + b"\n" for line in self.lines[self.written:due]))
                self.process.stdin.flush()
                self.written = due
            time.sleep(step)
        self.finished = time.monotonic()
        self.process.stdin.close()  # mosquitto_pub exits once every message is acknowledged

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def alive_workers(daemon: Daemon) -> Dict[str, int]:
    return daemon.children()


def run_once(root: Path, broker: Broker, lines: List[bytes], rate: float, kills: bool, run: int
             ) -> Dict[str, Any]:
    client_id = f"bench-kill-{'k' if kills else 'n'}{run}"
    config = daemon_config(root / client_id, broker, supervisor=SUPERVISOR, mqtt={"clientId": client_id})
    daemon = Daemon(config, root / client_id).start()
    rng = random.Random(run)
    count = len(lines)
    try:
        wait_up(daemon)
        store = open_store(config)
        publisher = PacedPublisher(broker, f"{client_id}-pub", lines, rate).start()
        t0 = publisher.started
        assert t0 is not None
        samples: List[Tuple[float, int, int]] = []  # (t, stored, offered)
        killed: List[Tuple[float, str]] = []
        next_kill = t0 + KILL_EVERY
        next_sample = t0
        deadline = t0 + count / rate + 180
        while True:
            now = time.monotonic()
            if now >= next_sample:
                stored = store.inbox_count()
                samples.append((now - t0, stored, publisher.written))
                next_sample += SAMPLE_EVERY
                if stored >= count:
                    break
            if kills and publisher.finished is None and now >= next_kill:
                workers = alive_workers(daemon)
                if workers:
                    name = rng.choice(sorted(workers))
                    try:
                        os.kill(workers[name], signal.SIGKILL)
                        killed.append((time.monotonic() - t0, name))
                    except ProcessLookupError:
                        pass
                next_kill += KILL_EVERY
            if now > deadline:
                raise AssertionError(f"only {samples[-1][1]} of {count} stored after {deadline - t0:.0f}s;"
                                     f" log:\n{daemon.output()[-3000:]}")
            if daemon.proc.poll() is not None:
                raise AssertionError(f"flashlexd exited:\n{daemon.output()[-3000:]}")
            time.sleep(max(0.0, min(next_sample, next_kill if kills else next_sample) - time.monotonic()))
        done = samples[-1][0]
        publisher.close()
        time.sleep(1.0)  # anything redelivered twice would show up now
        payloads, after = [], None
        while True:
            page = store.messages(limit=1000, after=after)
            if not page:
                break
            payloads.extend(m.payload for m in page)
            after = page[-1].id
        store.close()
        distinct = len(set(payloads))
        published_for = (publisher.finished or t0) - t0
        return {"samples": samples, "kills": killed, "done": done, "published_for": published_for,
                "lost": count - len(set(payloads) & set(lines)), "duplicates": len(payloads) - distinct,
                "stall": longest_stall(samples), "restarts": restarts(daemon)}
    finally:
        daemon.stop()
        wipe_session(broker, client_id)
        wipe_session(broker, f"{client_id}-egress")


def longest_stall(samples: List[Tuple[float, int, int]]) -> float:
    """Longest time the stored count did not move while published messages were outstanding."""
    longest, since = 0.0, None
    for (t, stored, offered), previous in zip(samples[1:], samples):
        if stored == previous[1] and offered > stored:
            since = previous[0] if since is None else since
            longest = max(longest, t - since)
        else:
            since = None
    return longest


def restarts(daemon: Daemon) -> int:
    return daemon.output().count(" died (signal SIGKILL)")


def rates(samples: List[Tuple[float, int, int]]) -> Tuple[List[float], List[float], List[float]]:
    times, stored, offered = [], [], []
    for (t, s, o), (pt, ps, po) in zip(samples[1:], samples):
        times.append(t)
        stored.append((s - ps) / (t - pt))
        offered.append((o - po) / (t - pt))
    return times, stored, offered


def plot(path: Path, run: Dict[str, Any], calm: Dict[str, Any], count: int, rate: float, machine: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    t, stored, offered = rates(calm["samples"])
    top.plot(t, stored, color="#bbbbbb", linewidth=1.2, label="ingest rate, no kills (same run)")
    t, stored, offered = rates(run["samples"])
    top.plot(t, offered, color="#1f77b4", linestyle="--", linewidth=1, label="offered (publisher)")
    top.plot(t, stored, color="black", linewidth=1.4, label="ingest rate with kills (committed to the inbox)")
    seen = set()
    for when, name in run["kills"]:
        for axis in (top, bottom):
            axis.axvline(when, color=COLORS[name], linewidth=1 if name == "ingress" else 0.8,
                         linestyle="-" if name == "ingress" else ":", alpha=0.8,
                         label=f"SIGKILL {name}" if axis is top and name not in seen else None)
        seen.add(name)
    top.set_ylabel("messages/s (per 100 ms)")
    top.set_ylim(0, max(max(stored), rate) * 1.5)
    top.legend(loc="upper left", fontsize=8, ncol=3)
    top.set_title(f"flashlexd ingest, {count:,} QoS 1 messages offered at {rate:,.0f}/s,"
                  f" a random worker SIGKILLed every {KILL_EVERY} s", fontsize=11)
    ts = [s[0] for s in run["samples"]]
    bottom.plot(ts, [s[2] for s in run["samples"]], color="#1f77b4", linestyle="--", label="published")
    bottom.plot(ts, [s[1] for s in run["samples"]], color="black", label="stored (inbox count)")
    bottom.plot([s[0] for s in calm["samples"]], [s[1] for s in calm["samples"]], color="#bbbbbb",
                label="stored, no kills")
    bottom.set_ylabel("messages")
    bottom.set_xlabel("seconds since the publish started")
    bottom.legend(loc="lower right", fontsize=8)
    ingress_kills = sum(1 for _, n in run["kills"] if n == "ingress")
    fig.text(0.01, 0.005, f"{len(run['kills'])} kills ({ingress_kills} of ingress); all stored after"
             f" {run['done']:.1f} s (no kills: {calm['done']:.1f} s); lost {run['lost']}, duplicates"
             f" {run['duplicates']}. {machine}", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rate", type=float, default=3000.0, help="offered messages/s")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "ingest-during-kills.png"))
    args = parser.parse_args()
    runs: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-kill-") as tmp:
        root = Path(tmp)
        broker = Broker(make_certs(root / "certs"), root / "broker", plain=True).start()
        lines = payload_lines(root / "lines", args.messages)
        try:
            for run in range(args.runs):
                calm = run_once(root, broker, lines, args.rate, False, run)
                killed = run_once(root, broker, lines, args.rate, True, run)
                runs.append((killed, calm))
        finally:
            broker.close()

    by_done = sorted(runs, key=lambda pair: pair[0]["done"])
    shown, shown_calm = by_done[len(by_done) // 2]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    plot(Path(args.plot), shown, shown_calm, args.messages, args.rate, f"{os.cpu_count()} x {cpu}")

    def med(side: int, key: str) -> float:
        return median(pair[side][key] for pair in runs)

    print(f"{args.messages:,} QoS 1 messages of ~200 bytes offered at {args.rate:,.0f}/s"
          f" (publishing takes {med(0, 'published_for'):.1f} s); with kills: a random live worker"
          f" SIGKILLed every {KILL_EVERY} s while publishing; median of {args.runs} runs per side\n")
    print("| side | all stored after | after the last publish | mean ingest rate | longest stall |"
          " kills (of ingress) | lost | duplicates |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, label in ((1, "no kills (baseline)"), (0, "random worker SIGKILLed every 0.5 s")):
        kills = median(len(pair[side]["kills"]) for pair in runs)
        ingress = median(sum(1 for _, n in pair[side]["kills"] if n == "ingress") for pair in runs)
        print(f"| {label} | {med(side, 'done'):.2f} s | {med(side, 'done') - med(side, 'published_for'):.2f} s |"
              f" {args.messages / med(side, 'done'):,.0f} msg/s | {med(side, 'stall') * 1000:,.0f} ms |"
              f" {kills:.0f} ({ingress:.0f}) | {max(p[side]['lost'] for p in runs)} |"
              f" {max(p[side]['duplicates'] for p in runs)} |")
    ratio = median(k["done"] / c["done"] for k, c in runs)
    print(f"\ncompletion time with kills / without (median of per-round ratios): **{ratio:.2f}x**;"
          f" lost and duplicates are the worst over all runs")
    lost = sum(p[s]["lost"] + p[s]["duplicates"] for p in runs for s in (0, 1))
    print(f"\nno message lost or stored twice: {verdict(lost == 0)}")
    print(f"\n![ingest rate during worker kills]({os.path.relpath(args.plot, ROOT / 'docs')})")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
