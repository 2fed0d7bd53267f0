"""What the daemon-level benchmarks share: a TLS mosquitto and a real `flashlexd run` (the test
fixtures of tests/broker.py and tests/daemon.py, used outside pytest), PSS from smaps_rollup,
process CPU time, and small formatting helpers. Not a benchmark itself."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flashlexd.client import Client  # noqa: E402
from tests.broker import (INGRESS_TOPIC, Broker, make_certs, wait_for,  # noqa: E402,F401
                          write_config)
from tests.daemon import Daemon, NotifyListener  # noqa: E402,F401
from tests.worker_process import cpu_seconds  # noqa: E402,F401

PAYLOAD_BYTES = 200


def daemon_config(directory: Path, broker: Broker, supervisor: Optional[Dict[str, Any]] = None,
                  mqtt: Optional[Dict[str, Any]] = None, db: Optional[Dict[str, Any]] = None) -> Path:
    """A FlashLex config for `broker` (tests/broker.py's write_config) whose supervisor section
    is `supervisor`: by default none at all, i.e. the production defaults (heartbeat every 1 s),
    not the test-sized 0.2 s heartbeat that write_config puts in."""
    path = write_config(directory, broker, mqtt=mqtt, db=db)
    document = yaml.safe_load(path.read_text())
    if supervisor:
        document["flashlex"]["app"]["supervisor"] = supervisor
    else:
        document["flashlex"]["app"].pop("supervisor", None)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def status(daemon: Daemon) -> Optional[Dict[str, Any]]:
    """The daemon's `status`, or None while its API is not up."""
    try:
        with Client(str(daemon.socket_path), timeout=5) as client:
            return client.status()
    except Exception:
        return None


def wait_up(daemon: Daemon, timeout: float = 30, connected: bool = True) -> Dict[str, Any]:
    """Wait until the daemon said READY (all workers up) and, with `connected`, both MQTT
    connections are up; fail with the daemon's log if it exits first."""
    def up() -> Optional[Dict[str, Any]]:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"flashlexd exited ({daemon.proc.returncode}):\n{daemon.output()[-3000:]}")
        found = status(daemon)
        if not found or not found.get("ready"):
            return None
        if connected and not all(found["mqtt"].get(n, {}).get("connected") for n in ("ingress", "egress")):
            return None
        return found
    return wait_for(up, timeout, "flashlexd ready and connected", interval=0.05)


def pss(pid: int) -> Dict[str, int]:
    """/proc/PID/smaps_rollup as {field: kB} (Rss, Pss, Pss_Anon, Pss_File, ...)."""
    fields: Dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def payload_lines(path: Path, count: int, width: int = PAYLOAD_BYTES) -> List[bytes]:
    """`count` distinct JSON payloads of about `width` bytes, one a line (mosquitto_pub -l)."""
    lines = [(b'{"seq": %8d, "data": "' % i).ljust(width - 2, b"x") + b'"}' for i in range(count)]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return lines


def settle(seconds: float) -> None:
    time.sleep(seconds)
