"""One flashlexd worker (`python -m flashlexd.workers NAME`) as a real child process, with the
test holding the supervisor's end of its link: it hands the worker its config text (a sealed
memfd on CONFIG_FD, as the supervisor does), reads what the worker reports (`hb`, `state`, `mqtt`,
`committed`) and can wake, stop or SIGKILL it by PID."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from flashlexd import paths
from flashlexd.channel import CHANNEL_FD, CONFIG_FD, Channel, ConfigFile, place_child_fds
from flashlexd.config import ConfigError, load
from flashlexd.linkmsg import build
from tests.broker import wait_for


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident memory of a live process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class WorkerUnderTest:
    def __init__(self, name: str, config: Path, log_path: Path):
        self.name, self.config, self.log_path = name, config, log_path
        self.process: Optional[subprocess.Popen] = None
        self.channel: Optional[Channel] = None
        self.messages: List[Dict[str, Any]] = []   # everything received, across restarts
        self.counters: Dict[str, Any] = {}          # from the latest heartbeat
        self.mqtt: Dict[str, Any] = {}              # the latest `mqtt` report

    def start(self) -> "WorkerUnderTest":
        # as the supervisor does: it makes the data dir (a worker never does) and hands the text
        try:
            paths.make_dir(Path(load(str(self.config)).store.data_dir), paths.DATA_DIR_MODE)
        except ConfigError:
            pass  # the worker says what is wrong with it
        channel, child_end = Channel.pair()
        config_file = ConfigFile(self.config.read_text())
        fd = child_end.fileno()
        try:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "flashlexd.workers", self.name, "--config", str(self.config)],
                    stdout=log, stderr=subprocess.STDOUT, pass_fds=(CHANNEL_FD, CONFIG_FD),
                    preexec_fn=lambda: place_child_fds(fd, config_file.fd))
        finally:
            child_end.close()
            config_file.close()
        self.channel, self.counters, self.mqtt = channel, {}, {}
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pump(self, timeout: float = 0.0) -> None:
        """Read whatever the worker has sent (waiting up to `timeout` for the first message)."""
        if self.channel is None:
            return
        ready, _, _ = select.select([self.channel], [], [], timeout)
        received = self.channel.receive() if ready else []
        if received is None:
            self.channel.close()
            self.channel = None
            return
        for message in received:
            message["received_at"] = time.monotonic()
            self.messages.append(message)
            if message.get("t") == "hb":
                self.counters = message["counters"]
            elif message.get("t") == "mqtt":
                self.mqtt = message

    def wait(self, predicate: Callable[["WorkerUnderTest"], Any], timeout: float, what: str) -> Any:
        """Poll the link until `predicate(self)` is truthy; fail if the worker dies first."""
        def check() -> Any:
            self.pump(0.02)
            value = predicate(self)
            if not value and not self.alive():
                raise AssertionError(f"{self.name} exited ({self.process.returncode}) while waiting"
                                     f" for {what}; log:\n{self.log_text()[-3000:]}")
            return value
        return wait_for(check, timeout, f"{self.name}: {what}", interval=0)

    def wait_connected(self, timeout: float = 15) -> None:
        self.wait(lambda w: w.mqtt.get("connected"), timeout, "mqtt connected")

    def reports(self, kind: str) -> List[Dict[str, Any]]:
        return [m for m in self.messages if m.get("t") == kind]

    def send(self, kind: str, **fields: Any) -> None:
        assert self.channel is not None
        self.channel.send(build(kind, **fields))

    def kill(self) -> None:
        """SIGKILL at whatever instant the worker is in."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)  # type: ignore[union-attr]
        self._drop_link()

    def stop(self, timeout: float = 15) -> int:
        """Graceful stop through the link, as the supervisor does; returns the exit code."""
        if self.alive():
            self.send("stop")
            try:
                self.process.wait(timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.name} did not stop within {timeout}s")
        self.pump()
        self._drop_link()
        assert self.process is not None
        return self.process.returncode

    def _drop_link(self) -> None:
        if self.channel is not None:
            self.pump()
            if self.channel is not None:
                self.channel.close()
                self.channel = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
