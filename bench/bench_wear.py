"""Bytes written to disk per message (issue 20: SD cards wear out by bytes written): the daemon
before issue 20 (BASELINE, checked out of this repository's history into a temp dir) and this
code with its defaults and with the SD-card friendly setting, side by side in one run, plus the
old SDK's pickleDB store (pickledb 0.9.2, the release the SDK calls) at the same rates.

    .venv/bin/python bench/bench_wear.py [--seconds 30] [--rates 1 10 50] [--runs 1]

Each cell is a fresh `flashlexd run` (fresh store, `expireSeconds: 60` as in the seed config)
on a TLS mosquitto on loopback. A paho
publisher (QoS 1, the broker's plain listener) sends ~200-byte messages at a steady rate for
`--seconds`; an app (flashlexd.client, as the old apps use it) takes them with `wait()` and acks
them one by one (`ack([pk])` per message, as `removeMessageFromStore` does) or 100 per call.
Bytes written are `write_bytes - cancelled_write_bytes` of /proc/PID/io (what the kernel counts
as sent or to be sent to the disk, less pages truncated before they were written), summed over
the daemon's processes, from after the daemon is up and connected to after the last message was
stored and acked; "store" is the ingress worker's share (the inbox commits), "ack" the
supervisor's (the API's commits). As root, each store also lies on a fresh ext4 on a loop
device (loopdisk.py) and the bytes written to that device over the same span are shown too
(data, metadata, the filesystem's journal: what an SD card is sent; write_bytes counts whole
page-cache folios on this kernel, more than the device gets once a file is large). Every run
checks that each message was stored exactly once.

pickleDB: what the SDK does per message, in one process at the same rate: load the JSON file,
`set(pk, message)`, dump; and per ack load, `rem(pk)`, dump (pickledb 0.9.2's `dump` writes the
file twice; no fsync). Its file holds the messages not yet acked (a handful at these rates).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import loopdisk
from benchlib import INGRESS_TOPIC, Broker, Daemon, daemon_config, make_certs, median, wait_up
from bench_ingest import wipe_session
from flashlexd.client import connect

BASELINE = "6321fbea86e33c620255db830155ab139766695e"  # main before issue 20 (schema 3)
ROOT = Path(__file__).resolve().parent.parent
PAYLOAD_BYTES = 200
SD_CARD = {"ingestCommitMs": 2000, "ingestCommitBatch": 16}  # the documented SD-card friendly setting
SEED_DB = {"expireSeconds": 60}  # as the seed config (shared/seed-config.yml): an expiry for every message
KIB = 1024
TARGETS = {"defaults": 12, "SD-card setting": 4}  # KiB a message, store + ack (issue 20)
DISK_MB = 1024  # the loop device's filesystem, as root


def io_bytes(pid: int) -> int:
    """write_bytes - cancelled_write_bytes of /proc/PID/io (0 once the process is gone)."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return 0
    return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])


def payload(i: int) -> bytes:
    return (b'{"seq": %8d, "data": "' % i).ljust(PAYLOAD_BYTES - 2, b"x") + b'"}'


def publish_steadily(broker: Broker, rate: float, seconds: float) -> int:
    """Publish at `rate` msg/s for `seconds` (QoS 1, plain listener); returns how many."""
    import paho.mqtt.client as mqtt
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="wear-pub")
    client.connect("127.0.0.1", broker.plain_port)
    client.loop_start()
    count = int(rate * seconds)
    start = time.monotonic()
    infos = []
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        infos.append(client.publish(INGRESS_TOPIC, payload(i), qos=1))
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()
    return count


class App(threading.Thread):
    """Takes messages with wait() and acks them one by one or `batch` per call, until told to
    stop and nothing is left; remembers every payload it saw."""

    def __init__(self, socket_path: str, batch: int):
        super().__init__(daemon=True)
        self.socket_path, self.batch = socket_path, batch
        self.seen: List[bytes] = []
        self.stopping = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            with connect(self.socket_path, timeout=30) as fx:
                pending: List[int] = []
                after = None
                while True:
                    # the plain `wait` call, which the baseline daemon knows too (no `paged`)
                    found = fx.call("wait", timeout=0.5, after=after, limit=100)
                    for m in found:
                        self.seen.append(m["payload"])
                        after = m["id"]
                        if self.batch == 1:
                            fx.ack([m["pk"]])
                        else:
                            pending.append(m["pk"])
                    if len(pending) >= self.batch or (pending and self.stopping.is_set() and not found):
                        fx.ack(pending)
                        pending = []
                    if self.stopping.is_set() and not found and not pending:
                        return
        except BaseException as exc:  # reported by the caller
            self.error = exc


