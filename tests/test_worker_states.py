"""The supervisor's per-worker state machine (`WorkerProcess`), every transition with a fake clock.

Time is the `now` each call is given; the processes are real children (a small Python script),
so every signal the state machine sends really arrives and the exit statuses are real ones.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Iterator, List

import pytest

from flashlexd.config import Supervision
from flashlexd.restart import FIRST_DELAY, RestartLimits
from flashlexd.workerproc import KILL_GRACE, OOM_CAUSE, TRANSITIONS, BadTransition, State, WorkerProcess

TIMING = Supervision(heartbeat_seconds=1.0, heartbeat_timeout=3.0, stop_timeout=2.0,
                     backoff_max_seconds=1.0, crash_loop_restarts=2, crash_loop_window=60.0)
LIMITS = RestartLimits.from_config(TIMING)


class Child:
    """A real process standing in for a worker; `ignore` lists signals it ignores."""

    def __init__(self, ignore: List[int] = ()):  # type: ignore[assignment]
        script = ("import signal, sys, time\n"
                  f"for s in {[int(s) for s in ignore]}: signal.signal(s, signal.SIG_IGN)\n"
                  "print('up', flush=True)\n"
                  "time.sleep(60)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"up\n"  # its signal dispositions are in place
        self.pid = self.proc.pid

    def reap(self) -> int:
        """Wait for it to die; its raw wait status, as the supervisor's waitpid sees it."""
        _, status = os.waitpid(self.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.proc.stdout.close()
        return status

    def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.pid, signal.SIGKILL)
            self.reap()


@pytest.fixture
def children() -> Iterator[List[Child]]:
    made: List[Child] = []
    yield made
    for child in made:
        child.kill()


def started(children: List[Child], now: float = 0.0, ignore: List[int] = ()) -> WorkerProcess:  # type: ignore[assignment]
    worker = WorkerProcess("expiry")
    child = Child(ignore)
    children.append(child)
    worker.started(child.pid, None, now)
    worker.child = child  # type: ignore[attr-defined]
    return worker


def killed_by(status: int) -> int:
    return -os.waitstatus_to_exitcode(status)


def test_a_started_worker_is_starting_then_ready_when_it_says_so(children):
    worker = started(children, now=5.0)
    assert worker.state is State.STARTING and worker.alive and worker.started_at == 5.0
    worker.reported_state("starting")
    assert worker.state is State.STARTING
    worker.reported_state("ready")
    assert worker.state is State.READY
    worker.reported_state("stopping")  # the worker's own word does not stop it: stop() does
    assert worker.state is State.READY


def test_a_worker_heard_from_in_time_is_left_alone(children):
    worker = started(children)
    worker.reported_state("ready")
    for now in (1.0, 2.0, 2.5):
        worker.heard(now)
        assert worker.tick(now + TIMING.heartbeat_timeout, TIMING) is False
    assert worker.state is State.READY and worker.healthy(5.5, TIMING)


@pytest.mark.parametrize("ready", [False, True])
def test_a_silent_worker_is_hung_and_gets_sigabrt(children, ready):
    worker = started(children)
    if ready:
        worker.reported_state("ready")
    assert worker.tick(3.0, TIMING) is False  # exactly the timeout: not yet
    assert worker.state is not State.HUNG
    worker.tick(3.01, TIMING)
    assert worker.state is State.HUNG and not worker.healthy(3.01, TIMING)
    assert worker.kill_at == pytest.approx(3.01 + KILL_GRACE)
    status = worker.child.reap()
    assert killed_by(status) == signal.SIGABRT
    worker.exited(status, 3.2, False, LIMITS)
    assert worker.state is State.BACKOFF and worker.restarts == 1 and worker.pid is None
    assert worker.next_start == pytest.approx(3.2 + FIRST_DELAY)


def test_a_hung_worker_that_survives_sigabrt_is_killed_after_the_grace(children):
    worker = started(children, ignore=[signal.SIGABRT])
    worker.tick(4.0, TIMING)
    assert worker.state is State.HUNG
    worker.tick(4.0 + KILL_GRACE / 2, TIMING)
    assert worker.child.proc.poll() is None  # SIGABRT ignored, grace not over
    assert worker.next_deadline() == pytest.approx(4.0 + KILL_GRACE)
    worker.tick(4.0 + KILL_GRACE, TIMING)
    assert worker.kill_at is None and worker.next_deadline() is None
    assert killed_by(worker.child.reap()) == signal.SIGKILL


