"""The packaged unit under a real systemd (PID 1 of a private namespace): READY=1 makes the
service active, a hung supervisor is killed by the watchdog and restarted, stop is clean."""
from __future__ import annotations

import os
import shutil
import signal
import sys

import pytest
import yaml

from flashlexd.service import render_unit
from tests.broker import wait_for
from tests.systemd import RealSystemd

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/lib/systemd/systemd") or not shutil.which("unshare"),
    reason="needs root, systemd and unshare")

UNIT = "flashlexd.service"


@pytest.fixture
def systemd(daemon_config, tmp_path):
    log = tmp_path / "service.log"
    drop_in = f"""[Unit]
DefaultDependencies=no
[Service]
StandardOutput=append:{log}
StandardError=inherit
WatchdogSec=3
RestartSec=1
PrivateTmp=no
ReadWritePaths={tmp_path}
"""
    document = yaml.safe_load(daemon_config.read_text())
    del document["flashlex"]["app"]["socket"]  # the default: /run/flashlexd, RuntimeDirectory=
    daemon_config.write_text(yaml.safe_dump(document))
    unit = render_unit(venv=sys.prefix, config=str(daemon_config), user="root")
    instance = RealSystemd(tmp_path / "units", UNIT, unit, drop_in)
    instance.log = log
    try:
        yield instance.start()
    finally:
        instance.stop()


def active(systemd: RealSystemd):
    props = systemd.show()
    return props if props.get("ActiveState") == "active" and props.get("MainPID", "0") != "0" else None


def test_unit_becomes_active_through_ready(systemd):
    props = wait_for(lambda: active(systemd), 30, "the service to become active")
    assert props["SubState"] == "running"
    status = wait_for(lambda: systemd.show().get("StatusText", "") or None, 10, "a STATUS= line")
    assert "workers" in status
    out = systemd.run(sys.prefix + "/bin/flashlexctl", "status")
    assert out.returncode in (0, 1), out.stderr  # 1 while a worker is still connecting
    assert "ingress" in out.stdout


def test_hung_supervisor_is_restarted_by_the_watchdog(systemd):
    first = wait_for(lambda: active(systemd), 30, "the service to become active")
    hung = _host_pid(systemd, first["MainPID"])
    os.kill(hung, signal.SIGSTOP)
    results = set()

    def restarted():
        props = systemd.show()
        results.add(props.get("Result"))
        return props if props.get("NRestarts", "0") != "0" and active(systemd) else None

    props = wait_for(restarted, 40, "a watchdog restart", interval=0.05)
    assert "watchdog" in results, results
    assert int(props["NRestarts"]) >= 1 and props["MainPID"] != first["MainPID"]
    assert not os.path.exists(f"/proc/{hung}") or "Z" in open(f"/proc/{hung}/stat").read()


def test_systemctl_stop_exits_cleanly(systemd):
    wait_for(lambda: active(systemd), 30, "the service to become active")
    result = systemd.run("systemctl", "stop", UNIT)
    assert result.returncode == 0, result.stderr
    props = systemd.show()
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", props
    assert "stopping: received SIGTERM" in systemd.log.read_text(errors="replace")


def _host_pid(systemd: RealSystemd, namespace_pid: str) -> int:
    """Translate a pid inside the namespace to the host's (from /proc/PID/status NSpid)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("NSpid:"):
                        pids = line.split()[1:]
                        if len(pids) == 2 and pids[1] == namespace_pid and _in_namespace(entry, systemd):
                            return int(entry)
        except OSError:
            continue
    raise AssertionError(f"no host pid for namespace pid {namespace_pid}")


def _in_namespace(pid: str, systemd: RealSystemd) -> bool:
    return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{systemd.pid}/ns/pid")
