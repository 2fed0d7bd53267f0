"""A real systemd as PID 1 of a private PID + mount namespace, for tests (see
../shared/recipes/real-systemd.md). It loads only the units in its own directory."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, Optional

from tests.broker import wait_for

PID1_SCRIPT = """#!/bin/sh
mount -t tmpfs tmpfs /run
{setup}
exec /lib/systemd/systemd --system --unit=test.target
"""


class RealSystemd:
    def __init__(self, units: Path, unit_name: str, unit_text: str, drop_in: str, setup: str = ""):
        """`setup`: shell lines run in the new mount namespace before systemd starts (private
        mounts that adapt the host to the test without changing it)."""
        self.units = units
        self.unit_name = unit_name
        units.mkdir(parents=True, exist_ok=True)
        (units / unit_name).write_text(unit_text)
        (units / f"{unit_name}.d").mkdir(exist_ok=True)
        (units / f"{unit_name}.d" / "test.conf").write_text(drop_in)
        # no default dependencies: a target that pulled in sysinit.target once let a helper's systemd
        # mount a tmpfs over /tmp (the unit path is this folder alone; this is belt and braces)
        (units / "test.target").write_text(f"[Unit]\nDefaultDependencies=no\nWants={unit_name}\n")
        script = units / "pid1.sh"
        script.write_text(PID1_SCRIPT.format(setup=setup))
        script.chmod(0o755)
        self.launcher: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None

    def start(self) -> "RealSystemd":
        env = dict(os.environ, SYSTEMD_UNIT_PATH=str(self.units))
        self.launcher = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc",
             str(self.units / "pid1.sh")],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = wait_for(self._find_pid1, 10, "systemd to start")
        wait_for(lambda: self.run("systemctl", "is-system-running").stdout.strip()
                 in ("running", "degraded"), 20, "systemd to finish booting")
        return self

    def _find_pid1(self) -> Optional[int]:
        """The host pid of the namespace's PID 1: the child `unshare --fork` made."""
        out = subprocess.run(["pgrep", "-f", "-P", str(self.launcher.pid), "systemd --system"],
                             capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None

    def run(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", *argv],
                              capture_output=True, text=True, check=check, timeout=30)

    def show(self) -> Dict[str, str]:
        out = self.run("systemctl", "show", self.unit_name, "-p", "ActiveState", "-p", "SubState",
                       "-p", "MainPID", "-p", "NRestarts", "-p", "Result", "-p", "StatusText",
                       "-p", "ExecMainStatus").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: takes everything with it
            except ProcessLookupError:
                pass
        if self.launcher is not None:
            self.launcher.wait(timeout=10)
