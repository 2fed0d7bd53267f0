"""The Client's call lock: a call from the thread already in one is refused at once, and no
exception a signal handler raises leaves it held (found by review and re-reads: a signal
handler's call hung the app, and a lock of Python code was left held by a Ctrl-C)."""
from __future__ import annotations

import signal
import sys
import threading
import time

import pytest

from flashlexd.client import connect
from flashlexd.client.calllock import REENTERED, CallLock

try:
    from test_ipc_server import harness  # noqa: F401
except ImportError:  # tests run as a package
    from tests.test_ipc_server import harness  # noqa: F401,F811


def test_a_call_inside_a_call_on_the_same_thread_is_refused() -> None:
    lock = CallLock()
    with lock.held():
        with pytest.raises(RuntimeError, match="from inside another call"):
            with lock.held():
                pass
    with lock.held():  # still usable
        pass
    assert REENTERED.startswith("a flashlexd Client call")


class Interrupted(BaseException):
    """What a signal handler raises (as SIGINT's raises KeyboardInterrupt)."""


@pytest.mark.skipif(sys.version_info < (3, 10), reason="before 3.10 CPython may skip a with statement's"
                    " exit when a signal handler raises (bpo-29988): no lock taken by `with` holds there")
def test_exceptions_from_a_signal_storm_never_leave_the_lock_held(harness) -> None:
    """The main thread calls under a SIGALRM every 0.7 ms whose handler raises, while three
    threads call on the same Client: with the lock in Python code, an exception between two of
    its lines left it held, the others hung and the main thread's every call was refused."""
    fx = connect(harness.path, timeout=10)
    stop, hung = threading.Event(), []

    def other() -> None:
        while not stop.is_set():
            try:
                fx.status()
            except Exception:  # noqa: BLE001 - a cut call is not what this test looks at
                pass

    threads = [threading.Thread(target=other, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    armed = [False]

    def interrupt(signum, frame):
        if armed[0]:
            raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    refused = interrupted = 0
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0007, 0.0007)
        end = time.monotonic() + 8
        while time.monotonic() < end:
            try:
                armed[0] = True
                try:
                    fx.status()
                finally:
                    armed[0] = False
            except Interrupted:
                interrupted += 1
            except RuntimeError as exc:
                refused += REENTERED in str(exc)
            except Exception:  # noqa: BLE001 - a cut call
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        stop.set()
        for thread in threads:
            thread.join(15)
            if thread.is_alive():
                hung.append(thread.name)
    assert interrupted > 20 and not hung and refused == 0, (interrupted, hung, refused)
    assert fx.status()["inbox"]["count"] == 0
    fx.close()


def test_a_waiter_interrupted_leaves_nothing_held() -> None:
    """A Ctrl-C while queued (the main thread, waiting for another thread's call) must leave
    nothing behind: its next call is no re-entry, and the lock is free once the other is done."""
    lock = CallLock()
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock.held():
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(5)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            with lock.held():
                pass
    finally:
        signal.signal(signal.SIGALRM, previous)
    release.set()
    thread.join(5)
    started = time.monotonic()
    with lock.held():
        pass
    assert time.monotonic() - started < 1


def test_a_handler_calling_while_its_thread_waits_gets_its_turn() -> None:
    """A signal handler's call while its thread waits for another thread's call is no re-entry:
    it waits its turn (the Python lock's queue of turns hung here: the handler waited behind its
    own thread's place; found by re-read)."""
    lock, order = CallLock(), []
    holding = threading.Event()

    def holder() -> None:
        with lock.held():
            holding.set()
            time.sleep(0.4)  # the other thread's call under way
            order.append("holder")

    def handler(signum, frame):
        with lock.held():
            order.append("handler")

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(5)
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # while this thread waits below
        started = time.monotonic()
        with lock.held():
            order.append("main")
    finally:
        signal.signal(signal.SIGALRM, previous)
    thread.join(5)
    assert time.monotonic() - started < 3 and sorted(order) == ["handler", "holder", "main"], order
