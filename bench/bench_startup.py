"""Start-up and worker replacement times of the real daemon.

    .venv/bin/python bench/bench_startup.py [--runs 7] [--rounds 3]

Start-up: the time from exec of `.venv/bin/flashlexd run` (taken just before Popen) to READY=1
arriving on a fake NOTIFY_SOCKET (tests/daemon.py's NotifyListener, read in a tight loop so a
datagram is timestamped as it arrives), `--runs` times, each daemon stopped with SIGTERM before
the next starts; the first run creates the store, the others reopen it, as at a reboot. Also
shown: the time until both MQTT connections are up (the workers' `connected to` log lines, ms
timestamps against the wall clock at exec) and until the API's `status` says so (polled every
10 ms). Baseline,
same run: exec of a bare `python -c` of the same venv that sends READY=1 itself (interpreter
start-up plus one datagram, the floor for any Python daemon). Target: READY within 1 s.

Worker replacement: with the daemon up (production supervisor defaults), SIGKILL one worker at a
time, rotating ingress, egress, expiry for `--rounds` rounds, each kill once the worker has run
for more than 10 s (so the restart policy uses its first backoff, 0.1 s, not a doubled one).
Times come from the supervisor's log timestamps (ms): kill -> `NAME died` (reaped) -> `NAME
started` (the fork server forks it after the backoff) -> `NAME ready` (the new worker's first report, sent
when its store and client are set up, just before its first heartbeat). For ingress and egress
also the time until the new worker's MQTT connection is up (its `connected to` log line).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchlib import (Broker, Daemon, NotifyListener, cpu_seconds, daemon_config, make_certs,
                      median, ms, status, verdict, wait_for, wait_up)
from bench_ingest import wipe_session

TARGET_READY = 1.0
STABLE_AFTER = 10.0  # flashlexd.restart.STABLE_AFTER: a worker up this long gets the first backoff
BASELINE = ("import os, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM);"
            " s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def wait_ready(listener: NotifyListener, proc: subprocess.Popen, timeout: float = 30) -> float:
    """Monotonic time READY=1 arrived. recv blocks (timeout 0.05 s), so the datagram is
    timestamped as soon as it arrives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for when, field in listener.lines():
            if field == "READY=1":
                return when
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before READY=1")
    raise AssertionError("no READY=1")


def notify_env(path: Path) -> Dict[str, str]:
    env = dict(os.environ, NOTIFY_SOCKET=str(path))
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID"):
        env.pop(name, None)
    return env


def time_baseline(root: Path, run: int) -> float:
    listener = NotifyListener(root / f"notify-base-{run}")
    try:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", BASELINE], env=notify_env(listener.path))
        ready = wait_ready(listener, proc)
        proc.wait(10)
        return ready - started
    finally:
        listener.close()


