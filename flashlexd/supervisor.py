"""The supervisor: one single-threaded loop that keeps three workers alive and serves the API.

Shaped like gunicorn's arbiter: signal handlers only record the signal and wake the loop
(through `signal.set_wakeup_fd`); the loop then reaps children with `waitpid(-1, WNOHANG)`,
ticks each worker's state machine (`WorkerProcess.tick`: hung, kill, due to start), feeds the
systemd watchdog while all of that is healthy, and serves the local API in between.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, FrozenSet, List, Optional

from flashlexd import __version__
from flashlexd import config as config_module
from flashlexd import connectpace, credentials, fds, forkworker, logs, paths
from flashlexd.channel import ConfigFile
from flashlexd.config import Config, Thing
from flashlexd.configgone import keys_gone
from flashlexd.configkeys import OVERRIDDEN_BY
from flashlexd.consumerkeeper import ConsumerKeeper
from flashlexd.forkserver import ForkServer, ForkServerGone
from flashlexd.ipc.methods import Methods
from flashlexd.ipc.server import RpcServer
from flashlexd.ipc.socketfile import SocketGroupError, check_group, closed_to_uids
from flashlexd.linkmsg import Committed, Heartbeat, MqttReport, OutboxQueued, StateReport, decode
from flashlexd.loopguard import LoopGuard
from flashlexd.notify import Notifier, child_environment
from flashlexd.rates import RateMeter
from flashlexd.wear import WriteMeter
from flashlexd.runtime import Runtime, worker_settings
from flashlexd.unitplaces import STOP_MARGIN
from flashlexd.store import Store, StoreDamaged, StoreError
from flashlexd.oomkills import OomKills
from flashlexd.workerproc import DISK_WAIT_LIMIT, OOM_CAUSE, State, WorkerProcess, describe_exit, disk_waits

log = logging.getLogger(__name__)

WORKER_NAMES = ("ingress", "egress", "expiry")
EXIT_CRASH_LOOP = 1
EXIT_LOOP_FAILING = 1  # the supervisor's own loop kept failing: systemd restarts the service
EXIT_STORE_GONE = 1  # the data dir was removed or replaced under the daemon: so does this
EXIT_WRITE_LOCK_LEFT = 1  # a dead worker holds the store's write lock: a fresh start resets it
MAX_SLEEP = 1.0  # seconds; the loop looks at its deadlines at least this often
STATUS_EVERY = 1.0
STRANDED = ("messages published during the switch stay in the old id's session at the broker (until"
            " its session expiry) and are not fetched")
# Seconds an API write may wait for the store's write lock. A worker stopped inside a write
# transaction holds that lock until it is killed, and killing it is this loop's job: an
# unbounded wait here would hang the whole daemon (the API answers store_error meanwhile).
STORE_WRITE_WAIT = 1.0
# Seconds a loop pass may run later than the sleep it asked for before it counts as a stall:
# above one bounded store write's wait, the longest the loop blocks on its own.
STALL_SLACK = STORE_WRITE_WAIT + 0.5
LATE_LOG_SECONDS = 600.0  # one "loop ran late" line per this, with a count: a starved Pi stalls often
SPAWN_RETRY = 1.0  # seconds before trying again to start a worker the system had no room for


class _StopRequested(Exception):
    """SIGTERM/SIGINT arrived during a start-up step (the page check, the ack journal's apply):
    nothing more is started."""


class _ReloadRefused(Exception):
    """A reload that keeps the running config, and why (one line)."""


class _StoreLost(_ReloadRefused):
    """A reload closed the store and could open it again with neither config (e.g. its disk
    went read-only): nothing can be served, so the daemon stops (one line)."""


@dataclass(frozen=True)
class Overrides:
    """Command-line settings that win over the config file, kept for reloads and workers."""
    config_path: str
    data_dir: Optional[str] = None
    keys_dir: Optional[str] = None
    socket_path: Optional[str] = None
    log_level: Optional[str] = None
    allow_insecure_key: bool = False

    def load(self, while_checking: Optional[credentials.WhileWaiting] = None) -> Config:
        """The config, validated, with key files that load together (at start and on reload);
        `while_checking` is called during the key check (see `credentials._run`)."""
        config = config_module.load(self.config_path, data_dir=self.data_dir, keys_dir=self.keys_dir,
                                    socket_path=self.socket_path, log_level=self.log_level)
        credentials.verify(config.thing.keys, self.allow_insecure_key, while_waiting=while_checking)
        return replace(config, key_stamp=credentials.stamp(config.thing.keys))

    def keys(self) -> FrozenSet[str]:
        """The config keys these options win over."""
        return frozenset(key for field, key in OVERRIDDEN_BY.items() if getattr(self, field) is not None)

    def worker_maker(self) -> forkworker.WorkerMaker:
        """How the fork server makes workers (see `forkworker`)."""
        env = child_environment()
        env.pop(credentials.ALLOW_INSECURE_KEY_ENV, None)  # the flag's alone, not an export's
        if self.allow_insecure_key:  # a link loading a renewed key holds it to the same rule
            env[credentials.ALLOW_INSECURE_KEY_ENV] = "1"
        return forkworker.WorkerMaker(env, self.config_path, self.data_dir, self.keys_dir, self.log_level)


class Supervisor:
    def __init__(self, config: Config, overrides: Overrides, signals: Optional[List[int]] = None):
        """`signals`: the list the caller's handler notes signals in until ours are installed
        (kept as is: one may still arrive), handled as ours are."""
        self.runtime = Runtime.from_config(config)  # replaced whole by a reload, never patched
        self.bound = self.runtime  # whose socket settings the API socket has, until a restart
        self.overrides = overrides
        self.notifier = Notifier()
        self.selector = selectors.DefaultSelector()
        self.started = time.monotonic()
        self.signals: List[int] = [] if signals is None else signals
        self.shutting_down = False
        self.exit_code = 0
        self.announced_ready = False
        self.next_status = 0.0
        self.judged_at = 0.0  # when `tick` last judged the workers (see _catch_up)
        self.healthy = False  # as the last loop pass found the workers (`_healthy`)
        self.stop_told_at: Optional[float] = None  # STOPPING=1 sent during a disk wait (_waiting_on_disk)
        self.disk_wait_over = False  # the wait under way was said to be past DISK_WAIT_LIMIT
        self.rates = RateMeter()
        self.wear = WriteMeter()
        self.store: Optional[Store] = None
        self.store_lost: Optional[str] = None  # why the store is closed for good (_StoreLost)
        self.forks: Optional[ForkServer] = None
        self.consumers = ConsumerKeeper(lambda: self.store, lambda: self.runtime.rules.consumers,
                                        lambda: self.config.store.sweep_seconds,
                                        on_widened=self._consumer_widened,
                                        store_full=self._store_refuses)
        self.lock: Optional[paths.DataDirLock] = None
        self.api: Optional[RpcServer] = None
        self.methods: Optional[Methods] = None
        self.workers = {name: WorkerProcess(name) for name in WORKER_NAMES}
        self.config_file: Optional[ConfigFile] = None
        self.spawn_error: Optional[str] = None  # logged once until a spawn works again
        self.guard = LoopGuard()
        self.late_lines = logs.LineThrottle(LATE_LOG_SECONDS)
        self.clock_lines = logs.LineThrottle(LATE_LOG_SECONDS)  # a clock step not recorded
        # reloads done, and why the last one kept the running config (None: it was applied):
        # in `status`, where `flashlexd reload` (the unit's ExecReload) reads its outcome
        self.reloads = 0
        self.reload_refused: Optional[str] = None
        self.reload_notes: List[str] = []  # what the last reload applied only in part (one line each)
        self.reload_restarted: List[str] = []  # the workers the last reload restarted

    @property
    def config(self) -> Config:
        return self.runtime.config

    # -- start and stop -----------------------------------------------------------------------

    def run(self) -> int:
        limit = fds.raise_open_files_limit()  # before anything is opened; workers inherit it
        log.debug("open files limit %d", limit)
        forkworker.preload()  # then the fork server: before the store is opened (see forkserver)
        connectpace.share()  # before the fork server too: its workers inherit it
        self.forks = ForkServer(self.overrides.worker_maker())
        self.oom_kills = OomKills()
        self._install_signals()
        self.config_file = ConfigFile(self.config.text)
        self.lock = paths.claim_directories(self.config.store.data_dir, self.config.api.socket_path)
        # every page read once before LMDB maps the file: damage refuses the start in one line
        try:
            self.store = self._open_store(self.config, check_pages=True,
                                          check_progress=self._checking_pages)
            self.store.open_ack_journal()  # what a crash left unapplied, applied before serving
            self._stop_if_asked("ack journal's apply")  # a stalled one: said then, done now (re-read 27)
            self._forget_fallbacks()
            self._note_other_client_id()
            self.api = self._start_api()
            self.consumers.declare()  # a store write too, at every start with consumers
            self._stop_if_asked("store writes")
        except _StopRequested as stop:  # SIGTERM/SIGINT during the check or a write: nothing started yet
            log.info("stopping: received %s", stop)
            self.notifier.stopping()
            self._close()
            return 0
        now = time.monotonic()
        for worker in self.workers.values():
            self._spawn(worker, now)
        self.judged_at = now
        try:
            while not (self.shutting_down and not any(w.alive for w in self.workers.values())):
                try:
                    self._loop_once()
                except Exception as exc:  # noqa: BLE001 - a bug in one pass, see loopguard
                    if self.guard.failed(exc):
                        self.begin_shutdown("the supervisor loop keeps failing", EXIT_LOOP_FAILING)
                        break  # workers got SIGTERM; they also stop when the link closes
                else:
                    self.guard.passed()
        finally:
            self._close()
        return self.exit_code

    def _store_refuses(self) -> bool:
        """The running ingress's last word: the store refuses what the broker sends for want of
        room (a dead worker's last counters say nothing of now)."""
        ingress = self.workers["ingress"]
        return ingress.alive and bool(ingress.counters.get("store_full"))

    def _consumer_widened(self, name: str) -> None:
        """A declare widened `name`'s filter over stored messages: to its readers, a replay."""
        if self.methods is not None:
            self.methods.count_replay(name)

    def _start_api(self) -> RpcServer:
        """The API reads its limits and rules from the current runtime on every use."""
        self.methods = Methods(self._serving_store, self.status, self.wake_egress,
                               lambda: bool(self.workers["egress"].mqtt.get("connected")),
                               lambda: self.runtime.rules,
                               lambda: {**self.workers["egress"].counters, **self.workers["egress"].mqtt},
                               on_replay=lambda: self.api.notify_inbox())
        api = self.config.api
        # allowUids are users outside the socket's group: they need the socket itself to be
        # connectable (0666); who may talk is then decided per connection (ipc/admission.py)
        server = RpcServer(api.socket_path, self.methods, lambda: self.runtime.api_limits,
                           self.selector, group=api.socket_group, allow_uids=api.allow_uids,
                           mode=0o666 if api.allow_uids else 0o660)
        closed = closed_to_uids(api.socket_path, api.allow_uids)
        if closed:
            log.error("%s", closed)
        return server

    def _serving_store(self) -> Store:
        """The store the API works with; after a reload lost it (closed, the daemon stopping)
        a StoreError, the caller's `store_error`, not lmdb's error on a closed environment."""
        if self.store_lost is not None:
            raise StoreError(f"the store is closed, the daemon is stopping: {self.store_lost}")
        return self.store  # type: ignore[return-value]

    def _close(self) -> None:
        if self.forks is not None:
            self.forks.close()
        if self.api is not None:
            self.api.close()
        if self.store is not None:
            self.store.close()
        if self.config_file is not None:
            self.config_file.close()
        if self.lock is not None:
            self.lock.release()
        self.notifier.flush_before_exit()

    def _forget_fallbacks(self) -> None:
        """A new run probes MQTT 5 again (workers/linkmemory.py): the broker may have changed."""
        try:
            self.store.forget_fallbacks()
        except StoreError as exc:  # a damaged store is read-only: its workers then probe anew
            log.debug("protocol fallbacks not forgotten: %s", exc)

    def _note_other_client_id(self) -> None:
        """A data dir whose ingress last connected under another client id (thing.name or
        clientId edited while stopped, a data dir moved between things): said at a reload only,
        the messages queued for the old id were left at the broker without a word."""
        try:
            old = self.store.last_ingress_client_id()  # type: ignore[union-attr]
        except StoreError as exc:
            log.debug("the earlier client id not looked at: %s", exc)
            return
        new = self.config.thing.mqtt.client_id
        if old is not None and old != new:
            log.warning("this data dir's ingress last connected as client id %r, now %r (thing.name"
                        " or clientId changed, or the data dir is another thing's): %s; the inbox and"
                        " outbox are kept, the outbox sent as the new id", old, new, STRANDED)

    def _checking_pages(self, read: int, pages: int) -> None:
        self._stop_if_asked("page check")  # a long check (minutes on a Pi) must not hold up a stop
        self.notifier.still_starting(f"checking the store before opening it: {read:,} of {pages:,} pages")

    def _stop_if_asked(self, step: str) -> None:
        """_StopRequested when SIGTERM/SIGINT came: start-up `step` cut short or not followed."""
        stop = next((s for s in self.signals if s in (signal.SIGTERM, signal.SIGINT)), None)
        if stop is not None:
            raise _StopRequested(f"{signal.Signals(stop).name} during the start-up {step}")

    def _install_signals(self) -> None:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        self.selector.register(wake_read, selectors.EVENT_READ, self._drain_wakeups)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)
        logs.dump_stacks_on_sigusr1("supervisor")  # as the workers do (see logs)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def _drain_wakeups(self, fd: int, mask: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def begin_shutdown(self, reason: str, exit_code: int = 0) -> None:
        if self.shutting_down:
            return
        log.info("stopping: %s", reason)
        # the workers' stop budget, then killing, reaping and closing (as the rendered unit allows)
        self.notifier.stopping(self.config.supervision.stop_timeout + STOP_MARGIN)
        self.shutting_down = True
        self.exit_code = exit_code
        now = time.monotonic()
        for worker in self.workers.values():
            worker.stop(now, self.config.supervision.stop_timeout)

    # -- the loop -------------------------------------------------------------------------------

    def _loop_once(self) -> None:
        # Signals first: handling one may block the loop (a reload checks the key files in a
        # subprocess, up to 30 s), and the links must be read after that and before `tick`
        # judges any worker by its last heartbeat (else every healthy worker looks hung).
        # Signals that arrived together ask once: a SIGHUP storm is one reload per pass (those
        # arriving during it, one more at the next pass), not one reload per signal back to back.
        began = time.monotonic()
        signals, self.signals = self.signals, []
        for signum in dict.fromkeys(signals):
            self._handle_signal(signum)
        now = time.monotonic()
        handling = now - began  # a reload's key check may block for up to 30 s: not a stall
        self.healthy = self._healthy(now)
        ping = self.notifier.watchdog(now, self.healthy)
        sleep = self._sleep_time(now, ping)
        for key, mask in self.selector.select(sleep):
            if self.api.owns(key):
                self.api.dispatch(key, mask)
            else:
                key.data(key.fileobj, mask)
        now = time.monotonic()
        self._catch_up(now, now - self.judged_at - handling - sleep)
        self._reap(now)
        disk_wait = disk_waits(self.workers.values(), now, self.config.supervision)
        for worker in self.workers.values():
            if worker.tick(now, self.config.supervision, disk_wait) and not self.shutting_down:
                self._spawn(worker, now)
        if not self.shutting_down:
            self._announce(now)
            self.consumers.tick(now)
        if self.store_lost is None:
            self.store.apply_acks_if_due(now)
        self.api.tick(now)

    def _catch_up(self, now: float, late: float) -> None:
        """Since `tick` last judged the workers, the loop ran `late` seconds beyond its sleep.
        Beyond STALL_SLACK the process was stopped (SIGSTOP, Ctrl-Z, a debugger, a frozen
        cgroup) or starved, wherever in the pass that landed, and its workers likely with it:
        their heartbeats are old or unread (after SIGCONT epoll_wait fails with EINTR and
        Python's select, its timeout past, returns [] unpolled). Nobody was listening, so no
        worker is judged by that gap: it is taken off each worker's silence, and only it (a
        clock reset to now at each stall let a supervisor starved every few seconds never
        catch a worker really hung)."""
        self.judged_at = now
        if late <= STALL_SLACK:
            return
        count = self.late_lines.due(now)  # a starved device: once, then a count every 10 min
        if count:
            log.warning("the supervisor's loop ran %.1fs late (the process was stopped, starved, or"
                        " waiting on a slow disk for an app's ack or publish);"
                        " that time is not counted against the workers' heartbeats%s", late,
                        logs.since_last(count, "such stalls"))
        for worker in self.workers.values():
            if worker.state in (State.STARTING, State.READY):
                worker.excuse(late, now)

    def _sleep_time(self, now: float, ping: Optional[float]) -> float:
        """Seconds until the loop has something to do: the next status line, API deadline,
        worker deadline or watchdog ping (`ping`, seconds from `now`)."""
        deadlines = [now + MAX_SLEEP, self.next_status, self.api.next_deadline(), self.consumers.next_run]
        deadlines += [d for d in (w.next_deadline() for w in self.workers.values()) if d is not None]
        if ping is not None:
            deadlines.append(now + ping)
        return max(0.0, min(deadlines) - now)

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.begin_shutdown(f"received {signal.Signals(signum).name}")
        elif signum == signal.SIGHUP and not self.shutting_down:
            self.reload()

    def _reap(self, now: float) -> None:
        by_pid = {w.pid: w for w in self.workers.values() if w.alive}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = by_pid.get(pid)
            oom_took = self.oom_kills.took_one(pid)  # at every reaped child: the count is the cgroup's
            if self.forks is not None and pid == self.forks.pid and not self.shutting_down:
                log.error("the fork server died (%s)", describe_exit(status))
                self.begin_shutdown("the fork server died", EXIT_CRASH_LOOP)
            if worker is None:
                continue  # a child we no longer track (or the fork server)
            self._drop_link(worker)
            oom = (oom_took and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                   and not worker.sent_kill)
            worker.exited(status, now, self.shutting_down, self.runtime.restart,
                          cause=OOM_CAUSE if oom else "")
            if worker.state is State.FATAL:
                self.begin_shutdown(f"{worker.name} crash loop", EXIT_CRASH_LOOP)
            elif os.WIFSIGNALED(status) and self.store is not None and self.store.write_lock_left_by(pid):
                log.error("%s (pid %d) was killed inside a write and the kernel did not release the"
                          " store's write lock (the OOM killer reaps a process's memory before it"
                          " can): every writer would wait for it forever; exiting so that a fresh"
                          " start sets the lock up again (systemd restarts the service)", worker.name, pid)
                self.begin_shutdown("the store's write lock is held by a dead worker", EXIT_WRITE_LOCK_LEFT)

    def _spawn(self, worker: WorkerProcess, now: float) -> None:
        try:
            worker.spawn(lambda link, config: self.forks.spawn(worker.name, link, config),  # type: ignore[union-attr]
                         self.config_file.fd, now)  # type: ignore[union-attr]
        except ForkServerGone as exc:
            log.error("cannot start %s: %s", worker.name, exc)
            worker.spawn_failed(now, SPAWN_RETRY)
            self.begin_shutdown(f"no worker can be started: {exc}", EXIT_CRASH_LOOP)
            return
        except OSError as exc:  # EMFILE, EAGAIN, ENOMEM: survived, retried, logged once
            reason = exc.strerror or str(exc)
            if self.spawn_error != reason:
                log.error("cannot start %s: %s; retrying every %gs", worker.name, reason, SPAWN_RETRY)
                self.spawn_error = reason
            worker.spawn_failed(now, SPAWN_RETRY)
            return
        if self.spawn_error is not None:
            log.info("workers can be started again")
            self.spawn_error = None
        self.selector.register(worker.channel, selectors.EVENT_READ,
                               lambda _sock, _mask, w=worker: self._on_link(w))

    def _on_link(self, worker: WorkerProcess) -> None:
        """The one place worker messages are dispatched (see `linkmsg`)."""
        received = worker.channel.receive() if worker.channel else None
        if received is None:
            self._drop_link(worker)
            return  # the process is dying; reaping handles the rest
        now = time.monotonic()
        for raw in received:
            worker.heard(now)
            message = decode(raw)
            if isinstance(message, Heartbeat):
                worker.took_counters(message.counters)
            elif isinstance(message, StateReport):
                worker.reported_state(message.state)
            elif isinstance(message, MqttReport):
                worker.mqtt = {"connected": bool(message.connected), "error": message.error}
                if message.subscriptions is not None:  # with "connected"; the heartbeat's come later
                    worker.mqtt["subscriptions"] = message.subscriptions
            elif isinstance(message, Committed):
                self.api.notify_inbox()

    def _drop_link(self, worker: WorkerProcess) -> None:
        if worker.channel is not None:
            self.selector.unregister(worker.channel)
            worker.channel.close()
            worker.channel = None

    def wake_egress(self) -> None:
        self.workers["egress"].send(OutboxQueued())

    # -- health, READY and STATUS ---------------------------------------------------------------

    def _healthy(self, now: float) -> bool:
        """Feed the watchdog only while every worker is alive and beating, or being restarted."""
        if self.shutting_down and self.exit_code:
            return False
        disk_wait = disk_waits(self.workers.values(), now, self.config.supervision)
        return all(w.healthy(now, self.config.supervision, disk_wait) for w in self.workers.values())

    def _announce(self, now: float) -> None:
        """READY=1 once every worker is up, STATUS= every STATUS_EVERY and just before READY=1:
        `systemctl start` returns at READY=1, and `systemctl status` must then show the
        workers up, not the `workers 2/3` of up to a second before."""
        ready = not self.announced_ready and all(w.state is State.READY for w in self.workers.values())
        if ready or now >= self.next_status:
            self._send_status(now)
        if ready and not self.shutting_down:  # a store found gone meanwhile is stopping it
            self.announced_ready = True
            self.notifier.ready()
            log.info("ready: %d workers up, API on %s", len(self.workers), self.config.api.socket_path)

    def _send_status(self, now: float) -> None:
        """The STATUS= line, with the figures it samples (rates, wear); a vanished store stops
        the daemon here, since this is where the store is looked at every second. The cgroup's
        OOM kill count is looked at too: a kill of another process in it (a hook, an app run in
        the unit) must not name a worker's later SIGKILL, one of a worker dying must."""
        self.next_status = now + STATUS_EVERY
        self.oom_kills.look(w.pid for w in self.workers.values() if w.alive and w.pid and not w.sent_kill)
        gone = self.store.vanished()  # type: ignore[union-attr]
        if gone is not None and not self.shutting_down:
            log.error("%s; nothing stored since was acknowledged to the broker. Stopping: the"
                      " next start opens the data dir as it is then", gone)
            self.begin_shutdown("the store was removed", EXIT_STORE_GONE)
        self._note_clock()
        try:
            stats: Optional[Dict[str, Any]] = self.store.stats()
        except StoreError:  # damage: logged once by the store, named in the status line
            stats = None
        if stats is not None:
            self.rates.sample(now, stats["received"], stats["sent"])
            pids = [os.getpid(), *(w.pid for w in self.workers.values() if w.pid is not None)]
            self.wear.sample(now, pids, stats["received"])
        self.notifier.status(self.status_line(stats))

    def _note_clock(self) -> None:
        """A step of the wall clock (NTP setting a Pi's clock at boot) recorded in the store
        within a second: a power cut right after it must not leave this boot's stamps under the
        old offset, or after the reboot its messages and outbox entries look that much older
        and expire (clock.py's reboot rule). Writes only at a step."""
        try:
            step = self.store.note_clock()  # type: ignore[union-attr]
        except StoreError as exc:
            # tried every second: on a disk gone read-only, an ERROR a second (review "clock")
            count = 0 if isinstance(exc, StoreDamaged) else self.clock_lines.due(time.monotonic())
            if count:  # damage: the store logged it once
                log.error("recording a clock step failed: %s%s", exc, logs.since_last(count, "tries"))
            return
        if self.clock_lines.last is not None:  # recorded again: a next failure is news
            self.clock_lines = logs.LineThrottle(LATE_LOG_SECONDS)
        if step is not None:
            log.info("the wall clock stepped %+.0f s; recorded in the store", step)

    def status_line(self, stats: Optional[Dict[str, Any]]) -> str:
        links = []
        for name in ("ingress", "egress"):
            links.append(f"{name} {'connected' if self.workers[name].mqtt.get('connected') else 'disconnected'}")
        up = sum(1 for w in self.workers.values() if w.state is State.READY)
        if stats is None or self.store.damage:  # type: ignore[union-attr]  # met elsewhere: read-only too
            store = "store damaged, read-only (see flashlexd store recover)"
        else:
            dead = f" ({stats['dead_count']} dead letters)" if stats.get("dead_count") else ""
            store = f"inbox {stats['inbox_count']}; outbox {stats['outbox_count']}{dead}"
        # `systemctl status` said all was well while nothing could be stored (review "rocard")
        refusing = self.workers["ingress"].counters.get("store_error")
        if refusing:
            store += f"; ingress not storing, the broker keeps the messages ({str(refusing)[:100]})"
        unreachable = self.api is not None and self.api.socket_trouble
        api = "; API socket unreachable (see the log)" if unreachable else ""
        # `systemctl status` is where an operator looks after `systemctl reload` (found by review)
        refused = "; last reload refused, running the previous config (see the log)" if self.reload_refused else ""
        return f"{', '.join(links)}; {store}; workers {up}/{len(self.workers)}{api}{refused}"

    def status(self) -> Dict[str, Any]:
        """The supervisor's part of the API's `status`."""
        now = time.monotonic()
        workers = [w.status(now) for w in self.workers.values()]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(now - self.started, 1),
            "ready": self.announced_ready,
            "workers": workers,
            # the worker's connection reports are events, fresher than its heartbeat counters
            "mqtt": {name: {"client_id": client_id, **self.workers[name].counters, **self.workers[name].mqtt}
                     for name, client_id in (("ingress", self.config.thing.mqtt.client_id),
                                             ("egress", self.config.thing.mqtt.egress_client_id))},
            "rates": self.rates.rates(),
            "wear": self.wear.figures(),  # put in "store" by the `status` method
            # added to the store's totals by the `status` method
            "counters": {"restarts": sum(w.restarts for w in self.workers.values()),
                         "loop_errors": self.guard.total},
            "api": dict(self.api.counters) if self.api is not None else {},
            "reload": {"done": self.reloads, "refused": self.reload_refused, "notes": self.reload_notes,
                       "restarted": self.reload_restarted},
        }

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-validate; on a bad config keep the running one; restart changed workers."""
        if self.announced_ready:  # before READY=1 there is nothing for systemd to reload
            self.notifier.reloading()
        self.reload_refused, self.reload_notes, self.reload_restarted = None, [], []
        try:
            self._reload()
        except _StoreLost as lost:
            self.store_lost = self.reload_refused = str(lost)
            log.error("%s; stopping (exit 1: systemd starts it again, its start names the trouble)", lost)
            self.begin_shutdown("the store cannot be opened", EXIT_STORE_GONE)
        except _ReloadRefused as refused:
            self.reload_refused = str(refused)
            log.error("reload refused, still running the previous config: %s", refused)
        self.reloads += 1
        self._reload_done()

    def _reload(self) -> None:
        """Load, check and apply the config file again; _ReloadRefused when the running one stays."""
        # the key check may take up to CHECK_TIMEOUT (30 s, as long as the unit's WatchdogSec):
        # a loop blocked in a bounded wait of its own is not hung, so systemd is fed meanwhile
        # as the loop would (only if every worker was healthy as the reload began)
        healthy = self._healthy(time.monotonic())
        try:
            new = self.overrides.load(lambda: self.notifier.watchdog(time.monotonic(), healthy))
            config_file = ConfigFile(new.text)
        except (config_module.ConfigError, OSError) as exc:
            raise _ReloadRefused(str(exc)) from None
        try:
            runtime = self._usable(new)
        except _ReloadRefused:
            config_file.close()
            raise
        for warning in new.warnings:  # notes: `flashlexd reload` prints them (a misspelt key)
            self._reload_note(warning)
        for gone in keys_gone(self.runtime.config.text, new.text, str(new.path), self.overrides.keys()):
            self._reload_note(gone)
        self._apply(runtime, config_file)
        log.info("config reloaded from %s", new.path)

    def _usable(self, new: Config) -> Runtime:
        """The runtime of a loaded config, its store open; _ReloadRefused when it cannot be run."""
        if new.store.data_dir != self.runtime.config.store.data_dir:
            # the lock, the directory checks and the page check belong to the start: a store
            # moved under a running daemon could be unsafe, locked by another, or damaged
            raise _ReloadRefused(
                f"flashlex.app.db.dataPath changed ({self.runtime.config.store.data_dir} ->"
                f" {new.store.data_dir}); a new data dir takes a restart (under systemd: run"
                " `flashlexd service ... --install` first, the unit makes only the data dir it"
                " was rendered with writable)")
        if new.api.socket_group:  # applied at the next start: refused now if it would fail it
            try:
                check_group(new.api.socket_group)
            except SocketGroupError as exc:
                raise _ReloadRefused(str(exc)) from None
        store_changed = new.store != self.runtime.config.store
        if store_changed and not self.store.can_close():  # type: ignore[union-attr]
            raise _ReloadRefused("the store settings changed and a store write still waits for"
                                 " LMDB's write lock (a process stopped in a commit holds it);"
                                 " reload again once it is free")
        try:
            runtime = Runtime.from_config(new)
        except ValueError as exc:  # limits the config checks missed: refused like a bad config
            raise _ReloadRefused(str(exc)) from None
        if store_changed:
            self._reopen_store(new)
        return runtime

    def _reload_note(self, line: str) -> None:
        """A WARNING the reload's caller sees too: `flashlexd reload` prints the notes of
        `status()["reload"]`, which only the daemon's log had."""
        log.warning("%s", line)
        self.reload_notes.append(line)

    def _note_client_id(self, old: str, new: str) -> None:
        """A new ingress client id is a new broker session: what was published during the
        switch is queued in the old id's session, which nobody fetches (no drain: a clone of
        this image may still use the old id)."""
        if new != old:
            self._reload_note(f"ingress client id changed from {old!r} to {new!r}: {STRANDED}")

    def _note_broker(self, old: Thing, new: Thing) -> None:
        """thing.endpoint names another broker (`Thing.broker_identity`: not a port change):
        another broker holds another session, and what the old one queued for the client id
        stays there (its session is not lost: the ingress says so too, at its first link on the
        new one) until the device goes back. Two names may reach one broker: "if"."""
        if new.broker_identity != old.broker_identity:
            self._reload_note(f"broker changed from {old.broker_identity} to {new.broker_identity}"
                              f" (thing.endpoint): if it is another broker, the messages it queued for"
                              f" client id {old.mqtt.client_id!r} stay there until the device goes back to it")

    def _note_over_cap(self, when_full: str) -> None:
        """A cap lowered under what the store holds was taken without a word, and under
        `dropOldest` the next message dropped 2,281 of 3,000 unread messages (review "reload")."""
        try:
            stats = self.store.stats()  # type: ignore[union-attr]
        except StoreError:
            return  # the store's own line says why
        used, cap, unread = stats["used_bytes"], stats["cap_bytes"], stats["inbox_count"]
        if used <= cap:
            return
        if when_full == "dropOldest":
            what = (f"the oldest inbox messages, read or not (about {unread * (used - cap) // used} of the"
                    f" {unread} there), are dropped to make room at the next message")
        else:
            what = "no message is stored until apps acknowledge enough to bring it under"
        mib = 1024 * 1024
        self._reload_note(f"the store holds {used / mib:.1f} MiB, over the new capMegabytes"
                          f" ({cap / mib:g} MiB): {what}")

    def _reload_done(self) -> None:
        """READY=1 ends a reload only once the start has announced it (every worker up): a
        reload during start-up must not tell systemd the service is up, nor one that stops it
        that the service is up again."""
        if self.announced_ready and not self.shutting_down:
            self.notifier.ready()

    def _open_store(self, config: Config, **options: Any) -> Store:
        """The store as the supervisor uses it: a write waits at most STORE_WRITE_WAIT for the
        lock, and the watchdog is fed while one waits on the disk (`_waiting_on_disk`)."""
        store = Store.from_config(config.store, write_wait=STORE_WRITE_WAIT, **options)
        store.on_disk_wait = self._waiting_on_disk
        return store

    def _waiting_on_disk(self, seconds: float) -> None:
        """A store write the loop waits for has taken `seconds` so far (a stalling SD card):
        systemd is fed as the last pass would have (diskwait.py), for up to DISK_WAIT_LIMIT.
        A stop asked meanwhile is told to systemd at once, its timeout extended while the write
        waits (its TimeoutStopSec ran from the SIGTERM: a stall killed a stop, found by review).
        Before READY=1 (the ack journal applied at start-up) there is no watchdog yet: the
        start's timeout is extended instead, as the page check does."""
        now = time.monotonic()
        if seconds <= DISK_WAIT_LIMIT:
            self.disk_wait_over = False
            budget = self.config.supervision.stop_timeout + STOP_MARGIN
            stop = self.shutting_down or any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals)
            if self.announced_ready or stop:
                self.notifier.watchdog(now, self.healthy)
            else:
                self.notifier.still_starting(f"waiting {seconds:.0f} s for a store write (a slow disk?)")
            if stop and (self.stop_told_at is None or now - self.stop_told_at >= budget / 2):
                if self.stop_told_at is None and not self.shutting_down:
                    log.info("stop asked while a store write waits on the disk (%.0f s so far):"
                             " stopping once it returns", seconds)
                self.stop_told_at = now
                self.notifier.stopping(budget)
        elif not self.disk_wait_over:  # said once a wait: its beats may come late (re-read)
            self.disk_wait_over = True
            log.error("a store write has waited %.0f s for the disk (a failing SD card?): systemd's"
                      " watchdog (or start timeout) is no longer fed, so it restarts the daemon if"
                      " the write does not return", seconds)

    def _reopen_store(self, new: Config) -> None:
        """The store opened with the new settings; when it cannot be, opened again with the
        running ones (one environment per process: the old must close first) and the reload
        refused. Not while a called-off write still waits for LMDB's write lock: the old
        environment would stay open (`close` leaves it then) and a second one of the same files
        in this process drops its POSIX locks on them when either closes (re-read)."""
        if not self.store.can_close():  # type: ignore[union-attr]
            raise _ReloadRefused("the store's new settings need it closed, and a store write called off"
                                 " still waits for its write lock (a worker stopped inside a write?):"
                                 " reload again once it is done")
        self.store.close()  # type: ignore[union-attr]
        try:
            self.store = self._open_store(new)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the running store must reopen
            self._reopen_running_store(str(exc))
            raise _ReloadRefused(str(exc)) from None
        self.store.open_ack_journal()

    def _reopen_running_store(self, problem: str) -> None:
        """The store opened again with the running settings after the new ones failed with
        `problem`; _StoreLost when it cannot be: the daemon must not go on with it closed."""
        try:
            self.store = self._open_store(self.config)
        except Exception as again:  # noqa: BLE001 - e.g. the data dir's disk went read-only
            why = problem if str(again) == problem else f"new: {problem}; running: {again}"
            raise _StoreLost("reload: the store cannot be opened with the new settings nor again"
                             f" with the running ones ({why})") from None
        self.store.open_ack_journal()

    def _apply(self, new: Runtime, config_file: ConfigFile) -> None:
        """Swap in a new runtime: the one place a reload changes anything."""
        old, now = self.runtime, time.monotonic()
        for worker in self.workers.values():
            if worker_settings(new.config, worker.name) != worker_settings(old.config, worker.name):
                log.info("%s: settings changed, restarting it", worker.name)
                worker.stop(now, new.config.supervision.stop_timeout, restart=True)
                self.reload_restarted.append(worker.name)
        if new.socket_changed(self.bound):  # said at each reload until a restart applies it
            closed = closed_to_uids(new.config.api.socket_path, new.config.api.allow_uids)
            self._reload_note("API socket path, group or allowUids changed: they take effect at the"
                              " next restart" + (f"; {closed}" if closed else ""))
        self._note_client_id(old.config.thing.mqtt.client_id, new.config.thing.mqtt.client_id)
        self._note_broker(old.config.thing, new.config.thing)
        if (new.config.store.cap_bytes, new.config.store.when_full) != (old.config.store.cap_bytes,
                                                                        old.config.store.when_full):
            self._note_over_cap(new.config.store.when_full)  # not for a commit window's change (re-read 30)
        self.config_file.close()  # type: ignore[union-attr]
        self.config_file = config_file  # workers started from now on get the new text
        self.runtime = new
        logging.getLogger().setLevel(new.config.log_level.upper())  # the workers': at their restart
        if new.rules.consumers != old.rules.consumers or new.config.store != old.config.store:
            self.consumers.declare()