def test_stop_asks_with_sigterm_and_the_worker_stays_down(children):
    worker = started(children)
    worker.reported_state("ready")
    worker.stop(10.0, TIMING.stop_timeout)
    assert worker.state is State.STOPPING and worker.kill_at == 12.0
    assert worker.tick(11.0 + TIMING.heartbeat_timeout, TIMING) is False  # silence while stopping is fine
    assert worker.state is State.STOPPING
    status = worker.child.reap()
    assert killed_by(status) == signal.SIGTERM
    worker.exited(status, 11.0, False, LIMITS)
    assert worker.state is State.STOPPED and worker.restarts == 0
    assert worker.tick(100.0, TIMING) is False


def test_stop_for_restart_comes_back_at_once_and_is_no_failure(children):
    worker = started(children)
    worker.stop(10.0, TIMING.stop_timeout, restart=True)
    worker.exited(worker.child.reap(), 10.5, False, LIMITS)
    assert worker.state is State.BACKOFF and worker.next_start == 10.5
    assert worker.tick(10.5, TIMING) is True
    assert len(worker.history.failures) == 0
    assert worker.restarts == 0  # a reload's restart counted as one: `restarts 27` after 1 kill (review)


def test_a_worker_killed_for_not_stopping_for_a_restart_counts_as_restarted(children):
    """A reload's stop is no fault, but a worker that had to be killed for it (hung, or past
    stopTimeoutSeconds) is one: it was left out of `restarts` (found by re-read)."""
    worker = started(children, ignore=[signal.SIGTERM])
    worker.stop(10.0, TIMING.stop_timeout, restart=True)
    worker.tick(10.0 + TIMING.stop_timeout, TIMING)  # SIGKILL
    worker.exited(worker.child.reap(), 12.5, False, LIMITS)
    assert worker.state is State.BACKOFF and worker.restarts == 1
    assert worker.status(13.5)["last_death"] == {"how": "signal SIGKILL", "age": 1.0}  # said in status too


def test_a_worker_that_hung_just_before_a_reload_stopped_it_counts_as_restarted(children):
    """Judged hung (SIGABRT) and then stopped by a reload within its abort grace: its death was
    taken for the reload's planned stop, neither counted nor said in `status` (re-read 28)."""
    worker = started(children, ignore=[signal.SIGABRT])
    worker.reported_state("ready")
    worker.tick(TIMING.heartbeat_timeout + 0.1, TIMING)  # hung: SIGABRT (ignored here)
    assert worker.state is State.HUNG
    worker.stop(3.5, TIMING.stop_timeout, restart=True)  # its SIGTERM ends it
    worker.exited(worker.child.reap(), 3.6, False, LIMITS)
    assert worker.state is State.BACKOFF and worker.restarts == 1
    assert worker.status(4.6)["last_death"] == {"how": "signal SIGTERM, after it hung (no heartbeat)", "age": 1.0}


def test_a_worker_that_ignores_sigterm_is_killed_at_the_stop_timeout(children):
    worker = started(children, ignore=[signal.SIGTERM])
    worker.stop(10.0, TIMING.stop_timeout)
    worker.tick(11.9, TIMING)
    assert worker.child.proc.poll() is None
    worker.tick(12.0, TIMING)
    status = worker.child.reap()
    assert killed_by(status) == signal.SIGKILL
    worker.exited(status, 12.1, False, LIMITS)
    assert worker.state is State.STOPPED


def test_stopping_a_hung_worker_keeps_the_earlier_kill(children):
    worker = started(children, ignore=[signal.SIGABRT, signal.SIGTERM])
    worker.tick(4.0, TIMING)
    worker.stop(4.1, TIMING.stop_timeout)
    assert worker.state is State.STOPPING and worker.kill_at == pytest.approx(4.0 + KILL_GRACE)


