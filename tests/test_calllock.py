"""The Client's call lock: first come, first served, and a call from the thread already in
one refused at once (both found by review: a stream's loop starved an acking thread, and a
signal handler's call hung the app)."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from flashlexd.client.calllock import REENTERED, CallLock
from tests.broker import wait_for


def test_a_waiting_thread_goes_before_the_holder_comes_back() -> None:
    lock, order = CallLock(), []
    queued = threading.Event()

    def other() -> None:
        queued.set()
        with lock:
            order.append("other")

    with lock:
        order.append("first")
        thread = threading.Thread(target=other)
        thread.start()
        queued.wait(5)
        wait_for(lambda: lock._queue, 5, "the other thread queued")
    with lock:  # straight back, as a stream's loop comes back for its next wait
        order.append("again")
    thread.join(5)
    assert order == ["first", "other", "again"]


def test_a_call_inside_a_call_on_the_same_thread_is_refused() -> None:
    lock = CallLock()
    with lock:
        with pytest.raises(RuntimeError, match="from inside another call"):
            with lock:
                pass
    with lock:  # still usable
        pass
    assert REENTERED.startswith("a flashlexd Client call")


def test_a_waiter_interrupted_leaves_the_queue() -> None:
    """A Ctrl-C while queued (the main thread, waiting for another thread's call) must not leave
    a turn no one takes: every later call would wait for it."""
    lock = CallLock()
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
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
            with lock:
                pass
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not lock._queue
    release.set()
    thread.join(5)
    started = time.monotonic()
    with lock:
        pass
    assert time.monotonic() - started < 1