def time_startup(root: Path, config: Path, client_id: str, run: int) -> Dict[str, float]:
    listener = NotifyListener(root / f"notify-{run}")
    sock = root / "startup" / "flashlexd.sock"
    log_path = root / "startup" / f"daemon-{run}.log"
    flashlexd = Path(sys.executable).parent / "flashlexd"
    daemon = Daemon(config, sock.parent)  # only for its socket path (status)
    with open(log_path, "wb") as log:
        wall, started = time.time(), time.monotonic()
        proc = subprocess.Popen([str(flashlexd), "run", "--config", str(config), "--socket", str(sock)],
                                env=notify_env(listener.path), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        ready = wait_ready(listener, proc)
        cpu = daemon_cpu(proc.pid)
        wait_for(lambda: (lambda s: s and all(s["mqtt"].get(n, {}).get("connected")
                                              for n in ("ingress", "egress")))(status(daemon)),
                 30, "both MQTT connections up in status", interval=0.01)
        in_status = time.monotonic()
        times = [wait_for(lambda: log_time(log_path.read_text(), wall, connected_line(cid)), 10,
                          f"{cid} connected") for cid in (client_id, f"{client_id}-egress")]
    finally:
        listener.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return {"ready": ready - started, "connected": max(times) - wall, "status": in_status - started,
            "cpu": cpu}


def daemon_cpu(pid: int) -> float:
    """CPU seconds used so far by the supervisor `pid` and its live children."""
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    total += cpu_seconds(int(entry.name))
            except (OSError, ValueError):
                pass
    return total


def log_time(text: str, since: float, needle: str, at_end: bool = False) -> Optional[float]:
    """Wall-clock time of the first log line at or after `since` containing `needle` (or, with
    `at_end`, ending with it)."""
    for line in text.splitlines():
        match = LOG_TIME.match(line)
        if not match or not (line.endswith(needle) if at_end else needle in line):
            continue
        when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if when >= since - 0.001:  # the log has ms resolution
            return when
    return None


def connected_line(client_id: str) -> str:
    return f" as '{client_id}' with MQTT "  # mqtt.py: "connected to H:P as 'ID' with MQTT 5 (session present: ...)"


def worker(daemon: Daemon, name: str) -> Optional[Dict]:
    found = status(daemon)
    return next((w for w in found["workers"] if w["name"] == name), None) if found else None


def time_replacements(root: Path, broker: Broker, rounds: int) -> List[Dict[str, float]]:
    client_id = "bench-restart"
    config = daemon_config(root / client_id, broker, mqtt={"clientId": client_id})
    daemon = Daemon(config, root / client_id).start()
    mqtt_ids = {"ingress": client_id, "egress": f"{client_id}-egress"}
    samples = []
    try:
        wait_up(daemon)
        for _ in range(rounds):
            for name in ("ingress", "egress", "expiry"):
                wait_for(lambda: ((worker(daemon, name) or {}).get("uptime") or 0) > STABLE_AFTER + 0.5,
                         30, f"{name} up for {STABLE_AFTER}s", interval=0.2)
                old = worker(daemon, name)["pid"]
                wall = time.time()
                os.kill(old, signal.SIGKILL)
                wait_for(lambda: (lambda w: w and w["pid"] not in (None, old) and w["state"] == "ready")(
                    worker(daemon, name)), 30, f"new {name} ready", interval=0.02)
                needles = {"died": (f"{name} died (", False), "started": (f"{name} started (pid", False),
                           "ready": (f"{name} ready", True)}
                if name in mqtt_ids:
                    needles["connected"] = (connected_line(mqtt_ids[name]), False)
                events = wait_for(lambda: (lambda e: e if None not in e.values() else None)(
                    {event: log_time(daemon.output(), wall, needle, at_end)
                     for event, (needle, at_end) in needles.items()}), 10, f"{name} log lines")
                samples.append({"name": name, "detect": events["died"] - wall,
                                "backoff": events["started"] - events["died"],
                                "setup": events["ready"] - events["started"],
                                "total": events["ready"] - wall,
                                "connected": events["connected"] - wall if "connected" in events else None})
    finally:
        daemon.stop()
        for mqtt_id in mqtt_ids.values():
            wipe_session(broker, mqtt_id)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp)
        broker = Broker(make_certs(root / "certs"), root / "broker").start()
        try:
            config = daemon_config(root / "startup", broker, mqtt={"clientId": "bench-startup"})
            starts, bases = [], []
            for run in range(args.runs):
                bases.append(time_baseline(root, run))
                starts.append(time_startup(root, config, "bench-startup", run))
            wipe_session(broker, "bench-startup")
            wipe_session(broker, "bench-startup-egress")
            replacements = time_replacements(root, broker, args.rounds)
        finally:
            broker.close()

    ready = [s["ready"] for s in starts]
    base = median(bases)
    print(f"Start-up: exec of `flashlexd run` to READY=1 on NOTIFY_SOCKET, median of {args.runs} runs"
          " (run 1 creates the store, the others reopen it)\n")
    print("| | median | min | max | each run | vs baseline |")
    print("|---|---:|---:|---:|---|---:|")
    print(f"| `flashlexd run` -> READY=1 | {ms(median(ready))} | {ms(min(ready))} | {ms(max(ready))} |"
          f" {', '.join(f'{r * 1000:.0f}' for r in ready)} | {median(ready) / base:.1f}x |")
    for key, label in (("connected", "both MQTT connections up (workers' log)"),
                       ("status", "both shown connected by the API's `status`")):
        values = [s[key] for s in starts]
        print(f"| `flashlexd run` -> {label} | {ms(median(values))} | {ms(min(values))} |"
              f" {ms(max(values))} | {', '.join(f'{r * 1000:.0f}' for r in values)} |"
              f" {median(values) / base:.1f}x |")
    print(f"| bare `python -c` sending READY=1 (baseline) | {ms(base)} | {ms(min(bases))} | {ms(max(bases))} |"
          f" {', '.join(f'{r * 1000:.0f}' for r in bases)} | 1.0x |")
    cpu = median(s["cpu"] for s in starts)
    print(f"\nCPU time used by the supervisor and its three workers until READY=1: {ms(cpu)} (median),"
          f" on {os.cpu_count()} CPUs: {cpu / median(ready) / os.cpu_count():.0%} of the machine over that"
          f" time; load average {os.getloadavg()[0]:.2f}.")
    print(f"\ntarget READY=1 <= {TARGET_READY * 1000:.0f} ms: median {ms(median(ready))},"
          f" slowest {ms(max(ready))}: {verdict(median(ready) <= TARGET_READY)}")

    lag = median(s["status"] - s["ready"] for s in starts) - median(s["connected"] - s["ready"] for s in starts)
    if lag > 0.5:
        print(f"\nThe API's `status` shows the connections up {ms(lag)} (median) after the workers"
              " log them: each worker's first heartbeat carries `connected: False` in its counters"
              " (sent before the CONNACK), and `status` lets the heartbeat counters override the"
              " worker's `mqtt` report until the next heartbeat (every 1 s by default).")
    print(f"\nWorker replacement after SIGKILL, {len(replacements)} kills ({args.rounds} per worker),"
          " medians; from the supervisor's log timestamps\n")
    print("| worker | kills | kill -> reaped | backoff | fork -> ready | **kill -> new worker ready** |"
          " kill -> MQTT connected again |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("ingress", "egress", "expiry", "all"):
        rows = [s for s in replacements if name in ("all", s["name"])]
        conn = [s["connected"] for s in rows if s["connected"] is not None]
        print(f"| {name} | {len(rows)} | {ms(median(s['detect'] for s in rows))} |"
              f" {ms(median(s['backoff'] for s in rows))} | {ms(median(s['setup'] for s in rows))} |"
              f" **{ms(median(s['total'] for s in rows))}** | {ms(median(conn)) if conn else '-'} |")
    setup = median(s["setup"] for s in replacements)
    print(f"\nfork -> ready vs the bare interpreter baseline above: {setup / base:.1f}x;"
          f" slowest replacement {ms(max(s['total'] for s in replacements))}")
    return 0 if median(ready) <= TARGET_READY else 1


if __name__ == "__main__":
    sys.exit(main())
