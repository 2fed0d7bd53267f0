"""One worker as the supervisor sees it: an explicit lifecycle, its pid, its link, its heartbeat.

States (as in supervisord): starting -> ready -> stopping -> stopped, and backoff (waiting to be
restarted after a failure). Every change goes through `_change`, which logs it once.

Workers are started with fork + exec, not a bare fork: the supervisor holds an open LMDB
environment (it serves the local API), and an environment must never be inherited by a process
that goes on to use LMDB. exec drops the mapping and every non-inheritable descriptor; the child
starts clean and opens its own environment.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Dict, List, Optional

from flashlexd.channel import Channel, place_child_fds
from flashlexd.restart import CrashLoop, RestartPolicy

log = logging.getLogger(__name__)


class WorkerProcess:
    def __init__(self, name: str, policy: RestartPolicy):
        self.name = name
        self.policy = policy
        self.state = "stopped"
        self.pid: Optional[int] = None
        self.channel: Optional[Channel] = None
        self.restarts = 0
        self.started_at = 0.0
        self.last_heartbeat = 0.0
        self.next_start = 0.0
        self.kill_at: Optional[float] = None
        self.restart_when_stopped = False
        self.counters: Dict[str, Any] = {}
        self.mqtt: Dict[str, Any] = {}

    def _change(self, state: str) -> None:
        if state != self.state:
            log.debug("%s: %s -> %s", self.name, self.state, state)
            self.state = state

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def spawn(self, argv: List[str], env: Dict[str, str], config_fd: int, now: float) -> None:
        """fork + exec `argv` with the link on CHANNEL_FD and the validated config (the
        supervisor's `ConfigFile`) on CONFIG_FD. Raises OSError (EMFILE, EAGAIN, ...) when the
        process cannot be made; nothing is left open then."""
        channel, child_end = Channel.pair()
        try:
            pid = os.fork()
        except OSError:
            channel.close()
            child_end.close()
            raise
        if pid == 0:  # child: only async-safe work until exec
            try:
                place_child_fds(child_end.fileno(), config_fd)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        child_end.close()
        self.pid, self.channel = pid, channel
        self.started_at = self.last_heartbeat = now
        self.kill_at = None
        self.counters, self.mqtt = {}, {}
        self._change("starting")
        log.info("%s started (pid %d)", self.name, pid)

    def spawn_failed(self, now: float, retry_in: float) -> None:
        """No process could be made (out of fds or processes): not the worker's failure, so
        not counted towards a crash loop; tried again after `retry_in` seconds."""
        self.next_start = now + retry_in
        self._change("backoff")

    def on_message(self, message: Dict[str, Any], now: float) -> None:
        self.last_heartbeat = now
        kind = message.get("t")
        if kind == "hb" and isinstance(message.get("counters"), dict):
            self.counters = message["counters"]
        elif kind == "state" and message.get("state") == "ready" and self.state == "starting":
            self._change("ready")
            log.info("%s ready", self.name)
        elif kind == "mqtt":
            self.mqtt = {"connected": bool(message.get("connected")), "error": message.get("error")}

    def heartbeat_age(self, now: float) -> Optional[float]:
        return now - self.last_heartbeat if self.alive else None

    def send(self, kind: str, **fields: Any) -> None:
        if self.channel is not None:
            self.channel.send(kind, **fields)

    def stop(self, now: float, timeout: float, restart: bool = False) -> None:
        """Ask for a graceful stop (link message and SIGTERM); SIGKILL after `timeout`."""
        if not self.alive:
            return
        self.restart_when_stopped = restart
        self.send("stop")
        self.signal(signal.SIGTERM)
        self.kill_at = now + timeout
        self._change("stopping")

    def signal(self, signum: int) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # already dead; reaping will tell

    def exited(self, status: int, now: float, shutting_down: bool) -> Optional[float]:
        """The process is gone (reaped). Returns the delay before restarting it, or None when
        it should stay down. Raises CrashLoop when it fails too often."""
        code = os.waitstatus_to_exitcode(status)
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        planned = self.state == "stopping"
        self.pid, self.kill_at = None, None
        if shutting_down or (planned and not self.restart_when_stopped):
            self._change("stopped")
            log.info("%s stopped (%s)", self.name, how)
            return None
        if planned:
            self.restart_when_stopped = False
            delay = 0.0
            log.info("%s stopped for restart (%s)", self.name, how)
        else:
            ran = now - self.started_at
            try:
                delay = self.policy.next_delay(now, self.started_at)
            except CrashLoop:
                log.error("%s died (%s) after %.1fs", self.name, how, ran)
                raise
            log.warning("%s died (%s) after %.1fs; restarting in %.1fs", self.name, how, ran, delay)
        self.restarts += 1
        self.next_start = now + delay
        self._change("backoff")
        return delay

    def status(self, now: float) -> Dict[str, Any]:
        age = self.heartbeat_age(now)
        return {"name": self.name, "pid": self.pid, "state": self.state, "restarts": self.restarts,
                "uptime": round(now - self.started_at, 1) if self.alive else None,
                "heartbeat_age": round(age, 3) if age is not None else None,
                "counters": self.counters, "mqtt": self.mqtt}
