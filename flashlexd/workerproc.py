"""One worker as the supervisor sees it: an explicit state machine, its pid, its link, its liveness.

    STOPPED --spawn--> STARTING --"ready" report--> READY
    STOPPED/BACKOFF --spawn failed (no fds/processes)--> BACKOFF
    STARTING/READY --silent for heartbeatTimeoutSeconds--> HUNG  (SIGABRT: faulthandler logs where)
    HUNG --still there KILL_GRACE later--> SIGKILL (state stays HUNG until reaped)
    STARTING/READY/HUNG --stop()--> STOPPING (link "stop" + SIGTERM; SIGKILL after stopTimeoutSeconds)
    any live state --reaped--> BACKOFF (restart after a delay), STOPPED (meant to stay down),
                               FATAL (crash loop: the supervisor exits so systemd restarts it)
    BACKOFF --delay over--> STARTING;  BACKOFF --stop() at shutdown--> STOPPED

Every change goes through `transition`, which refuses any change not in `TRANSITIONS`; every
time-driven decision (hung, kill, due to start) is made in `tick`.

Workers are forked without exec from the fork server, so they share the code the supervisor
imported; `forkserver` and `forkworker` say how that keeps what exec gave.
"""
from __future__ import annotations

import enum
import logging
import os
import signal
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Tuple

from flashlexd.channel import Channel
from flashlexd.config import Supervision
from flashlexd.linkmsg import LinkMessage, Stop
from flashlexd.restart import RestartHistory, RestartLimits

log = logging.getLogger(__name__)

KILL_GRACE = 1.0  # seconds between SIGABRT to a hung worker and SIGKILL if it is still there
OOM_CAUSE = ", by the kernel's OOM killer: out of memory"  # `exited`'s cause for such a death
# a restart cannot help a worker the OOM killer takes over and over (review "lowmem")
OOM_HINT = ("; the last death was the OOM killer's: give the service more memory (MemoryMax), or lower"
            " flashlex.app.db.maxPayloadBytes (README: Processes and memory)")
DISK_WAIT_LIMIT = 300.0  # seconds a silent worker blocked on a disk write is waited for (waits_on_disk)


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    HUNG = "hung"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FATAL = "fatal"


LIVE: FrozenSet[State] = frozenset({State.STARTING, State.READY, State.HUNG, State.STOPPING})
_DOWN = frozenset({State.BACKOFF, State.STOPPED})
TRANSITIONS: Dict[State, FrozenSet[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.BACKOFF}),
    State.BACKOFF: frozenset({State.STARTING, State.BACKOFF, State.STOPPED}),
    State.STARTING: frozenset({State.READY, State.HUNG, State.STOPPING, State.FATAL}) | _DOWN,
    State.READY: frozenset({State.HUNG, State.STOPPING, State.FATAL}) | _DOWN,
    State.HUNG: frozenset({State.STOPPING, State.FATAL}) | _DOWN,
    State.STOPPING: _DOWN,
    State.FATAL: frozenset(),
}


class BadTransition(RuntimeError):
    """A change the state machine does not allow: a supervisor bug, never a worker's doing."""


def describe_exit(status: int) -> str:
    """A waitpid status in words: "exit code 3", "signal SIGKILL"."""
    code = os.waitstatus_to_exitcode(status)
    return f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"


