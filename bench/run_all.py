"""Run every benchmark and write docs/BENCHMARKS.md (`make bench`).

    .venv/bin/python bench/run_all.py [--out docs/BENCHMARKS.md] [--only NAME ...] [--quick]

Each benchmark runs as its own process, exactly as the command shown in its section (the
benchmarks print markdown); this script only adds the machine, the versions, a summary of the
targets and what each section measures. bench_rpc.py, which measures one run per call, is run
several times and its tables are merged cell by cell (medians). A benchmark that fails is
reported as failed, with the end of its error output; a target that is missed is reported as
missed. `--quick` runs fewer and smaller rounds (a smoke test of this script, not for the
document).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
PY = ".venv/bin/python"
TIMEOUT = 1200  # seconds, per benchmark process, unless its section says more
RPC_REPEATS = 5


@dataclass
class Section:
    name: str
    title: str
    argv: List[str]
    quick: List[str]
    what: str
    notes: str = ""
    repeat: int = 1
    timeout: int = TIMEOUT  # seconds for each of its processes
    output: str = ""
    error: str = ""
    code: Optional[int] = None
    seconds: float = 0.0
    summary: List[Tuple[str, str, str]] = field(default_factory=list)  # (figure, target, verdict)

    def command(self, quick: bool) -> List[str]:
        return [PY, self.argv[0], *(self.quick if quick else self.argv[1:])]

    @property
    def failed(self) -> bool:
        return "Traceback" in self.error or "|" not in self.output


SECTIONS = [
    Section(
        "store", "Store: group-commit append vs raw lmdb puts",
        ["bench/bench_store.py", "--runs", "7"], ["--runs", "1"],
        "`Store.append` of ~200-byte messages, one durable transaction (one commit, fsync) per batch,"
        " configured like the seed config (expiry index, DUP index, counters), against raw LMDB puts"
        " of the same payloads with the same durability, in fresh directories of the same"
        " filesystem; store and raw alternate run by run. Baseline: the raw LMDB puts. Target: at"
        " batch 100, store/raw >= 0.70.",
        "The store writes more pages per commit than the raw puts (the DUP index, the expiry index and"
        " the counters), so it stays well below 1.0x; on this shared machine the batch-100 ratio moves"
        " by several hundredths from run to run."),
    Section(
        "rpc", "Local API: round trip vs a bare msgpack echo, fetch+ack throughput",
        ["bench/bench_rpc.py"], ["--rounds", "300", "--messages", "5000"],
        "Round trips of `flashlexd.client` calls to the daemon's `RpcServer` (hosted the way the"
        " supervisor hosts it, on a 50,000-message store) against the same client talking to a bare"
        " msgpack echo server (frame in, unpack, pack, frame out), interleaved call by call, all"
        " pinned to one CPU; then draining the store with `messages(limit=100)` + `ack(ids)`."
        " Baseline: the echo round trip. Targets: `status` and `messages(limit=1)` within 2x of the"
        f" echo; fetch+ack >= 50,000 messages/s. `make bench` runs it {RPC_REPEATS} times; every"
        " number below is the median of those runs, cell by cell.",
        repeat=RPC_REPEATS),
    Section(
        "consumers", "Named consumers: fetch+ack with 1 and 5 consumers, state per consumer",
        ["bench/bench_consumers.py", "--messages", "20000", "--runs", "5"], ["--messages", "3000", "--runs", "1"],
        "The API server hosted as for the RPC benchmark (one CPU), a fresh store of 20,000 messages"
        " per run, drained with `messages(limit=100)` + `ack(ids)` by the unnamed default consumer,"
        " by one named consumer, and by five named consumers round-robin (each reads and acks every"
        " message). Rate per consumer: messages each consumer fetched and acked per CPU second of"
        " the server and client (wall time shown too). Then the bytes of the consumer databases after five consumers acked half the"
        " messages in order, or every other one. Baseline: one named consumer. Target: five"
        " consumers >= 0.7x its rate, per consumer."),
    Section(
        "ingest", "MQTT ingest: ingress worker vs a bare paho subscriber (MQTT 5)",
        ["bench/bench_ingest.py", "--messages", "30000", "--runs", "5"], ["--messages", "3000", "--runs", "1"],
        "The real ingress worker (durable group commits, PUBACK only after the commit) receiving QoS 1"
        " messages over mutual TLS from mosquitto on loopback, against a bare paho subscriber (paho's"
        " own loop, auto-ack, nothing stored) fed by the same publisher; the sides alternate run by"
        " run. Baseline: the bare paho subscriber. Target: worker >= 0.9x bare.",
        "The baseline uses paho's own loop (`loop_forever`); the worker drives paho's socket from its"
        " own select loop and batches its store work, which is why it can beat the baseline."),
    Section(
        "backlog", "MQTT ingest of a backlog: ingress worker vs bare paho vs mosquitto_sub (MQTT 5)",
        ["bench/bench_ingest.py", "--backlog", "--messages", "50000", "--runs", "3"],
        ["--backlog", "--messages", "3000", "--runs", "1"],
        "A backlog of 50,000 QoS 1 messages held by mosquitto for each side's offline persistent"
        " session, drained over mutual TLS by the real ingress worker, by a bare paho subscriber"
        " (paho's own loop, auto-ack) and by `mosquitto_sub` (C, the anchor), from each side's first"
        " message to its last. Baseline: bare paho. Targets: worker >= 1.2x bare paho, ingress CPU"
        " per message <= 0.8x bare paho; the worker's rate as a fraction of mosquitto_sub's."),
    Section(
        "drain", "MQTT drain: egress worker vs a bare paho publisher (MQTT 5)",
        ["bench/bench_drain.py", "--runs", "5"], ["--entries", "3000", "--runs", "1"],
        "The real egress worker draining a 50,000-entry outbox to mosquitto over mutual TLS (oldest"
        " first, 100 in flight, an entry deleted only after its PUBACK), against a bare paho QoS 1"
        " publisher with the same window that reads and deletes nothing. Baseline: the bare paho"
        " publisher. Target: worker >= 0.8x bare.",
        "As for ingest, the baseline uses paho's own loop and queue; the worker batches its deletes"
        " (one transaction per loop pass)."),
    *(Section(f"{name}311", f"MQTT {name} under MQTT 3.1.1 (`protocol: 3.1.1`)",
              [f"bench/bench_{name}.py", *size, "--runs", "5", "--protocol", "3.1.1"],
              [*quick, "--runs", "1", "--protocol", "3.1.1"],
              f"As \"MQTT {name}\" (which runs MQTT 5, the default), with both sides on MQTT 3.1.1, the"
              f" protocol `auto` falls back to. Baseline: the bare paho {side} on 3.1.1. Target: worker"
              f" >= {target}x bare.")
      for name, size, quick, side, target in (
          ("ingest", ["--messages", "30000"], ["--messages", "3000"], "subscriber", 0.9),
          ("drain", [], ["--entries", "3000"], "publisher", 0.8))),
    Section(
        "quota", "MQTT drain under AWS IoT Core's publish quota, with poison entries, and a frozen broker noticed",
        ["bench/bench_egress_quota.py", "--entries", "3000", "--runs", "3"], ["--entries", "300", "--runs", "1"],
        "The real egress worker draining ~200-byte entries through tests/quota_proxy.py (a TLS"
        " proxy in front of mosquitto that drops PUBLISHes past 100/s per connection without a"
        " PUBACK, as AWS IoT Core does): with the default limits (100/s, 512 KiB/s), unlimited with"
        " the quota only counted, and unlimited with the quota enforced (stopped after 15 s: the"
        " stall). Then an unlimited drain to a mosquitto with max_packet_size, with and without 3"
        " oversize (poison) entries among the good ones. Then mosquitto SIGSTOPped under a draining egress link and an idle ingress link"
        " (keepAliveSeconds 5, mqttOperationTimeout 120), timed until the worker reports the link"
        " down. Baseline: unlimited on mosquitto. Targets: the AWS profile drains everything with 0"
        " publishes over the quota; a frozen broker is noticed within 1.5 x keepalive.",
        "The unlimited drain is far faster but sends most of its publishes over the quota: on AWS IoT"
        " Core they are dropped, and the third row shows what follows (a window waiting for PUBACKs"
        " until the operation timeout)."),
    Section(
        "memory", "Memory: PSS of the supervisor, the fork server and the three workers (installed)",
        ["bench/bench_memory.py", "--runs", "3", "--installed", "--plot", "docs/memory-during-ingest.png"],
        ["--runs", "1", "--messages", "3000", "--installed"],
        "The proportional set size of each process of a running daemon installed with `pip install .`"
        " into a fresh venv (not editable), idle, under the ingest of 100,000 messages (peak, sampled"
        " every 100 ms) and idle again with the messages stored; the file-backed `data.mdb` mapping"
        " (page cache, growing with the stored messages) is left out of the totals and shown apart."
        " Baseline: five bare interpreters of the same venv alive together, as many as the"
        " daemon's processes (the floor of any such Python design). Target: total PSS <= 40 MB"
        " idle and at the peak."
        " ![total PSS during the ingest](memory-during-ingest.png)"),
    Section(
        "memory-editable", "Memory: the same, editable install of the checkout",
        ["bench/bench_memory.py", "--runs", "3"], ["--runs", "1", "--messages", "3000"],
        "As above, with the daemon of the development venv (`pip install -e`)."),
    Section(
        "scan", "API calls with a topic filter at 10k / 100k / 500k stored",
        ["bench/bench_scan.py"], ["--sizes", "2000", "10000", "--rounds", "5"],
        "Round trips of API calls on stores of 10,000, 100,000 and 500,000 messages whose topic"
        " filter matches only the last one, served by `RpcServer` hosted the way the supervisor hosts"
        " it: each `paged` call (what `flashlexd.client` sends) looks at no more than SCAN_BUDGET"
        " records and answers a cursor, so the supervisor's loop is never held longer; the client"
        " follows the cursors to the match. The unpaged call (one call walks the whole inbox, as"
        " every call did before) is shown for comparison. Target: every single call < 5 ms at"
        " 500,000 stored."),
    Section(
        "sweep", "Named consumers' sweep at 100k / 500k stored: steps, commits, bytes written",
        ["bench/bench_sweep.py"], ["--sizes", "5000", "20000"],
        "The supervisor's sweep of named consumers (`Store.consumers_upkeep`), one step a turn of its"
        " loop, on stores of 100,000 and 500,000 ~200-byte messages with three consumers that never"
        " ack: `rare/#` (1 message in 100) with maxBacklog 500, one of every topic, and an idle"
        " dynamic one. The first sweep removes the idle consumer (nothing leaves: the consumer of"
        " every topic holds it all) and trims `rare`; a later sweep only counts. Each step timed;"
        " commits and bytes written measured around the sweep: those sent to the device under the"
        " store (a fresh ext4 on a loop device, as root) and write_bytes of /proc/self/io, which"
        " counts whole page-cache folios on this kernel. No target: each step is one turn of"
        " the loop's work, and the commits and bytes are SD-card wear."),
    Section(
        "startup", "Start-up to READY=1, and replacing a SIGKILLed worker",
        ["bench/bench_startup.py", "--runs", "7", "--rounds", "3"], ["--runs", "2", "--rounds", "1"],
        "The time from exec of `flashlexd run` to READY=1 on a fake NOTIFY_SOCKET, and the time from"
        " SIGKILL of one worker to its replacement's `ready` report (from the supervisor's log"
        " timestamps: reaped, backoff, fork (from the fork server), ready). Baseline: exec of a bare `python -c` of the"
        " same venv that sends READY=1 itself. Target: READY within 1 s."),
    Section(
        "sdk", "FlashLex SDK 1.4 (flashlexiot 0.9.16) side by side",
        ["bench/bench_sdk_compare.py", "--messages", "10000", "--runs", "3"],
        ["--messages", "500", "--runs", "1", "--budget", "3"],
        "The old SDK's store calls (`setMessageToStore`, `getSubscribedMessages`,"
        " `removeMessageFromStore`, installed from PyPI into a throw-away venv and driven by a script"
        " run with that venv's Python) against flashlexd's path on the same 10,000 messages:"
        " `Store.append` on a running daemon's store for storing (the call ingress makes), and the"
        " compatibility class `flashlexd.client.compat.FlashlexSDK` over the daemon's API for reading"
        " and removing. Baseline: the SDK. No target."),
    Section(
        "wear", "Bytes written per message (SD-card wear)",
        ["bench/bench_wear.py", "--seconds", "20", "--runs", "2", "--min-messages", "100"],
        ["--seconds", "4", "--rates", "10"],
        "~200-byte messages published at a steady 1, 10 and 50 msg/s into a fresh `flashlexd run`"
        " (TLS mosquitto on loopback), taken by an app with `wait()` and acked one by one or 100 per"
        " call; bytes written (`write_bytes - cancelled_write_bytes` of /proc/PID/io, all daemon"
        " processes) per message, and the bytes sent to the device under the stores (a fresh ext4 on a"
        " loop device, as root). Side by side in one run: the daemon before issue 20 (checked out"
        " of git history), this code with its defaults and with the SD-card setting (ingestCommitMs"
        " 2000, ingestCommitBatch 16), and the old SDK's pickleDB store doing the same at the same rate."
        " Baseline: the daemon before issue 20. Targets (issue 20), 10 msg/s, acks one by one:"
        " <= 12 KiB a message with the defaults, <= 4 KiB with the SD-card setting.",
        "An app acking one message per call writes one 512-byte sector of the ack journal per ack;"
        " the journaled acks are applied in batches. See docs/WEAR.md.",
        timeout=2700),  # 2 runs x 3 rates x 2 ack modes x 4 stores, 23-103 s each: ~30 min
    Section(
        "kills", "Ingest while workers are SIGKILLed",
        ["bench/bench_killplot.py", "--messages", "30000", "--rate", "3000", "--runs", "3"],
        ["--messages", "3000", "--runs", "1", "--plot", str(Path(tempfile.gettempdir()) / "ingest-during-kills.png")],
        "30,000 QoS 1 messages published at a steady 3,000/s into a running daemon while a random"
        " live worker is SIGKILLed every 0.5 s, the inbox count sampled every 100 ms; every stored"
        " payload is read back at the end to count losses and duplicates. Baseline: the same publish"
        " without kills, in the same run. Target: nothing lost, nothing stored twice."),
]


# -- machine and versions ------------------------------------------------------------------------

def run_text(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
        return (done.stdout + done.stderr).strip()
    except Exception as exc:  # a missing tool is reported, not fatal
        return f"? ({exc})"


def machine() -> List[Tuple[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
    virtual = " (virtual machine)" if re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.M) else ""
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    tmp = tempfile.gettempdir()
    df = run_text(["df", "-T", tmp]).splitlines()
    fs = df[1].split() if len(df) > 1 else ["?", "?"]
    load = os.getloadavg()
    return [
        ("CPU", f"{model}, {os.cpu_count()} cores{virtual}"),
        ("RAM", f"{mem_kb / 1024 / 1024:.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("data dirs", f"{tmp} on {fs[1]} ({fs[0]}); every store and broker dir is a temp dir there"),
        ("load average before the run", f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min)"),
    ]


def versions() -> List[Tuple[str, str]]:
    probe = ("import platform, ssl, lmdb, msgpack, paho.mqtt, flashlexd\n"
             "try:\n import matplotlib; mpl = matplotlib.__version__\n"
             "except ImportError:\n mpl = 'not installed'\n"
             "print(platform.python_version(), flashlexd.__version__, paho.mqtt.__version__, lmdb.__version__,"
             " '.'.join(map(str, lmdb.version())), '.'.join(map(str, msgpack.version)), mpl, sep='|')\n"
             "print(ssl.OPENSSL_VERSION)")
    lines = run_text([str(ROOT / PY), "-c", probe]).splitlines()
    py, fx, paho, pylmdb, liblmdb, mp, mpl = lines[0].split("|")
    mosquitto = run_text(["mosquitto", "-h"]).splitlines()[0]
    sha = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return [
        ("Python", py), ("flashlexd", f"{fx} (git {sha}{', with uncommitted changes' if dirty else ''})"),
        ("paho-mqtt", paho), ("lmdb", f"py-lmdb {pylmdb}, LMDB {liblmdb}"), ("msgpack", mp),
        ("mosquitto", mosquitto.replace("mosquitto version ", "")), ("OpenSSL (Python's)", lines[1]),
        ("matplotlib", mpl),
    ]


# -- running ---------------------------------------------------------------------------------------

NUMBER = re.compile(r"^(?P<pre>.*?)(?P<num>-?\d[\d,]*(?:\.\d+)?)(?P<post>[^\d]*)$")


def merge_cell(cells: List[str]) -> str:
    """The median of the same cell over several runs, in the first run's format."""
    matches = [NUMBER.match(c.strip()) for c in cells]
    if not all(matches) or len({(m.group("pre"), m.group("post")) for m in matches}) != 1:
        return cells[0]
    first = matches[0].group("num")
    value = statistics.median(float(m.group("num").replace(",", "")) for m in matches)
    decimals = len(first.split(".")[1]) if "." in first else 0
    commas = any("," in m.group("num") for m in matches)
    text = f"{value:,.{decimals}f}" if commas else f"{value:.{decimals}f}"
    return f" {matches[0].group('pre')}{text}{matches[0].group('post')} "


