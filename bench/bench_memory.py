"""Memory of a running daemon: the PSS of the supervisor and its three workers, from
/proc/PID/smaps_rollup, idle, under ingest load, and idle again with the messages stored; against
the same number of bare Python interpreters started from the same venv (the floor any
four-process Python design pays), measured in the same run.

    .venv/bin/python bench/bench_memory.py [--runs 3] [--messages 30000]

Each run starts `python -m flashlexd run` (tests/daemon.py) with the production supervisor
defaults against a mutual-TLS mosquitto on loopback (tests/broker.py), waits until it is READY
and both MQTT connections are up, then:
  idle    2 s to settle, then 10 samples 0.2 s apart (median per process);
  load    mosquitto_pub (plain listener, QoS 1, 100 in flight) publishes `--messages` ~200-byte
          messages to the ingress topic as fast as the daemon takes them; samples every 0.1 s
          until all are committed (peak of the per-sample total, and each process's peak);
  stored  2 s after the load, 10 samples (the inbox now holds every message; nobody acks).
The table shows medians over the runs. PSS splits each shared page among the processes that map
it, so the interpreter's and libraries' pages are split with every other process using the
same files (this benchmark's own Python among them); `anon` is the private part (heap), which
no other process changes. Target: total PSS <= 40 MB.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from benchlib import (INGRESS_TOPIC, Broker, Daemon, daemon_config, make_certs, mb, median,
                      payload_lines, pss, status, verdict, wait_up)
from bench_ingest import wipe_session
from tests.broker import publish_lines

TARGET_MB = 40
PROCESSES = ("supervisor", "forkserver", "ingress", "egress", "expiry")
Sample = Dict[str, Dict[str, int]]  # process -> smaps_rollup fields (kB)


def sample(pids: Dict[str, int]) -> Sample:
    return {name: pss(pid) for name, pid in pids.items()}


def total(sample_: Sample, field: str = "Pss") -> int:
    return sum(fields.get(field, 0) for fields in sample_.values())


def series(pids: Dict[str, int], count: int, every: float) -> List[Sample]:
    found = []
    for _ in range(count):
        found.append(sample(pids))
        time.sleep(every)
    return found


def per_process_median(samples: List[Sample], field: str = "Pss") -> Dict[str, float]:
    values = {name: median(s[name].get(field, 0) for s in samples) for name in samples[0]}
    values["total"] = median(total(s, field) for s in samples)
    return values


def per_process_peak(samples: List[Sample], field: str = "Pss") -> Dict[str, float]:
    values = {name: max(s[name].get(field, 0) for s in samples) for name in samples[0]}
    values["total"] = max(total(s, field) for s in samples)
    return values


def run_daemon(root: Path, broker: Broker, lines: Path, count: int, run: int) -> Dict[str, object]:
    client_id = f"bench-mem-{run}"
    config = daemon_config(root / client_id, broker, mqtt={"clientId": client_id})
    daemon = Daemon(config, root / client_id).start()
    try:
        wait_up(daemon)
        pids = dict(supervisor=daemon.pid, **daemon.children(fork_server=True))
        time.sleep(2)
        idle = series(pids, 10, 0.2)
        publisher = publish_lines(broker, INGRESS_TOPIC, lines, client_id=f"{client_id}-pub", plain=True)
        started = time.monotonic()
        load: List[Sample] = []
        while True:
            load.append(sample(pids))
            found = status(daemon)
            if found and found["inbox"]["count"] >= count:
                break
            if time.monotonic() - started > 300:
                raise AssertionError("ingest did not finish in 300 s")
            time.sleep(0.1)
        rate = count / (time.monotonic() - started)
        publisher.wait(30)
        time.sleep(2)
        stored = series(pids, 10, 0.2)
        assert set(pids.values()) == {daemon.pid, *daemon.children(fork_server=True).values()}, "a worker was replaced"
        return {"idle": idle, "load": load, "stored": stored, "rate": rate}
    finally:
        daemon.stop()
        wipe_session(broker, client_id)
        wipe_session(broker, f"{client_id}-egress")


def run_baseline() -> List[Sample]:
    """Four bare interpreters of the same venv Python, alive together."""
    children = [subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
                for _ in PROCESSES]
    try:
        time.sleep(1.0)
        return series({f"python #{i + 1}": c.pid for i, c in enumerate(children)}, 10, 0.1)
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
            child.wait(10)


IMPORTS = ("pass", "import yaml", "import lmdb, msgpack", "import paho.mqtt.client",
           "import flashlexd.config", "import flashlexd.store", "import flashlexd.supervisor",
           "import flashlexd.workers.ingress", "import flashlexd.workers.expiry")
PROBE = ("\nimport re\nt = open('/proc/self/smaps_rollup').read()\n"
         "print(*(re.search(k + r':\\s+(\\d+)', t).group(1) for k in ('Pss_Anon', 'Rss')))")


def import_costs() -> Dict[str, tuple]:
    """Private (anon) PSS and RSS of a fresh interpreter after each import, in kB."""
    costs = {}
    for statement in IMPORTS:
        out = subprocess.run([sys.executable, "-c", statement + PROBE], capture_output=True,
                             text=True, check=True, timeout=60).stdout.split()
        costs[statement] = (int(out[0]), int(out[1]))
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=30_000)
    args = parser.parse_args()
    runs, baselines = [], []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        broker = Broker(make_certs(root / "certs"), root / "broker", plain=True).start()
        lines = root / "lines"
        payload_lines(lines, args.messages)
        try:
            for run in range(args.runs):
                baselines.append(run_baseline())
                runs.append(run_daemon(root, broker, lines, args.messages, run))
        finally:
            broker.close()

    def across(state: str, reduce, field: str = "Pss") -> Dict[str, float]:
        per_run = [reduce(r[state], field) for r in runs]
        return {name: median(p[name] for p in per_run) for name in per_run[0]}

    idle, peak, stored = across("idle", per_process_median), across("load", per_process_peak), \
        across("stored", per_process_median)
    idle_anon, peak_anon = across("idle", per_process_median, "Pss_Anon"), across("load", per_process_peak, "Pss_Anon")
    idle_rss = across("idle", per_process_median, "Rss")
    base = median(per_process_median(b)["total"] for b in baselines)
    base_anon = median(per_process_median(b, "Pss_Anon")["total"] for b in baselines)
    rate = median(r["rate"] for r in runs)
    print(f"PSS from /proc/PID/smaps_rollup, median of {args.runs} runs; load: {args.messages:,} QoS 1"
          f" messages of ~200 bytes at {rate:,.0f} msg/s (median)\n")
    print("| process | idle PSS | (anon) | idle RSS | under ingest load, peak PSS | (anon) |"
          f" idle with {args.messages:,} stored |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in (*PROCESSES, "total"):
        label = f"**{name}**" if name == "total" else name
        print(f"| {label} | {mb(idle[name])} | {mb(idle_anon[name])} | {mb(idle_rss[name])} |"
              f" {mb(peak[name])} | {mb(peak_anon[name])} | {mb(stored[name])} |")
    print(f"| 4 bare `python -c 'signal.pause()'` (baseline) | {mb(base)} | {mb(base_anon)} | | | | |")
    worst = max(idle["total"], peak["total"], stored["total"])
    costs = import_costs()
    print("\nWhere the private memory goes: a fresh interpreter of the same venv after one import"
          " (each its own process):\n")
    print("| statement | anon PSS | RSS |")
    print("|---|---:|---:|")
    for statement, (anon, rss) in costs.items():
        print(f"| `{statement}` | {mb(anon)} | {mb(rss)} |")
    print(f"\ndaemon / baseline (idle PSS): **{idle['total'] / base:.2f}x**;"
          f" under load: {peak['total'] / base:.2f}x\n")
    print(f"target total PSS <= {TARGET_MB} MB: idle {mb(idle['total'])}, peak under load"
          f" {mb(peak['total'])}, with the messages stored {mb(stored['total'])}:"
          f" {verdict(worst <= TARGET_MB * 1024)}")
    if worst > TARGET_MB * 1024:
        paho_in_store = subprocess.run(
            [sys.executable, "-c", "import sys, flashlexd.store; print('paho.mqtt.client' in sys.modules)"],
            capture_output=True, text=True, timeout=60).stdout.strip() == "True"
        bare = costs["pass"][0]
        note = (f"\nWhy: each of the four processes is its own interpreter (fork + exec, so that no"
                f" LMDB environment crosses a fork), and nearly all of the PSS is private (anon):"
                f" every process pays the bare interpreter's {mb(bare)} plus its own imports, about"
                f" {mb(costs['import flashlexd.workers.ingress'][0] - bare)} more for the ingress"
                f" worker's modules and {mb(costs['import flashlexd.supervisor'][0] - bare)} for the"
                f" supervisor's. Under load the total grows by only"
                f" {mb(peak['total'] - idle['total'])}.")
        if paho_in_store:
            note += (f" `flashlexd.store` alone costs {mb(costs['import flashlexd.store'][0] - bare)}"
                     f" because it imports paho-mqtt (for `topic_matches_sub`), which brings in ssl,"
                     f" so the supervisor and the expiry worker, which hold no MQTT connection,"
                     f" carry paho too.")
        print(note)
    return 0 if worst <= TARGET_MB * 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