def run_daemon(root: Path, stores: Path, broker: Broker, python: Optional[Path], db: Dict[str, int],
               rate: float, batch: int, seconds: float, device_written: Callable[[], int],
               warmup: float = 0.0) -> Dict[str, float]:
    """One cell: a fresh daemon (`python`: another interpreter, the baseline's, to run it), its
    store in a new directory of `stores` (its config and log in one of `root`). `warmup`: seconds
    of the same traffic first, not counted (a fresh store's file fills its holes meanwhile)."""
    client_id = f"wear-{os.getpid()}-{time.monotonic_ns()}"
    workdir = Path(tempfile.mkdtemp(dir=root))
    store = Path(tempfile.mkdtemp(dir=stores)) / "data"
    wipe_session(broker, client_id)
    config = daemon_config(workdir, broker, mqtt={"clientId": client_id},
                           db={**SEED_DB, **db, "dataPath": str(store)})
    daemon = Daemon(config, workdir, python=str(python or sys.executable), cwd=workdir).start()
    try:
        wait_up(daemon)
        pids = {"supervisor": daemon.pid, **daemon.wait_workers()}
        app = App(str(daemon.socket_path), batch)
        app.start()
        time.sleep(1.0)  # the first commits of a fresh store (its databases, boot frame) settle
        if warmup:
            warm = publish_steadily(broker, rate, warmup)
            deadline = time.monotonic() + 60
            while len(app.seen) < warm and time.monotonic() < deadline and app.error is None:
                time.sleep(0.1)
            if len(app.seen) != warm:
                raise AssertionError(f"warm-up: {len(app.seen)} seen of {warm} sent")
            app.seen.clear()  # the counted span's payloads are the warm-up's again
        before = {name: io_bytes(pid) for name, pid in pids.items()}
        device_before = device_written()
        sent = publish_steadily(broker, rate, seconds)
        deadline = time.monotonic() + 60
        while len(app.seen) < sent and time.monotonic() < deadline and app.error is None:
            time.sleep(0.1)
        app.stopping.set()
        app.join(60)
        if app.error is not None:
            raise app.error
        with connect(str(daemon.socket_path)) as fx:
            left = fx.status()["inbox"]["count"]
            # applies the journaled acks still waiting (one commit), so that their share is counted;
            # the purge's own commit is counted too, in every variant (a slight overestimate)
            fx.call("purge", confirm=True)
        after = {name: io_bytes(pid) for name, pid in pids.items()}
        device = device_written() - device_before
        expected = [payload(i) for i in range(sent)]
        if sorted(app.seen) != expected or left:
            raise AssertionError(f"{len(app.seen)} seen of {sent} sent, {len(set(app.seen))} distinct,"
                                 f" {left} left in the inbox")
    finally:
        daemon.stop()
    delta = {name: after[name] - before[name] for name in pids}
    return {"store": delta["ingress"] / sent, "ack": delta["supervisor"] / sent,
            "total": sum(delta.values()) / sent, "device": device / sent}


PICKLEDB_DRIVER = r'''
import json, os, sys, time, pickledb
path, rate, seconds, batch = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def io():
    f = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    return int(f["write_bytes"]) - int(f["cancelled_write_bytes"])
def op(change):
    db = pickledb.load(path, False, sig=False); change(db); db.dump()
op(lambda db: None)
count, start, pending = int(rate * seconds), time.monotonic(), []
stored = acked = 0
for i in range(count):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    before = io()
    doc = {"pk": str(i), "timestamp": time.time(), "message": {"topic": "t", "payload": "x" * 200, "qos": 1}}
    op(lambda db: db.set(str(i), doc))
    stored += io() - before
    pending.append(str(i))
    if len(pending) >= batch:
        before = io()
        if batch == 1:
            op(lambda db: db.rem(pending[0]))
        else:
            op(lambda db: [db.rem(k) for k in pending])
        acked += io() - before
        pending = []
print(json.dumps({"store": stored / count, "ack": acked / count, "total": (stored + acked) / count}))
'''


def run_pickledb(stores: Path, rate: float, batch: int, seconds: float,
                 device_written: Callable[[], int]) -> Dict[str, float]:
    """The SDK's store, in a child process (its own /proc/PID/io)."""
    path = Path(tempfile.mkdtemp(dir=stores)) / "subscriptionData.db"
    device_before = device_written()
    done = subprocess.run([sys.executable, "-c", PICKLEDB_DRIVER, str(path), str(rate), str(seconds),
                           str(batch)], capture_output=True, text=True, timeout=seconds + 120, check=True)
    figures = json.loads(done.stdout)
    figures["device"] = (device_written() - device_before) / int(rate * seconds)
    return figures


