"""Memory of a running daemon: the PSS of the supervisor, the fork server and the three workers,
from /proc/PID/smaps, idle, under ingest load, and idle again with the messages stored; against
the same number of bare Python interpreters (five) started from the same venv (the floor any
Python design with that many processes pays), measured in the same run.

    .venv/bin/python bench/bench_memory.py [--runs 3] [--messages 100000] [--backlog]
        [--daemon-python /path/to/installed/venv/bin/python] [--plot docs/memory-during-ingest.png]

Each run starts `python -m flashlexd run` (tests/daemon.py) with the production supervisor
defaults against a mutual-TLS mosquitto on loopback (tests/broker.py), waits until it is READY
and both MQTT connections are up, then:
  idle    2 s to settle, then 10 samples 0.2 s apart (median per process);
  load    mosquitto_pub (plain listener, QoS 1, 100 in flight) publishes `--messages` ~200-byte
          messages to the ingress topic, in chunks of 20,000 lines (one `mosquitto_pub -l` loses
          lines past ~50k), as fast as the daemon takes them; samples every 0.1 s until all are
          committed (peak of the per-sample total, and each process's peak);
  stored  2 s after the load, 10 samples (the inbox now holds every message; nobody acks).
With `--backlog` the load is the drain of a backlog instead (a device back online): after the
idle samples the daemon is stopped, the messages are published into its persistent session,
and a new daemon on the same data dir drains them (its processes are the ones sampled from
then on). The broker then holds a deep queue for the ingress worker, which is when its ack
barrier's UNSUBACK comes late (queued behind the backlog) and the most DUP marks wait.
The PSS counted is everything but the file-backed `data.mdb` mapping: that is page cache the
kernel reclaims, and it grows with the stored messages; it is reported apart. PSS splits each
shared page among the processes that map it: the workers are forked from the fork server, so
the interpreter's and the imported modules' pages are shared between the five processes;
`anon` is the private-or-copied part (heap). With `--daemon-python` the daemon is the one
installed in that interpreter's environment (`pip install .`, not editable), run outside the
source tree. Target: total PSS (without data.mdb) <= 40 MB, idle and at the peak.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchlib import (INGRESS_TOPIC, ROOT, Broker, Daemon, daemon_config, make_certs, mb, median,
                      payload_lines, pss, status, verdict, wait_up)
from bench_ingest import wipe_session
from pageclass import PageClasses, classify
from tests.broker import publish_lines

TARGET_MB = 40
CHUNK = 20_000  # lines per mosquitto_pub -l run (<= PUB_LINES_MAX)
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")  # a mapping's first line in /proc/PID/smaps
PROCESSES = ("supervisor", "forkserver", "ingress", "egress", "expiry")
Sample = Dict[str, Dict[str, int]]  # process -> {Pss, Pss_Anon, Rss, data.mdb} (kB)


def memory(pid: int) -> Dict[str, int]:
    """/proc/PID/smaps_rollup's Pss (without the data.mdb mapping), Pss_Anon and Rss, and the
    data.mdb mapping's Pss apart (from /proc/PID/smaps), in kB."""
    rollup = pss(pid)
    data = 0
    in_data = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING.match(line):
            in_data = line.rstrip().endswith("/data.mdb")
        elif in_data and line.startswith("Pss:"):
            data += int(line.split()[1])
    return {"Pss": rollup["Pss"] - data, "Pss_Anon": rollup.get("Pss_Anon", 0), "Rss": rollup["Rss"],
            "data.mdb": data}


def sample(pids: Dict[str, int]) -> Sample:
    return {name: memory(pid) for name, pid in pids.items()}


def publish_in_chunks(broker: Broker, lines: List[Path], client_id: str) -> threading.Thread:
    """Publish each chunk file in turn (mosquitto_pub -l loses lines past ~50k in one run); a
    chunk that fails is reported by the thread's `failed` list."""
    failed: List[str] = []

    def run() -> None:
        for chunk in lines:
            publisher = publish_lines(broker, INGRESS_TOPIC, chunk, client_id=client_id, plain=True)
            if publisher.wait(300) != 0:
                failed.append(f"{chunk.name}: mosquitto_pub exited {publisher.returncode}")
    thread = threading.Thread(target=run, name="publisher", daemon=True)
    thread.failed = failed  # type: ignore[attr-defined]
    thread.start()
    return thread


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


