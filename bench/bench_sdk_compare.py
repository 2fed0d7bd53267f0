"""The FlashLex SDK 1.4 store (PyPI `flashlexiot` 0.9.16) side by side with flashlexd on the same
messages: store each one, read them all, remove each one.

    .venv/bin/python bench/bench_sdk_compare.py [--messages 10000] [--runs 3] [--budget 40]

The SDK runs in a throw-away venv made in a temp dir (`pip install flashlexiot==0.9.16`, plus the
modules it imports but does not declare: PyYAML, PyJWT<2 and pickledb 0.9.2, the last 0.x
release, whose `load(path, auto_dump, sig=)` it calls), driven by the short script DRIVER below,
run by that venv's Python; none of the SDK's code is in this repository. As its
`PersistentCallbackHandler` does, each message becomes a dict (pk, timestamp, datetime,
message{topic, payload, pos, retain, mid}) passed to `setMessageToStore`; the dicts are built
before the clock starts. `getSubscribedMessages()` prints every message it returns; its stdout
goes to /dev/null.

Every SDK call loads the whole JSON store file and, for writes, dumps it again (twice: pickledb
0.9 dumps once in the caller and once more in a thread), with no fsync. A call therefore costs
time proportional to the number of messages stored, and storing 10,000 one by one takes tens of
minutes. So each SDK write phase runs for `--budget` seconds from its start, then the store is
brought (untimed, with pickledb itself, the SDK's own file format) to the middle of the phase,
then 20 calls are timed there; the same again at the end (the last 20 calls). The calls not
timed are estimated from a straight-line fit of the timed calls' seconds against the store size
at the call (timed at the start, the middle and the end, so the fit interpolates); the table
says how many calls were timed and the fit's R².

flashlexd side, through a running daemon (`flashlexd run` with a TLS mosquitto on loopback):
storing is `Store.append([message])` on the daemon's store, one durable (fsync) commit per
message: the call ingress makes, here at its worst case of one message per commit (there is no
client call that writes to the inbox: messages arrive over MQTT). Reading and removing use
`flashlexd.client.compat.FlashlexSDK`, the drop-in replacement of the SDK class, against the
daemon's socket: `getSubscribedMessages()` (pages of 1,000 over the local API) and
`removeMessageFromStore(message)` for each message (one `ack` call, one durable commit each).
Rows marked "batched" show the same work 100 messages per commit/call. flashlexd's figures are
medians of `--runs` runs; the SDK runs once (its `getSubscribedMessages`: median of 3 calls).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchlib import (INGRESS_TOPIC, Broker, Daemon, daemon_config, make_certs, median,
                      wait_up)
from bench_ingest import wipe_session
from flashlexd.client import Client
from flashlexd.client.compat import FlashlexSDK as CompatSDK
from flashlexd.store import Incoming
from tests.broker import open_store

SDK_REQUIREMENTS = ["flashlexiot==0.9.16", "pickledb==0.9.2", "PyJWT<2", "PyYAML"]
TAIL = 20  # calls timed at the far end of each SDK write phase

DRIVER = r'''
"""Drive the FlashLex SDK 1.4 store calls; print timings as JSON. Args: messages.jsonl data_dir
budget_seconds tail."""
import datetime, json, os, sys, time, uuid
import pickledb
from flashlexiot.sdk import FlashlexSDK

messages_file, data_dir, budget, tail = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(line) for line in open(messages_file)]
n = len(rows)
path = os.path.join(data_dir, "subscription.json")
sdk = FlashlexSDK({"flashlex": {"app": {"db": {"dataPath": data_dir, "subscriptionData": "subscription.json"}}}})
clock = time.perf_counter


def doc(row):  # what the SDK's PersistentCallbackHandler passes to setMessageToStore
    ts = time.time()
    return {"pk": str(uuid.uuid4()).replace("-", "")[:12], "timestamp": ts,
            "datetime": datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S"),
            "message": {"topic": row["topic"], "payload": json.loads(row["payload"]), "pos": 1,
                        "retain": False, "mid": row["mid"]}}


docs = [doc(r) for r in rows]
out = {"n": n}


def run_phase(items, size_of, call, fill):
    """Call `call` on items in order, timed, for `budget` seconds; then bring the store (untimed,
    `fill`) to the middle and to the end, timing `tail` calls at each. size_of(k): the number
    of messages stored when call k starts."""
    timed, skipped, started, k = [], [], clock(), 0
    while k < n and clock() - started < budget:
        t = clock(); call(items[k]); timed.append((size_of(k), clock() - t)); k += 1
    for anchor in (n // 2 - tail // 2, n - tail):
        if k >= n:
            break
        if anchor > k:
            fill(k, anchor)
            skipped.extend(size_of(j) for j in range(k, anchor))
            k = anchor
        for j in range(k, min(n, k + tail)):
            t = clock(); call(items[j]); timed.append((size_of(j), clock() - t))
        k = min(n, k + tail)
    while k < n:  # only when the anchors overlap: finish the phase, timed
        t = clock(); call(items[k]); timed.append((size_of(k), clock() - t)); k += 1
    return {"timed": timed, "skipped_sizes": skipped}


def fill_set(a, b):  # the same file the SDK writes, with the SDK's own library, untimed
    db = pickledb.load(path, False, sig=False)
    for d in docs[a:b]:
        db.set(d["pk"], d)
    db.dump()


out["set"] = run_phase(docs, lambda k: k, sdk.setMessageToStore, fill_set)
out["file_bytes"] = os.path.getsize(path)

# read all
devnull, real, reads = open(os.devnull, "w"), sys.stdout, []
for _ in range(3):
    sys.stdout = devnull
    t = clock(); got = sdk.getSubscribedMessages(); reads.append(clock() - t)
    sys.stdout = real
assert len(got) == n, (len(got), n)
out["get"] = reads


def fill_remove(a, b):
    db = pickledb.load(path, False, sig=False)
    for m in got[a:b]:
        db.rem(m["pk"])
    db.dump()


out["remove"] = run_phase(got, lambda k: n - k, sdk.removeMessageFromStore, fill_remove)
out["left"] = len(pickledb.load(path, False, sig=False).getall())
print(json.dumps(out))
'''


def messages(count: int) -> List[Tuple[str, bytes, int]]:
    """The workload both sides store: ~200-byte JSON payloads on the ingress topic."""
    return [(INGRESS_TOPIC, (b'{"seq": %8d, "data": "' % i).ljust(198, b"x") + b'"}', i % 65535 + 1)
            for i in range(count)]


# -- the SDK side -----------------------------------------------------------------------------

def sdk_venv(root: Path) -> Tuple[Optional[Path], str]:
    """(python of a fresh venv with the SDK, its version line) or (None, what went wrong)."""
    venv = root / "sdk-venv"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *SDK_REQUIREMENTS]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if done.returncode:
            lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip() and "is ignored" not in l]
            return None, f"`{' '.join(step[-len(SDK_REQUIREMENTS) - 2:])}` failed: " + " / ".join(lines[-3:])
    python = venv / "bin" / "python"
    probe = ("import importlib.metadata as m, inspect, flashlexiot.sdk as s, sys;"
             "print(sys.version.split()[0], *(m.version(p) for p in ('flashlexiot', 'pickledb', 'PyJWT', 'PyYAML')));"
             "print(*(f'{n}{inspect.signature(getattr(s.FlashlexSDK, n))}' for n in"
             " ('setMessageToStore', 'getSubscribedMessages', 'removeMessageFromStore')), sep='; ')")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    if done.returncode:
        return None, f"the SDK does not import: {done.stderr.strip().splitlines()[-1:]}"
    versions, signatures = done.stdout.strip().splitlines()
    py, sdk, pickledb, pyjwt, pyyaml = versions.split()
    return python, (f"flashlexiot {sdk} (pickledb {pickledb}, PyJWT {pyjwt}, PyYAML {pyyaml}) on Python {py};"
                    f" calls: `{signatures}`")


def fit(points: List[Tuple[int, float]]) -> Tuple[float, float, float]:
    """Least-squares seconds = a + b * size; returns (a, b, R²)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in points)
    ss_res = sum((y - a - b * x) ** 2 for x, y in points)
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def sdk_phase(phase: Dict[str, Any]) -> Dict[str, Any]:
    timed = [(size, seconds) for size, seconds in phase["timed"]]
    skipped = phase["skipped_sizes"]
    measured = sum(s for _, s in timed)
    a, b, r2 = fit(timed)
    estimated = sum(max(0.0, a + b * size) for size in skipped)
    small = [s for size, s in timed if size <= 100]
    large = [s for size, s in timed if size >= max(x for x, _ in timed) - TAIL]
    return {"calls": len(timed), "measured": measured, "estimated": estimated,
            "total": measured + estimated, "r2": r2, "skipped": len(skipped),
            "small": median(small) if small else None, "large": median(large)}


