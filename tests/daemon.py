"""Run the real daemon (`python -m flashlexd run`) in tests, and listen to what it tells systemd."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from tests.broker import wait_for


def under_the_unit() -> Dict[str, str]:
    """What systemd sets for a daemon under the unit this release renders (INVOCATION_ID and
    the unit's mark), for tests that stand in for systemd."""
    from flashlexd.service import UNIT_ENV, template, template_digest
    return {"INVOCATION_ID": "0" * 32, UNIT_ENV: template_digest(template("unit"))}


def default_sigint() -> None:
    """`preexec_fn` for a program the test stops with SIGINT (Ctrl-C): a runner started in
    the background (`cmd &` without job control) ignores SIGINT, and so would what it starts,
    since Python keeps an inherited SIG_IGN."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class NotifyListener:
    """A fake NOTIFY_SOCKET: a Unix datagram socket that records what arrives, with times."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: List[Tuple[float, str]] = []

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> List[Tuple[float, str]]:
        """Every field received so far, one (time, 'KEY=value') per field."""
        self._pump()
        return [(t, field) for t, text in self.messages for field in text.splitlines()]

    def wait_for(self, field: str, timeout: float = 10, after: float = 0.0) -> float:
        """Wait until `field` (e.g. 'READY=1') arrives after time `after`; returns its time."""
        def seen() -> Optional[float]:
            return next((t for t, f in self.lines() if f == field and t >= after), None)
        return wait_for(seen, timeout, f"{field} on NOTIFY_SOCKET")

    def close(self) -> None:
        self.sock.close()


def importing(pid: int) -> bool:
    """flashlexd's imports are under way in `pid`: a C extension the CLI's modules load is mapped
    (what the entry point does before them is what tests of start-up signals aim at)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return any(name in maps for name in ("msgpack/_cmsgpack", "yaml/_yaml", "lmdb/cpython"))


class Daemon:
    """The daemon as a child process in its own session, always stopped by PID."""

    def __init__(self, config: Path, workdir: Path, env: Optional[Dict[str, str]] = None,
                 args: Tuple[str, ...] = (), preexec: Optional[Callable[[], None]] = None,
                 python: Optional[str] = None, cwd: Optional[Path] = None,
                 launcher: Optional[List[str]] = None):
        self.config = config
        self.socket_path = workdir / "flashlexd.sock"
        self.log_path = workdir / "daemon.log"
        self.env = dict(os.environ, **(env or {}))
        self.args = args
        self.preexec = preexec  # run in the child before exec (e.g. to lower its limits)
        self.python = python  # another install's interpreter (bench/bench_wear.py, bench_memory.py)
        self.cwd = cwd  # `python -m` puts the working directory first on sys.path
        self.launcher = launcher  # what runs `flashlexd` (default: `python -m flashlexd`)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Daemon":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*(self.launcher or [self.python or sys.executable, "-m", "flashlexd"]), "run", "--config", str(self.config),
             "--socket", str(self.socket_path), *self.args],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=self.preexec,
            cwd=self.cwd or (self.log_path.parent if self.python else None))
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_processes(self) -> Iterator[Tuple[int, str]]:
        """(pid, command line) of each child of the supervisor running now."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                yield int(entry.name), title

    def children(self, fork_server: bool = False) -> Dict[str, int]:
        """Worker name -> pid, read from the process titles of the supervisor's children (and
        the fork server's as "forkserver", when asked)."""
        found: Dict[str, int] = {}
        for pid, title in self.child_processes():
            if title.startswith("flashlexd: "):
                name = title.split()[1]
                if fork_server or name != "forkserver":
                    found[name] = pid
        return found

    def zombies(self) -> List[int]:
        zombies = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] == "Z" and int(fields[1]) == self.pid:
                    zombies.append(int(entry.name))
        return zombies

    def wait_workers(self, timeout: float = 15) -> Dict[str, int]:
        return wait_for(lambda: (lambda c: c if len(c) == 3 else None)(self.children()),
                        timeout, "three workers")

    def wait_api(self, timeout: float = 15) -> None:
        """Until the API socket accepts a connection: its file appears at bind, a moment before
        it listens (a connect in between is refused; seen on a loaded machine)."""
        def accepts() -> bool:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.socket_path))
                    return True
                except (FileNotFoundError, ConnectionRefusedError):
                    return False
        wait_for(accepts, timeout, f"the API socket {self.socket_path} to accept")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 30) -> int:
        """The exit code; failing with the end of its output when it is still running (a bare
        TimeoutExpired left nothing to tell why)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon still runs after {timeout}s; its output ends:\n"
                                 f"{self.output()[-3000:]}") from None

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL the whole session if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()