def run_daemon(root: Path, broker: Broker, lines: List[Path], count: int, run: int,
               python: Optional[str], backlog: bool = False) -> Dict[str, object]:
    client_id = f"bench-mem-{run}"
    config = daemon_config(root / client_id, broker, mqtt={"clientId": client_id})
    daemon = Daemon(config, root / client_id, python=python).start()
    try:
        wait_up(daemon)
        pids = dict(supervisor=daemon.pid, **daemon.children(fork_server=True))
        time.sleep(2)
        idle = series(pids, 10, 0.2)
        idle_pages = classify(pids, image="forkserver")
        publisher = publish_in_chunks(broker, lines, f"{client_id}-pub")
        if backlog:
            daemon.stop()
            publisher.join(600)
            daemon = Daemon(config, root / client_id, python=python).start()
            wait_up(daemon, connected=False)
            pids = dict(supervisor=daemon.pid, **daemon.children(fork_server=True))
        started = time.monotonic()
        load: List[Sample] = []
        times: List[float] = []
        while True:
            load.append(sample(pids))
            times.append(time.monotonic() - started)
            found = status(daemon)
            if found and found["inbox"]["count"] >= count:
                break
            if time.monotonic() - started > 600:
                raise AssertionError(f"ingest did not finish in 600 s {publisher.failed}")  # type: ignore[attr-defined]
            time.sleep(0.1)
        rate = count / (time.monotonic() - started)
        publisher.join(60)
        assert not publisher.failed, publisher.failed  # type: ignore[attr-defined]
        time.sleep(2)
        stored = series(pids, 10, 0.2)
        stored_pages = classify(pids, image="forkserver")
        assert set(pids.values()) == {daemon.pid, *daemon.children(fork_server=True).values()}, "a worker was replaced"
        return {"idle": idle, "load": load, "times": times, "stored": stored, "rate": rate,
                "pages": {"idle": idle_pages, "stored": stored_pages}}
    finally:
        daemon.stop()
        wipe_session(broker, client_id)
        wipe_session(broker, f"{client_id}-egress")


# The floor: the daemon's processes made as the daemon makes them (the supervisor's imports and
# preload, a fork server forked from it, three children forked from that), doing nothing.
FLOOR = """
import gc, os, signal
import flashlexd.cli, flashlexd.supervisor
from flashlexd import forkworker
forkworker.preload()

def fork(then):
    pid = os.fork()
    if pid == 0:
        then()
        os._exit(0)
    return pid

def idle():
    gc.freeze()
    signal.pause()

def server():
    print("workers", *(fork(idle) for _ in range(3)), flush=True)
    signal.pause()

print("supervisor", os.getpid(), fork(server), flush=True)
signal.pause()
"""


def run_floor(python: Optional[str]) -> Dict[str, object]:
    """PSS and page classes of the floor's five processes (run from / so that an installed
    daemon's interpreter imports the installed flashlexd, not the checkout)."""
    process = subprocess.Popen([python or sys.executable, "-c", FLOOR], cwd="/", text=True,
                               stdout=subprocess.PIPE, start_new_session=True)
    try:
        pids: Dict[str, int] = {}
        for _ in range(2):
            kind, *numbers = process.stdout.readline().split()  # type: ignore[union-attr]
            found = [int(n) for n in numbers]
            pids.update(dict(zip(PROCESSES[:2], found)) if kind == "supervisor" else
                        dict(zip(PROCESSES[2:], found)))
        time.sleep(1)
        return {"idle": series(pids, 5, 0.2), "pages": classify(pids, image="forkserver")}
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def median_classes(found: List[Optional[Dict[str, PageClasses]]]) -> Optional[Dict[str, PageClasses]]:
    """Per process, the median of each class over the runs; with a "total" entry."""
    if any(f is None for f in found):
        return None
    merged = {name: PageClasses.combined((f[name] for f in found), median)  # type: ignore[index]
              for name in found[0]}  # type: ignore[union-attr]
    merged["total"] = PageClasses.combined(merged.values(), sum)
    return merged