@pytest.mark.parametrize("cause", ["", OOM_CAUSE])
def test_a_crash_is_backed_off_and_too_many_are_fatal(children, caplog, cause):
    """The crash loop's line says what to do when the OOM killer took the worker: a restart
    cannot help (review "lowmem": 6 kills in 6 s, the service stopped, the line silent on it)."""
    import logging
    worker = started(children)
    for attempt in range(TIMING.crash_loop_restarts):
        os.kill(worker.pid, signal.SIGKILL)
        worker.exited(worker.child.reap(), 1.0 + attempt, False, LIMITS, cause)
        assert worker.state is State.BACKOFF
        assert worker.tick(worker.next_start - 0.01, TIMING) is False
        assert worker.tick(worker.next_start, TIMING) is True
        child = Child()
        children.append(child)
        worker.started(child.pid, None, worker.next_start)
        worker.child = child
    os.kill(worker.pid, signal.SIGKILL)
    with caplog.at_level(logging.ERROR, logger="flashlexd.workerproc"):
        worker.exited(worker.child.reap(), 5.0, False, LIMITS, cause)
    assert worker.state is State.FATAL and not worker.alive
    assert ("the last death was the OOM killer's: give the service more memory" in caplog.text) == bool(cause)
    with pytest.raises(BadTransition):
        worker.started(os.getpid(), None, 6.0)
    assert worker.tick(100.0, TIMING) is False


def test_a_dead_workers_last_link_report_does_not_say_connected(children):
    """A dead egress waiting out its backoff kept `connected: True` from its last report:
    `status` showed the link up and, with offlinePublishQueueing 0, `publish` queued instead
    of refusing with egress_offline (the supervisor reads `mqtt["connected"]` for that)."""
    worker = started(children)
    worker.mqtt = {"connected": True, "error": None}
    worker.counters = {"connected": True, "sent": 5}
    os.kill(worker.pid, signal.SIGKILL)
    worker.exited(worker.child.reap(), 1.0, False, LIMITS)
    assert worker.state is State.BACKOFF
    assert worker.mqtt == {"connected": False, "error": None}
    assert worker.counters == {"connected": False, "sent": 5}  # the rest stays, for status


def test_an_exit_while_shutting_down_is_stopped_even_if_unplanned(children):
    worker = started(children)
    os.kill(worker.pid, signal.SIGKILL)
    worker.exited(worker.child.reap(), 1.0, True, LIMITS)
    assert worker.state is State.STOPPED and worker.restarts == 0


def test_no_room_to_spawn_is_retried_without_counting_a_failure():
    worker = WorkerProcess("egress")
    worker.spawn_failed(1.0, retry_in=0.5)
    assert worker.state is State.BACKOFF and worker.healthy(1.0, TIMING)
    worker.spawn_failed(1.5, retry_in=0.5)  # failed again
    assert worker.tick(1.9, TIMING) is False and worker.tick(2.0, TIMING) is True
    assert worker.restarts == 0 and len(worker.history.failures) == 0


def test_stop_during_backoff_keeps_it_down():
    worker = WorkerProcess("egress")
    worker.spawn_failed(1.0, retry_in=0.5)
    worker.stop(1.1, TIMING.stop_timeout, restart=True)  # a reload: it starts with the new config
    assert worker.state is State.BACKOFF
    worker.stop(1.2, TIMING.stop_timeout)  # shutdown
    assert worker.state is State.STOPPED and worker.tick(5.0, TIMING) is False