def run_sdk(python: Path, root: Path, workload: Path, budget: float) -> Dict[str, Any]:
    data = root / "sdk-data"
    data.mkdir()
    driver = root / "drive_sdk.py"
    driver.write_text(DRIVER)
    done = subprocess.run([str(python), str(driver), str(workload), str(data), str(budget), str(TAIL)],
                          capture_output=True, text=True, timeout=3600, cwd=root)
    if done.returncode:
        raise RuntimeError(f"SDK driver failed: {done.stderr.strip()[-2000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    assert raw["left"] == 0
    return {"set": sdk_phase(raw["set"]), "remove": sdk_phase(raw["remove"]), "get": median(raw["get"]),
            "file_bytes": raw["file_bytes"]}


# -- the flashlexd side -----------------------------------------------------------------------

def run_flashlexd(root: Path, broker: Broker, work: List[Tuple[str, bytes, int]], runs: int
                  ) -> Dict[str, List[float]]:
    client_id = "bench-sdk"
    config = daemon_config(root / client_id, broker, mqtt={"clientId": client_id})
    daemon = Daemon(config, root / client_id).start()
    results: Dict[str, List[float]] = {k: [] for k in ("set", "get", "remove", "set100", "remove100",
                                                       "set_first", "set_last", "remove_first", "remove_last")}
    clock = time.perf_counter
    try:
        wait_up(daemon)
        store = open_store(config)
        sdk = CompatSDK(socket_path=str(daemon.socket_path))
        client = Client(str(daemon.socket_path))
        incoming = [Incoming(topic, payload, qos=1, mid=mid) for topic, payload, mid in work]
        n = len(incoming)
        for _ in range(runs):
            calls = []
            started = clock()
            for message in incoming:  # one durable commit per message
                t = clock()
                store.append([message])
                calls.append(clock() - t)
            results["set"].append(clock() - started)
            results["set_first"].append(median(calls[:100]))
            results["set_last"].append(median(calls[-100:]))
            got = []
            for _ in range(3):
                t = clock()
                got = sdk.getSubscribedMessages()
                results["get"].append(clock() - t)
            assert len(got) == n, (len(got), n)
            calls = []
            started = clock()
            for message in got:  # one ack call, one durable commit each
                t = clock()
                sdk.removeMessageFromStore(message)
                calls.append(clock() - t)
            results["remove"].append(clock() - started)
            results["remove_first"].append(median(calls[:100]))
            results["remove_last"].append(median(calls[-100:]))
            # the daemon's count: acks wait in its ack journal, applied to the inbox in batches
            assert client.status()["inbox"]["count"] == 0
            t = clock()
            for i in range(0, n, 100):
                store.append(incoming[i:i + 100])
            results["set100"].append(clock() - t)
            t = clock()
            while True:
                page = client.messages(limit=100)
                if not page:
                    break
                client.ack([m.id for m in page])
            results["remove100"].append(clock() - t)
            assert client.status()["inbox"]["count"] == 0
        store.close()
        client.close()
        sdk.close()
    finally:
        daemon.stop()
        wipe_session(broker, client_id)
        wipe_session(broker, f"{client_id}-egress")
    return results


# -- report -------------------------------------------------------------------------------------

def secs(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


def per_call(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1000:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3, help="flashlexd runs")
    parser.add_argument("--budget", type=float, default=40.0,
                        help="seconds each SDK write phase is timed from its start (then only its last calls)")
    args = parser.parse_args()
    work = messages(args.messages)
    with tempfile.TemporaryDirectory(prefix="bench-sdk-") as tmp:
        root = Path(tmp)
        workload = root / "messages.jsonl"
        workload.write_text("".join(json.dumps({"topic": t, "payload": p.decode(), "mid": m}) + "\n"
                                    for t, p, m in work))
        python, about = sdk_venv(root)
        sdk = run_sdk(python, root, workload, args.budget) if python else None
        broker = Broker(make_certs(root / "certs"), root / "broker").start()
        try:
            ours = run_flashlexd(root, broker, work, args.runs)
        finally:
            broker.close()

    n = args.messages
    mine = {k: median(v) for k, v in ours.items()}
    print(f"The same {n:,} messages (~200-byte JSON payloads, one topic) on both sides;"
          f" flashlexd: median of {args.runs} runs.\n")
    if sdk is None:
        print(f"**FlashLex SDK side not measured**: {about}. Only flashlexd's figures follow.\n")
    else:
        print(f"SDK: {about}. Its store file held {sdk['file_bytes'] / 1e6:.1f} MB at {n:,} messages.\n")
    print("| operation | FlashLex SDK 1.4 call | SDK time | flashlexd call | flashlexd time |"
          " SDK time / flashlexd time |")
    print("|---|---|---:|---|---:|---:|")

    def sdk_cell(phase: Optional[Dict[str, Any]]) -> str:
        if phase is None:
            return "not measured"
        if not phase["skipped"]:
            return secs(phase["total"])
        return (f"{secs(phase['total'])} ({phase['calls']:,} calls timed: {secs(phase['measured'])};"
                f" {phase['skipped']:,} estimated, R² {phase['r2']:.3f})")

    def ratio(theirs: Optional[float], ours_: float) -> str:
        return "-" if theirs is None else f"**{theirs / ours_:,.0f}x**" if theirs / ours_ >= 10 \
            else f"**{theirs / ours_:.1f}x**"

    rows = [
        ("store each message", "`setMessageToStore(doc)` x N", sdk and sdk["set"],
         "`Store.append([msg])` x N, one fsync'd commit each", mine["set"]),
        ("read all", "`getSubscribedMessages()`", None,
         "compat `getSubscribedMessages()` over the API", mine["get"]),
        ("remove each message", "`removeMessageFromStore(doc)` x N", sdk and sdk["remove"],
         "compat `removeMessageFromStore(msg)` x N (`ack`, one fsync'd commit each)", mine["remove"]),
    ]
    total_sdk = 0.0
    for label, their_call, phase, our_call, our_time in rows:
        if label == "read all":
            theirs = sdk["get"] if sdk else None
            cell = secs(theirs) if sdk else "not measured"
        else:
            theirs = phase["total"] if phase else None
            cell = sdk_cell(phase)
        total_sdk += theirs or 0.0
        print(f"| {label} | {their_call} | {cell} | {our_call} | {secs(our_time)} | {ratio(theirs, our_time)} |")
    total_ours = mine["set"] + mine["get"] + mine["remove"]
    print(f"| **all three** | | {secs(total_sdk) if sdk else 'not measured'} | | {secs(total_ours)} |"
          f" {ratio(total_sdk if sdk else None, total_ours)} |")
    print(f"| store, batched | | | `Store.append(100 msgs)` x N/100 (ingress under load) | {secs(mine['set100'])} |"
          f" {ratio(sdk['set']['total'] if sdk else None, mine['set100'])} |")
    print(f"| remove, batched | | | `messages(limit=100)` + `ack(100 ids)` x N/100 | {secs(mine['remove100'])} |"
          f" {ratio(sdk['remove']['total'] if sdk else None, mine['remove100'])} |")
    if sdk:
        print("\n| cost of one call (median) | SDK, <= 100 stored | SDK, nearly all stored |"
              " flashlexd, <= 100 stored | flashlexd, nearly all stored |")
        print("|---|---:|---:|---:|---:|")
        print(f"| store one message | {per_call(sdk['set']['small'])} | {per_call(sdk['set']['large'])} |"
              f" {per_call(mine['set_first'])} | {per_call(mine['set_last'])} |")
        print(f"| remove one message | {per_call(sdk['remove']['small'])} | {per_call(sdk['remove']['large'])} |"
              f" {per_call(mine['remove_last'])} | {per_call(mine['remove_first'])} |")
        if sdk["get"] < mine["get"]:
            print("\nReading everything in one call is the SDK's fast case: one `json.load` of its file;"
                  " flashlexd's compatibility class fetches 1,000 messages per API call and turns each into"
                  " the old dict shape (decoding its JSON payload).")
        print("\nThe SDK's per-call cost grows with the number of messages stored (each call reads and"
              " rewrites the whole JSON file, without fsync); flashlexd's stays flat (B-tree insert or"
              " delete, plus one fsync per commit).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