def print_pages(runs: List[Dict[str, object]], floors: List[Dict[str, object]],
                idle: Dict[str, float], stored: Dict[str, float], count: int
                ) -> Optional[Tuple[Dict[str, PageClasses], PageClasses, float]]:
    """The page classes table; returns the daemon's idle classes, the floor's total and the
    floor's PSS here (None without root)."""
    daemon = median_classes([r["pages"]["idle"] for r in runs])  # type: ignore[index]
    after = median_classes([r["pages"]["stored"] for r in runs])  # type: ignore[index]
    floor = median_classes([f["pages"] for f in floors])
    floor_pss = median(per_process_median(f["idle"])["total"] for f in floors)  # type: ignore[arg-type]
    if daemon is None or after is None or floor is None:
        print("\nWhere the memory goes: not measured (reading /proc/PID/pagemap frames needs root).")
        return None
    print("\nWhere the memory goes, from each resident page's physical frame (/proc/PID/pagemap),"
          " median of the runs. *Copied*: private pages at addresses where the fork server (which"
          " holds the image the others were forked from) has a page too: the image, copied by a"
          " write into it (every private page of the fork server counts here); *own*: other"
          " private pages, allocated after the fork;"
          " *shared*: anonymous pages shared between them, split evenly; *file-backed*:"
          " libraries' pages split among the daemon's processes only, as on a device where"
          " nothing else maps them (the kernel's PSS also splits them with this machine's other"
          " processes). The floor: the same five processes made the same way (the supervisor's"
          " imports and `preload`, a fork server, three children of it) doing nothing.\n")
    print("| process | copied | own | shared | file-backed, as if alone | total as if alone | PSS here |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [(name, daemon[name], idle[name]) for name in (*PROCESSES, "total")]
    rows += [(f"total with {count:,} stored", after["total"], stored["total"]),
             ("floor: the same processes doing nothing", floor["total"], floor_pss)]
    for name, classes, here in rows:
        label = f"**{name}**" if name.startswith("total") else name
        print(f"| {label} | {mb(classes.copied)} | {mb(classes.own)} | {mb(classes.shared)} |"
              f" {mb(classes.file)} | {mb(classes.total)} | {mb(here)} |")
    return daemon, floor["total"], floor_pss


def why(pages: Optional[Tuple[Dict[str, PageClasses], PageClasses, float]],
        idle: Dict[str, float], peak: Dict[str, float]) -> str:
    """What the measured page classes say about a missed target."""
    growth = (f" Under load the total grows by {mb(peak['total'] - idle['total'])}, nearly all in the"
              f" ingress worker: the objects of its batches (up to 1,024 messages), LMDB's dirty pages"
              f" (malloc'd, kept by LMDB for reuse) and the pages of the code that only runs under load.")
    if pages is None:
        return ("\nWhy: the code is loaded once and shared, but CPython (3.11 and older) writes a"
                " reference count into every object it touches, so each process copies the pages of"
                " the objects it uses." + growth)
    daemon, floor, floor_pss = pages
    total = daemon["total"]
    return (f"\nWhy: the five processes doing nothing already take {mb(floor_pss)} here"
            f" ({mb(floor.total)} as if alone, {mb(floor.file)} of it libraries' pages). Running,"
            f" they copy {mb(total.copied - floor.copied)} more of the image they share: CPython"
            f" (3.11 and older) writes a reference count into every object it uses, and 3.11 its"
            f" specialisation counters into every code object it runs, so each process copies"
            f" every 4 KB page holding one (the expiry worker, nearly idle,"
            f" {mb(daemon['expiry'].copied)}; the fork server keeps the originals of pages all the"
            f" others copied, {mb(daemon['forkserver'].copied)}). Allocated afresh:"
            f" {mb(total.own - floor.own)}." + growth)


def plot(path: Path, run: Dict[str, object], count: int, label: str) -> None:
    """Total PSS (without data.mdb), each process, and data.mdb apart, over the ingest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, load = run["times"], run["load"]
    fig, axis = plt.subplots(figsize=(10, 5))
    axis.plot(times, [total(s) / 1024 for s in load], color="black", linewidth=1.6,
              label="total PSS, without data.mdb")
    for name in PROCESSES:
        axis.plot(times, [s[name]["Pss"] / 1024 for s in load], linewidth=0.9, label=name)
    axis.plot(times, [total(s, "data.mdb") / 1024 for s in load], color="#999999", linestyle="--",
              label="data.mdb mapping (page cache, apart)")
    axis.axhline(TARGET_MB, color="red", linewidth=0.8, linestyle=":", label=f"target {TARGET_MB} MB")
    axis.set_xlabel("seconds since the publish started")
    axis.set_ylabel("MB")
    axis.set_ylim(0, max(TARGET_MB, max(total(s) for s in load) / 1024) * 1.2)
    axis.set_title(f"flashlexd memory during an ingest of {count:,} QoS 1 messages ({label})", fontsize=11)
    axis.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def install(venv: Path) -> str:
    """A fresh venv of the same base interpreter with the checkout installed, not editable
    (what a user gets: compiled .pyc, no source tree on sys.path); returns its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True, timeout=900,
                   cwd=venv, capture_output=True)
    return str(venv / "bin" / "python")