def baseline_python(root: Path) -> Path:
    """A Python that runs BASELINE's flashlexd/ (the daemon before issue 20, from git history,
    in a temp dir): a venv without pip whose .pth puts that checkout first, then this venv's
    packages (lmdb, paho, ...). Not PYTHONPATH: this venv's editable install of flashlexd would
    still win, and the workers are exec'd with the supervisor's Python."""
    code = root / "baseline"
    code.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE, "flashlexd"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    venv = root / "baseline-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "baseline.pth").write_text(f"{code}\n{sysconfig.get_paths()['purelib']}\n")
    check = subprocess.run([str(python), "-c", "import flashlexd.storebase as s; print(s.SCHEMA_VERSION)"],
                           capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    assert check == "3", f"the baseline checkout reads schema {check}"
    return python


def cell(figures: List[Dict[str, float]]) -> Tuple[float, float, float, float]:
    return tuple(median(f[k] for f in figures) / KIB for k in ("store", "ack", "total", "device"))  # type: ignore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 10.0, 50.0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="another setting of this code to measure, e.g. 'window 500={\"ingestCommitMs\": 500}'")
    parser.add_argument("--no-baseline", action="store_true", help="leave out the daemon before issue 20")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100],
                        help="acks per call: 1 (one by one) and/or 100")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="seconds of traffic before each cell's counted span (steady state)")
    parser.add_argument("--mount-options", default="",
                        help="the loop device's ext4 mount options, e.g. lazytime (as root)")
    parser.add_argument("--min-messages", type=int, default=200,
                        help="100-per-call rows publish at least this many (longer at low rates)")
    args = parser.parse_args()
    rows: List[Tuple[str, float, str, List[Dict[str, float]]]] = []
    disk = loopdisk.loop_disk(DISK_MB, args.mount_options) if loopdisk.available() else nullcontext((None, lambda: 0))
    with tempfile.TemporaryDirectory(prefix="bench-wear-") as tmp, disk as (mount, device_written):
        root, stores = Path(tmp), Path(mount or tmp)  # the stores alone on the loop device
        variants = [("defaults", None, {}), ("SD-card setting", None, SD_CARD)]
        variants += [(name, None, json.loads(db)) for name, db in (v.split("=", 1) for v in args.variant)]
        if not args.no_baseline:
            variants.insert(0, (f"before issue 20 ({BASELINE[:7]})", baseline_python(root), {}))
        broker = Broker(make_certs(root / "certs"), root / "broker", plain=True).start()
        try:
            for rate in args.rates:
                for batch in args.batches:
                    seconds = max(args.seconds, args.min_messages / rate) if batch == 100 else args.seconds
                    results: Dict[str, List[Dict[str, float]]] = {name: [] for name, _, _ in variants}
                    results["pickleDB (old SDK)"] = []
                    for _ in range(args.runs):  # the variants alternate run by run
                        for name, python, db in variants:
                            results[name].append(run_daemon(root, stores, broker, python, db, rate, batch,
                                                            seconds, device_written, args.warmup))
                        results["pickleDB (old SDK)"].append(run_pickledb(stores, rate, batch, seconds,
                                                                          device_written))
                    for name, figures in results.items():
                        rows.append((name, rate, "one by one" if batch == 1 else "100 per call", figures))
                        print(f"{name}: {rate:g} msg/s, batch {batch}: {cell(figures)}", file=sys.stderr)
        finally:
            broker.close()
    print(f"~{PAYLOAD_BYTES}-byte messages, each run {args.seconds:g} s of steady publishing"
          f"{f' after {args.warmup:g} s of the same, not counted' if args.warmup else ''} (100-per-call"
          f" rows: at least {args.min_messages} messages), {args.runs} run(s) per cell (median). KiB written per"
          f" message, `write_bytes - cancelled_write_bytes` of /proc/PID/io; on the device: written to"
          f" the loop device under the store{'' if loopdisk.available() else ' (not measured: needs root)'}"
          f"{f', ext4 mounted with {args.mount_options}' if args.mount_options else ''}.\n")
    print("| store | rate | acks | store KiB/msg | ack KiB/msg | total KiB/msg | on the device KiB/msg |"
          " GiB/day at that rate |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, rate, acks, figures in rows:
        store, ack, total, device = cell(figures)
        per_day = total * KIB * rate * 86400 / 1024 ** 3
        spread = ""
        if len(figures) > 1:
            totals = [f["total"] / KIB for f in figures]
            spread = f" ({min(totals):.1f}-{max(totals):.1f})"
        on_device = f"{device:.1f}" if loopdisk.available() else "-"
        print(f"| {name} | {rate:g} msg/s | {acks} | {store:.1f} | {ack:.1f} | {total:.1f}{spread} |"
              f" {on_device} | {per_day:.2f} |")
    print()
    for name, target in TARGETS.items():
        for row_name, rate, acks, figures in rows:
            if row_name == name and rate == 10 and acks == "one by one":
                _, _, total, device = cell(figures)
                judged = device if loopdisk.available() else total  # what the card is sent, if measured
                print(f"target {name}, 10 msg/s, acks one by one: {judged:.1f} KiB/msg"
                      f" {'on the device' if loopdisk.available() else 'by write_bytes'}"
                      f" ({total:.1f} by write_bytes) (target <= {target} KiB):"
                      f" {'met' if judged <= target else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