def merge_outputs(outputs: List[str]) -> str:
    """Tables of several runs of one benchmark, merged cell by cell (medians)."""
    split = [o.strip().splitlines() for o in outputs]
    if len({len(lines) for lines in split}) != 1:
        return outputs[0].strip()
    merged = []
    for rows in zip(*split):
        if rows[0].startswith("|") and not set(rows[0]) <= set("|-: "):
            cells = [r.strip().strip("|").split("|") for r in rows]
            if len({len(c) for c in cells}) == 1:
                merged.append("|" + "|".join(merge_cell(list(col)) for col in zip(*cells)) + "|")
                continue
        merged.append(rows[0])
    return "\n".join(merged)


def run(section: Section, quick: bool) -> None:
    print(f"== {section.name}: {' '.join(section.command(quick))}", file=sys.stderr, flush=True)
    started = time.monotonic()
    outputs, errors = [], []
    for _ in range(1 if quick else section.repeat):
        try:
            done = subprocess.run(section.command(quick), cwd=ROOT, capture_output=True, text=True,
                                  timeout=section.timeout)
            outputs.append(done.stdout)
            errors.append(done.stderr)
            section.code = done.returncode if section.code in (None, 0) else section.code
        except subprocess.TimeoutExpired as exc:
            outputs.append(exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
            errors.append(f"Traceback: timed out after {section.timeout} s")
            section.code = -1
            break
    section.seconds = time.monotonic() - started
    good = [o for o, e in zip(outputs, errors) if "Traceback" not in e and "|" in o]
    section.output = merge_outputs(good) if len(good) > 1 else (good[0] if good else "\n".join(outputs)).strip()
    section.error = "" if good else "\n".join(errors)
    print(section.output, file=sys.stderr)
    print(f"== {section.name}: {section.seconds:.0f} s, exit code {section.code}", file=sys.stderr, flush=True)


# -- the summary -----------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def find(pattern: str, text: str) -> Optional[re.Match]:
    return re.search(pattern, text, re.M)


def summarize(section: Section) -> None:
    out = section.output
    add = section.summary.append
    if section.failed:
        add(("benchmark failed (see its section)", "", "**failed**"))
        return
    if section.name == "store":
        m = find(r"batch 100: store/raw = ([\d.]+) \(target >= ([\d.]+)\): (\w+)", out)
        if m:  # the benchmark's own verdict: it compares before rounding
            add((f"append at batch 100: {m.group(1)}x raw lmdb", f">= {m.group(2)}x",
                 verdict(m.group(3) == "ok") + (" (below the target before rounding)"
                                                if m.group(3) != "ok" and m.group(1) == m.group(2) else "")))
    elif section.name == "rpc":
        for call in ("status", "messages(limit=1)"):
            m = find(rf"^\| `{re.escape(call)}` \| ([\d.,]+ µs) \|.*\| ([\d.]+)x \|$", out)
            if m:
                add((f"`{call}` round trip {m.group(1)}: {m.group(2)}x the echo", "<= 2x",
                     verdict(float(m.group(2)) <= 2)))
        m = find(r"`status` vs the bare loop answering the same ([\d,]+) bytes: ([\d.]+)x", out)
        if m:  # the answer's size apart: the daemon's own work
            add((f"`status` vs a bare loop answering the same {m.group(1)} bytes: {m.group(2)}x", "-", "-"))
        m = find(r"^\| `messages\(limit=100\)` \+ `ack\(ids\)` \|.*\| ([\d,]+) \|$", out)
        if m:
            add((f"fetch+ack: {m.group(1)} messages/s", ">= 50,000/s",
                 verdict(float(m.group(1).replace(",", "")) >= 50_000)))
    elif section.name == "consumers":
        m = find(r"per consumer \(median of per-run ratios, CPU time\): \*\*([\d.]+)x\*\*.*target >= ([\d.]+)x\): (\w+)", out)
        if m:
            add((f"5 consumers: {m.group(1)}x the single consumer's fetch+ack rate, per consumer",
                 f">= {m.group(2)}x", verdict(m.group(3) == "ok")))
    elif section.name in ("ingest", "drain", "ingest311", "drain311", "backlog"):
        m = find(r"ratio \(median of per-run ratios\): \*\*([\d.]+)x\*\*.*\(target >= ([\d.]+)x\)", out)
        rates = re.findall(r"^\| (.+?) \| ([\d,]+) \|", out, re.M)
        if m:
            what = "ingress worker" if section.name.startswith(("ingest", "backlog")) else "egress worker"
            what += " (MQTT 3.1.1)" if section.name.endswith("311") else " (MQTT 5)"
            rate = f" ({rates[0][1]} msg/s)" if rates else ""
            value, target = float(m.group(1)), float(m.group(2))
            add((f"{what}{rate}: {m.group(1)}x bare paho", f">= {m.group(2)}x",
                 "borderline (equal to the target at 2 decimals)" if value == target else verdict(value > target)))
    elif section.name == "quota":
        m = find(r"^\| AWS profile .*? \| ([\d.]+) \| (\d+) \| (\d+) \| (\d+) \|$", out)
        entries = find(r"^### Drain of (\d+) entries", out)
        if m and entries:
            add((f"AWS profile: {m.group(2)} of {entries.group(1)} delivered at {m.group(3)}/s, {m.group(4)}"
                 " over the quota", "all delivered, 0 over", verdict(m.group(2) == entries.group(1)
                                                                   and m.group(4) == "0")))
        poisoned = find(r"^\| (\d+) good \+ ([1-9]\d*) poison \| [\d.]+ \| (\d+) \| (\d+) \| ([\d.]+)x \|$", out)
        if poisoned:
            add((f"{poisoned.group(1)} good + {poisoned.group(2)} poison entries: {poisoned.group(3)}/s,"
                 f" {poisoned.group(4)} dead-lettered, {poisoned.group(5)}x the clean drain",
                 "every poison entry dead-lettered", verdict(poisoned.group(4) == poisoned.group(2))))
        bound = find(r"silence bound ([\d.]+) s", out)
        for link in ("egress link, draining", "ingress link, idle"):
            d = find(rf"^\| {link} \| ([\d.]+) \| ([\d.]+) \|$", out)
            if d and bound:
                add((f"frozen broker noticed on the {link}: {d.group(1)} s (max {d.group(2)} s)",
                     f"<= {bound.group(1)} s", verdict(float(d.group(2)) <= float(bound.group(1)) + 0.5)))
    elif section.name in ("memory", "memory-editable"):
        m = find(r"idle (\S+ MB), peak under load (\S+ MB), with the messages stored (\S+ MB): (.*)$", out)
        if m:
            add((f"total PSS: idle {m.group(1)}, peak under ingest load {m.group(2)}", "<= 40 MB",
                 "met" if m.group(4).strip() == "met" else "**missed**"))
    elif section.name == "scan":
        m = find(r"target every single call < 5 ms at (\S+) stored: slowest median (.+?), slowest call (.+?): (.*)$", out)
        if m:
            add((f"slowest single API call at {m.group(1)} stored: median {m.group(2)} (slowest {m.group(3)})",
                 "< 5 ms", "met" if m.group(4).strip() == "met" else "**missed**"))
    elif section.name == "startup":
        m = find(r"target READY=1 <= 1000 ms: median (.+?), slowest (.+?): (.*)$", out)
        if m:
            add((f"exec -> READY=1: {m.group(1)} (slowest {m.group(2)})", "<= 1 s",
                 "met" if m.group(3).strip() == "met" else "**missed**"))
        m = find(r"^\| all \| \d+ \|.*\| \*\*(.+?)\*\* \|", out)
        if m:
            add((f"SIGKILLed worker -> replacement ready: {m.group(1)} (median)", "none", ""))
    elif section.name == "sdk":
        if "SDK side not measured" in out:
            add(("SDK could not be installed or run: flashlexd side only", "none", ""))
        m = find(r"^\| \*\*all three\*\* \|.*\| \*\*([\d,.]+x)\*\* \|$", out)
        n = find(r"^The same ([\d,]+) messages", out)
        if m and n:
            estimated = " (SDK times partly estimated from timed calls, see its section)" if "estimated" in out else ""
            add((f"store + read + remove {n.group(1)} messages one by one: the SDK takes {m.group(1)}"
                 f" flashlexd's time{estimated}", "none", ""))
    elif section.name == "wear":
        for m in re.finditer(r"^target (.+?), 10 msg/s, acks one by one: ([\d.]+) KiB/msg (.+?) \(target <= (\d+) KiB\):"
                             r" (\w+)$", out, re.M):
            add((f"{m.group(1)}: {m.group(2)} KiB written a message {m.group(3)} (store + ack), 10 msg/s,"
                 f" acks one by one", f"<= {m.group(4)} KiB", verdict(m.group(5) == "met")))
    elif section.name == "kills":
        m = find(r"completion time with kills / without .*: \*\*([\d.]+)x\*\*", out)
        ok = find(r"no message lost or stored twice: (.*)$", out)
        if m and ok:
            add((f"all messages stored; completion time {m.group(1)}x that without kills",
                 "nothing lost or duplicated", "met" if ok.group(1).strip() == "met" else "**missed**"))
    if not section.summary:
        add(("see its section", "", ""))


# -- the document ------------------------------------------------------------------------------------

def document(sections: List[Section], started: datetime.datetime, seconds: float, quick: bool,
             facts: List[Tuple[str, str]]) -> str:
    out = ["# Benchmarks", ""]
    out.append(f"Written by `make bench` (`bench/run_all.py`{' --quick' if quick else ''}) on"
               f" {started:%Y-%m-%d %H:%M} UTC; all benchmarks took {seconds / 60:.1f} min. Every"
               " figure was measured on the machine below in this run, each against a baseline"
               " measured in the same run; most are medians of several runs (each section says how"
               " many). Each section says what it"
               " measures and the command that reproduces it alone (from the repository root, after"
               " `make bench` or `pip install -e '.[test,bench]'` has set up `.venv`).")
    if quick:
        out += ["", "**Quick mode: fewer and smaller runs; not the figures to quote.**"]
    out += ["", "## Machine and versions", "", "| | |", "|---|---|"]
    load = os.getloadavg()
    facts = facts + [("load average after the run", f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")]
    out += [f"| {k} | {v} |" for k, v in facts + versions()]
    out += ["", "The machine is a shared virtual machine: other jobs may run beside the benchmarks, so"
            " expect a run-to-run spread of 10-20% in rates and times; the ratios, measured side by side,"
            " move less.", "", "## Summary", "", "| benchmark | result | target | |", "|---|---|---|---|"]
    for section in sections:
        for i, (figure, target, mark) in enumerate(section.summary):
            name = f"[{section.title}](#{anchor(section.title)})" if i == 0 else ""
            out.append(f"| {name} | {figure} | {target} | {mark} |")
    for section in sections:
        out += ["", f"## {section.title}", "", section.what, "", f"`{' '.join(section.command(quick))}`", ""]
        if section.failed:
            tail = "\n".join(section.error.strip().splitlines()[-15:])
            out += [f"**This benchmark failed** (exit code {section.code}); the end of its error output:",
                    "", "```", tail, "```"]
            if section.output.strip():
                out += ["", "Its output:", "", section.output.strip()]
        else:
            out.append(section.output.strip())
            if section.notes:
                out += ["", section.notes]
        out += ["", f"_Took {section.seconds:.0f} s; exit code {section.code}"
                    f"{' (a target was missed)' if section.code and not section.failed else ''}._"]
    return "\n".join(out) + "\n"


HAND_WRITTEN = "<!-- Everything below this line is written by hand and kept as it is by make bench. -->"


def kept_by_hand(out: Path) -> str:
    """The hand-written tail of the current file (figures from the test suite's own runs, such
    as the broker x fault table), from its marker line on; empty if there is none."""
    old = out.read_text() if out.exists() else ""
    at = old.find(HAND_WRITTEN)
    return "\n" + old[at:] if at >= 0 else ""


def anchor(title: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SECTIONS])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not (ROOT / PY).exists():
        print(f"no {PY}: run `make bench` (it creates the venv)", file=sys.stderr)
        return 2
    sections = [s for s in SECTIONS if not args.only or s.name in args.only]
    started = datetime.datetime.now(datetime.timezone.utc)
    facts = machine()
    clock = time.monotonic()
    for section in sections:
        run(section, args.quick)
        summarize(section)
    text = document(sections, started, time.monotonic() - clock, args.quick, facts)
    Path(args.out).write_text(text + kept_by_hand(Path(args.out)))
    print(f"wrote {args.out}", file=sys.stderr)
    failed = [s.name for s in sections if s.failed]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