def run_baseline() -> List[Sample]:
    """As many bare interpreters of the same venv Python as the daemon has processes, alive
    together."""
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
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--daemon-python", help="run the daemon installed with this interpreter")
    parser.add_argument("--installed", action="store_true",
                        help="pip install the checkout (not editable) into a temporary venv and run that")
    parser.add_argument("--plot", type=Path, help="draw the first run's ingest to this PNG")
    parser.add_argument("--backlog", action="store_true",
                        help="the load is the drain of a backlog published while the daemon was stopped")
    args = parser.parse_args()
    runs, baselines, floors = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        if args.installed:
            args.daemon_python = install(root / "venv")
        label = "installed (`pip install .`)" if args.daemon_python else "editable install of the checkout"
        broker = Broker(make_certs(root / "certs"), root / "broker", plain=True).start()
        payloads = payload_lines(root / "all-lines", args.messages)
        lines = []
        for first in range(0, args.messages, CHUNK):
            lines.append(root / f"lines-{first}")
            lines[-1].write_bytes(b"".join(p + b"\n" for p in payloads[first:first + CHUNK]))
        try:
            for run in range(args.runs):
                baselines.append(run_baseline())
                runs.append(run_daemon(root, broker, lines, args.messages, run, args.daemon_python,
                                       args.backlog))
                floors.append(run_floor(args.daemon_python))
        finally:
            broker.close()
    if args.plot:
        plot(args.plot if args.plot.is_absolute() else ROOT / args.plot, runs[0], args.messages, label)

    def across(state: str, reduce, field: str = "Pss") -> Dict[str, float]:
        per_run = [reduce(r[state], field) for r in runs]
        return {name: median(p[name] for p in per_run) for name in per_run[0]}

    idle, peak, stored = across("idle", per_process_median), across("load", per_process_peak), \
        across("stored", per_process_median)
    idle_anon, peak_anon = across("idle", per_process_median, "Pss_Anon"), across("load", per_process_peak, "Pss_Anon")
    idle_rss = across("idle", per_process_median, "Rss")
    data_peak, data_stored = across("load", per_process_peak, "data.mdb"), across("stored", per_process_median, "data.mdb")
    base = median(per_process_median(b)["total"] for b in baselines)
    base_anon = median(per_process_median(b, "Pss_Anon")["total"] for b in baselines)
    rate = median(r["rate"] for r in runs)
    spread = [f"{mb(per_process_median(r['idle'])['total'])} / {mb(per_process_peak(r['load'])['total'])}" for r in runs]
    print(f"Daemon: {label}. PSS from /proc/PID/smaps without the data.mdb mapping, median of"
          f" {args.runs} runs (idle / peak per run: {', '.join(spread)}); load: {args.messages:,} QoS 1"
          f" messages of ~200 bytes at {rate:,.0f} msg/s (median)"
          f"{', drained from a backlog the broker held' if args.backlog else ''}\n")
    print("| process | idle PSS | (anon) | idle RSS | under ingest load, peak PSS | (anon) |"
          f" idle with {args.messages:,} stored | data.mdb mapping, peak / stored (apart) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in (*PROCESSES, "total"):
        label_ = f"**{name}**" if name == "total" else name
        print(f"| {label_} | {mb(idle[name])} | {mb(idle_anon[name])} | {mb(idle_rss[name])} |"
              f" {mb(peak[name])} | {mb(peak_anon[name])} | {mb(stored[name])} |"
              f" {mb(data_peak[name])} / {mb(data_stored[name])} |")
    print(f"| {len(PROCESSES)} bare `python -c 'signal.pause()'` (baseline) | {mb(base)} | {mb(base_anon)} | | | | | |")
    worst = max(idle["total"], peak["total"], stored["total"])
    costs = import_costs()
    print("\nWhat one import costs a fresh interpreter of the same venv (each its own process; the"
          " daemon pays each once, in the supervisor, and shares it with the fork server and the"
          " workers):\n")
    print("| statement | anon PSS | RSS |")
    print("|---|---:|---:|")
    for statement, (anon, rss) in costs.items():
        print(f"| `{statement}` | {mb(anon)} | {mb(rss)} |")
    pages = print_pages(runs, floors, idle, stored, args.messages)
    print(f"\ndaemon / baseline (idle PSS): **{idle['total'] / base:.2f}x**;"
          f" under load: {peak['total'] / base:.2f}x\n")
    print(f"target total PSS (without data.mdb) <= {TARGET_MB} MB: idle {mb(idle['total'])}, peak under"
          f" load {mb(peak['total'])}, with the messages stored {mb(stored['total'])}:"
          f" {verdict(worst <= TARGET_MB * 1024)}")
    if pages is not None:
        print(f"\nCounted as if the daemon ran alone (its libraries' pages split among its own"
              f" processes only): idle {mb(pages[0]['total'].total)}.")
    if worst > TARGET_MB * 1024:
        print(why(pages, idle, peak))
    return 0 if worst <= TARGET_MB * 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