class WorkerProcess:
    def __init__(self, name: str):
        self.name = name
        self.state = State.STOPPED
        self.pid: Optional[int] = None
        self.channel: Optional[Channel] = None
        self.history = RestartHistory()
        self.restarts = 0
        self.last_death: Optional[Tuple[str, float]] = None  # (how, when) of its last unplanned exit
        self.started_at = 0.0
        self.last_heard = 0.0  # any message on the link proves the worker's loop is turning
        self.next_start = 0.0
        self.kill_at: Optional[float] = None  # SIGKILL then, unless reaped first
        self.sent_kill = False  # a SIGKILL of ours: its death is not the OOM killer's
        self.hung = False  # judged hung, this process: said with its death, whatever came after
        self.restart_when_stopped = False
        self.counters: Dict[str, Any] = {}
        self.mqtt: Dict[str, Any] = {}
        self.refused_before = False
        self.disk_wait_said = -1.0  # the `last_heard` of the silence a disk wait was logged for
        self.disk_wait_seen = float("-inf")  # when it was last seen waiting on the disk (state D)

    def transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise BadTransition(f"{self.name}: {self.state.value} -> {new.value} is not allowed")
        if new is not self.state:
            log.debug("%s: %s -> %s", self.name, self.state.value, new.value)
        self.state = new

    @property
    def alive(self) -> bool:
        return self.state in LIVE

    # -- events ---------------------------------------------------------------------------------

    def spawn(self, fork: Callable[[int, int], int], config_fd: int, now: float) -> None:
        """Start the process: `fork(link_fd, config_fd)` makes it (the fork server does, see
        `forkserver`) and returns its pid, or raises OSError (EMFILE, EAGAIN, ...); nothing is
        left open then."""
        if State.STARTING not in TRANSITIONS[self.state]:
            raise BadTransition(f"{self.name}: cannot start from {self.state.value}")
        channel, child_end = Channel.pair()
        try:
            pid = fork(child_end.fileno(), config_fd)
        except OSError:
            channel.close()
            raise
        finally:
            child_end.close()
        self.started(pid, channel, now)

    def started(self, pid: int, channel: Optional[Channel], now: float) -> None:
        """A process now runs for this worker (split from `spawn` so tests need no fork)."""
        self.transition(State.STARTING)
        self.pid, self.channel = pid, channel
        self.started_at = self.last_heard = now
        self.kill_at = None
        self.sent_kill = self.hung = False
        # the process before ended with the store refusing: its "resuming" is for this one to earn
        self.refused_before = bool(self.counters.get("store_error"))
        self.counters, self.mqtt = {}, {}
        log.info("%s started (pid %d)", self.name, pid)

    def took_counters(self, counters: Dict[str, Any]) -> None:
        """A heartbeat's counters. The first commit of a process started while the one before
        was refused (a reload raising the cap, a crash) ends that refusal in the log: else its
        ERROR stays the log's last word on the store."""
        self.counters = counters
        if self.refused_before and (counters.get("store_error") or counters.get("batches")):
            self.refused_before = False  # refused again: this process says so, and its end
            if not counters.get("store_error"):
                log.info("%s: store accepts messages again; resuming", self.name)

    def spawn_failed(self, now: float, retry_in: float) -> None:
        """No process could be made (out of fds or processes): not the worker's failure, so
        not counted towards a crash loop; tried again after `retry_in` seconds."""
        self.transition(State.BACKOFF)
        self.next_start = now + retry_in

    def heard(self, now: float) -> None:
        self.last_heard = now

    def excuse(self, seconds: float, now: float) -> None:
        """Take `seconds` the supervisor was not listening off this worker's silence."""
        self.last_heard = min(now, self.last_heard + seconds)

    def reported_state(self, state: str) -> None:
        if state == "ready" and self.state is State.STARTING:
            self.transition(State.READY)
            log.info("%s ready", self.name)

    def send(self, message: LinkMessage) -> None:
        if self.channel is not None:
            self.channel.send(message)

    def stop(self, now: float, timeout: float, restart: bool = False) -> None:
        """Ask for a graceful stop (link message and SIGTERM); SIGKILL after `timeout`. A worker
        waiting to be restarted just stays down (unless `restart`: it starts when due)."""
        if not self.alive:
            if self.state is State.BACKOFF and not restart:
                self.transition(State.STOPPED)
            return
        self.restart_when_stopped = restart
        self.send(Stop())
        self.signal(signal.SIGTERM)
        deadline = now + timeout
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)
        if self.state is not State.STOPPING:
            self.transition(State.STOPPING)

    def exited(self, status: int, now: float, shutting_down: bool, limits: RestartLimits,
               cause: str = "") -> None:
        """The process is gone (reaped): STOPPED, BACKOFF until `next_start`, or FATAL when it
        failed too often too quickly (crash loop)."""
        how = describe_exit(status) + cause + (", after it hung (no heartbeat)" if self.hung else "")
        planned = self.state is State.STOPPING
        self.pid, self.kill_at = None, None
        # its links died with it: a last report of `connected` must not outlive the process
        # (status, and publish's egress_offline check, read it until the next start)
        if self.mqtt.get("connected"):
            self.mqtt = dict(self.mqtt, connected=False)
        if self.counters.get("connected"):
            self.counters = dict(self.counters, connected=False)
        if shutting_down or (planned and not self.restart_when_stopped):
            self.transition(State.STOPPED)
            log.info("%s stopped (%s)", self.name, how)
            return
        if planned:
            self.restart_when_stopped = False
            delay: Optional[float] = 0.0
            log.info("%s stopped for restart (%s)", self.name, how)
            if self.sent_kill or self.hung:  # it did not stop when asked, or hung before (re-read 28)
                self.restarts += 1
                self.last_death = (how, now)
        else:
            ran = now - self.started_at
            self.last_death = (how, now)  # for `status`: a log line alone left it unsaid there
            delay = self.history.next_delay(now, self.started_at, limits)
            if delay is None:
                self.transition(State.FATAL)
                log.error("%s died (%s) after %.1fs", self.name, how, ran)
                log.error("%s is crash-looping (%s): giving up so systemd restarts the service%s",
                          self.name, self.history.describe(limits), OOM_HINT if cause == OOM_CAUSE else "")
                return
            log.warning("%s died (%s) after %.1fs; restarting in %.1fs", self.name, how, ran, delay)
            self.restarts += 1  # deaths and hangs only: a reload's planned restarts are no fault
        self.transition(State.BACKOFF)
        self.next_start = now + delay

    # -- time -----------------------------------------------------------------------------------

    def tick(self, now: float, supervision: Supervision, disk_wait: bool = False) -> bool:
        """Make every time-driven decision: a silent worker is HUNG (SIGABRT, so its stack is
        logged), one that outlived its stop or hang grace is SIGKILLed. Returns True when the
        worker is due to be started. `disk_wait`: another worker of the daemon waits on the
        disk (`waits_on_disk`), so this one may wait on the write lock it holds: spared too."""
        if self.kill_at is not None and now >= self.kill_at:
            log.warning("%s did not %s in time: killing pid %s", self.name,
                        "stop" if self.state is State.STOPPING else "abort", self.pid)
            self.signal(signal.SIGKILL)
            self.kill_at = None
        elif self.state in (State.STARTING, State.READY) and \
                now - self.last_heard > supervision.heartbeat_timeout:
            if self._said_disk_wait(now, supervision.heartbeat_timeout) or disk_wait:  # its own first: said once
                return False
            self.transition(State.HUNG)
            self.hung = True
            if self.pid is not None and stopped(self.pid):  # SIGABRT would wait for a SIGCONT
                log.error("%s hung (no heartbeat for %.1fs): stopped (SIGSTOP, a debugger), killing pid %s",
                          self.name, now - self.last_heard, self.pid)
                self.signal(signal.SIGKILL)
                return False
            log.error("%s hung (no heartbeat for %.1fs): aborting pid %s", self.name,
                      now - self.last_heard, self.pid)
            self.signal(signal.SIGABRT)
            self.kill_at = now + KILL_GRACE
        return self.state is State.BACKOFF and now >= self.next_start

    def waits_on_disk(self, now: float, grace: float) -> bool:
        """Silent, and blocked in the kernel on a disk write (state D: a stalling SD card's
        fsync), for at most DISK_WAIT_LIMIT: not hung. SIGABRT and SIGKILL wait for the write
        anyway, and its restart counted towards the crash loop (a 14 s stall restarted a healthy
        ingress, found by review). Past the limit (a dead disk that never answers) it is judged
        hung, so the daemon does not look healthy for good while it stores nothing. Seen in
        state D less than `grace` ago counts too: back from the write, a worker has the batch's acks and
        bookkeeping to do (state R) before its next heartbeat, and a look then aborted it
        (re-read 23)."""
        if self.pid is None or not self.alive or now - self.last_heard > DISK_WAIT_LIMIT:
            return False
        if process_state(self.pid) == "D":
            self.disk_wait_seen = now
            return True
        return now - self.disk_wait_seen <= grace

    def _said_disk_wait(self, now: float, grace: float) -> bool:
        """`waits_on_disk`, said once a silence; judged again at each tick."""
        if not self.waits_on_disk(now, grace):
            return False
        if self.disk_wait_said != self.last_heard:
            self.disk_wait_said = self.last_heard
            log.warning("%s has sent no heartbeat for %.1fs: it waits on the disk (a slow or stalling"
                        " SD card), not hung (for up to %.0fs)", self.name, now - self.last_heard,
                        DISK_WAIT_LIMIT)
        return True

    def next_deadline(self) -> Optional[float]:
        """When `tick` next has something to do without any event (None: nothing timed)."""
        if self.state is State.BACKOFF:
            return self.next_start
        return self.kill_at

    def healthy(self, now: float, supervision: Supervision, disk_wait: bool = False) -> bool:
        """Alive and heard from lately (or spared: see `tick`), or waiting to be restarted:
        what feeds the watchdog."""
        if self.state is State.BACKOFF:
            return True
        return self.alive and self.state is not State.HUNG and \
            (now - self.last_heard <= supervision.heartbeat_timeout or disk_wait
             or self.waits_on_disk(now, supervision.heartbeat_timeout))

    def signal(self, signum: int) -> None:
        if self.pid is not None:
            self.sent_kill = self.sent_kill or signum == signal.SIGKILL
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # already dead; reaping will tell

    def status(self, now: float) -> Dict[str, Any]:
        age = now - self.last_heard if self.alive else None
        return {"name": self.name, "pid": self.pid, "state": self.state.value,
                "restarts": self.restarts,
                "last_death": None if self.last_death is None else
                {"how": self.last_death[0], "age": round(now - self.last_death[1], 1)},
                "uptime": round(now - self.started_at, 1) if self.alive else None,
                "heartbeat_age": round(age, 3) if age is not None else None,
                "counters": self.counters, "mqtt": self.mqtt}


def disk_waits(workers: Iterable["WorkerProcess"], now: float, supervision: Supervision) -> bool:
    """Whether a silent worker waits on the disk: the others may wait on the write lock it
    holds (its siblings were aborted while it was spared, found by re-read). Read from /proc
    only for workers already silent too long: nothing in the loop's usual passes."""
    return any(now - w.last_heard > supervision.heartbeat_timeout
               and w.waits_on_disk(now, supervision.heartbeat_timeout) for w in workers)


def stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP, a debugger's trace stop): it acts on no
    signal but SIGKILL, so it cannot log its stack."""
    return process_state(pid) in ("T", "t")


def process_state(pid: int) -> str:
    """The state letter of process `pid` in /proc/PID/stat ("R", "S", "D", "T"...; "" if gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            line = stat.read()
    except OSError:
        return ""
    return line[line.rfind(")") + 2:line.rfind(")") + 3]