def test_a_spawned_worker_runs_the_given_function_with_its_link():
    """`spawn` itself: the process `fork` makes gets its end of the link."""
    import msgpack

    from flashlexd.channel import ConfigFile
    from flashlexd.linkmsg import Committed, decode, encode
    worker = WorkerProcess("ingress")
    config = ConfigFile("text")
    wire = msgpack.packb(encode(Committed()))
    try:
        worker.spawn(lambda link_fd, config_fd: os.fork() or os._exit(0 if os.write(link_fd, wire) else 1),
                     config.fd, 1.0)
    finally:
        config.close()
    assert worker.state is State.STARTING and worker.channel is not None
    _, status = os.waitpid(worker.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [decode(m) for m in worker.channel.receive()] == [Committed()]
    worker.channel.close()


@pytest.mark.parametrize("source", list(State))
def test_every_transition_outside_the_table_is_refused(source):
    worker = WorkerProcess("ingress")
    for target in State:
        worker.state = source
        if target in TRANSITIONS[source]:
            worker.transition(target)
            assert worker.state is target
        else:
            with pytest.raises(BadTransition):
                worker.transition(target)
            assert worker.state is source


def test_status_shows_the_state_by_name(children):
    worker = started(children, now=1.0)
    shown = worker.status(2.5)
    assert (shown["state"], shown["pid"], shown["uptime"], shown["heartbeat_age"]) == \
        ("starting", worker.pid, 1.5, 1.5)


def test_a_silent_worker_waiting_on_the_disk_is_not_hung_until_it_is_back_in_python(
        children, monkeypatch, caplog):
    """A 14 s stall of the SD card kept the ingress in its fsync: declared hung, aborted and
    killed (both waited for the write), its restart counted towards the crash loop, and the
    watchdog's pings stopped meanwhile (found by review). A worker in state D is waiting on the
    disk: said once, not hung, still healthy; silent a heartbeat timeout past the kernel's wait
    (its batch's acks after the write: aborted when looked at then, re-read 23), it is hung.
    (The state is read from /proc; here it is set, since a test cannot stall a disk at will.)"""
    import logging
    from flashlexd import workerproc
    worker = started(children)
    worker.reported_state("ready")
    state = {"letter": "D"}
    monkeypatch.setattr(workerproc, "process_state", lambda pid: state["letter"] if pid == worker.pid else "")
    with caplog.at_level(logging.WARNING, logger="flashlexd.workerproc"):
        for now in (3.5, 6.0, 9.0):
            assert worker.tick(now, TIMING) is False
            assert worker.state is State.READY and worker.healthy(now, TIMING)
    assert caplog.text.count("has sent no heartbeat for 3.5s: it waits on the disk") == 1
    state["letter"] = "R"  # back from the write, busy with its batch: a heartbeat timeout to speak
    back = 9.0 + TIMING.heartbeat_timeout
    assert worker.tick(back, TIMING) is False and worker.state is State.READY and worker.healthy(back, TIMING)
    worker.tick(back + 0.1, TIMING)  # and still silent: hung
    assert worker.state is State.HUNG and not worker.healthy(back + 0.1, TIMING)
    worker.exited(worker.child.reap(), back + 0.5, False, LIMITS)  # the SIGABRT the tick sent
    assert worker.status(back + 1.5)["last_death"] == {"how": "signal SIGABRT, after it hung (no heartbeat)",
                                                       "age": 1.0}  # status said a crash (re-read 27)


def test_a_worker_waiting_on_the_disk_spares_its_siblings_and_only_for_so_long(children, monkeypatch, caplog):
    """While one worker waited on the disk, holding the store's write lock, a sibling waiting
    for that lock went silent too and was aborted, towards the crash loop (found by re-read);
    and a worker stuck on a disk that never answers was spared for good, the watchdog fed while
    nothing was stored. Both: siblings are spared while one waits on the disk, and up to
    DISK_WAIT_LIMIT only."""
    from flashlexd import workerproc
    from flashlexd.workerproc import DISK_WAIT_LIMIT, disk_waits
    writer, sibling = started(children), started(children)
    for worker in (writer, sibling):
        worker.reported_state("ready")
    monkeypatch.setattr(workerproc, "process_state", lambda pid: "D" if pid == writer.pid else "S")
    for now in (3.5, 20.0, DISK_WAIT_LIMIT):
        waiting = disk_waits([writer, sibling], now, TIMING)
        assert waiting and all(w.tick(now, TIMING, waiting) is False for w in (writer, sibling))
        assert all(w.state is State.READY and w.healthy(now, TIMING, waiting) for w in (writer, sibling))
    late = DISK_WAIT_LIMIT + 1
    waiting = disk_waits([writer, sibling], late, TIMING)
    assert not waiting
    writer.tick(late, TIMING, waiting)
    sibling.tick(late, TIMING, waiting)
    assert writer.state is State.HUNG and sibling.state is State.HUNG


def test_the_worker_waiting_on_the_disk_is_named_when_the_loop_spares_them_all(children, monkeypatch, caplog):
    """The supervisor passes `disk_waits` into every tick: the waiting worker's own line was
    skipped then, so no line named it (found by re-read)."""
    import logging
    from flashlexd import workerproc
    from flashlexd.workerproc import disk_waits
    writer = started(children)
    writer.reported_state("ready")
    monkeypatch.setattr(workerproc, "process_state", lambda pid: "D")
    with caplog.at_level(logging.WARNING, logger="flashlexd.workerproc"):
        assert writer.tick(5.0, TIMING, disk_waits([writer], 5.0, TIMING)) is False
    assert "expiry has sent no heartbeat for 5.0s: it waits on the disk" in caplog.text
