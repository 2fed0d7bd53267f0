"""The restart/backoff decisions, with a fake clock."""
from flashlexd.restart import FIRST_DELAY, STABLE_AFTER, RestartHistory, RestartLimits


def test_backoff_doubles_per_consecutive_failure_up_to_the_cap():
    history, limits = RestartHistory(), RestartLimits(max_delay=1.0, limit=100, window=60)
    delays = [history.next_delay(float(i), float(i), limits) for i in range(6)]
    assert delays == [FIRST_DELAY, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_resets_after_a_stable_run():
    history, limits = RestartHistory(), RestartLimits(max_delay=30, limit=100, window=1)
    history.next_delay(0, 0, limits)
    history.next_delay(1, 1, limits)
    assert history.next_delay(100, 100 - STABLE_AFTER, limits) == FIRST_DELAY


def test_too_many_failures_in_the_window_is_a_crash_loop():
    history, limits = RestartHistory(), RestartLimits(max_delay=30, limit=3, window=60)
    for second in range(3):
        assert history.next_delay(second, second, limits) is not None
    assert history.next_delay(3, 3, limits) is None
    assert history.describe(limits) == "4 failures in 60s"


def test_failures_outside_the_window_are_forgotten():
    history, limits = RestartHistory(), RestartLimits(max_delay=30, limit=2, window=10)
    history.next_delay(0, 0, limits)
    history.next_delay(1, 1, limits)
    assert history.next_delay(20, 15, limits) is not None  # the first two are older than the window


def test_new_limits_apply_to_the_history_kept_so_far():
    """A reload changes the limits, not the failures already counted."""
    history = RestartHistory()
    for second in range(3):
        history.next_delay(second, second, RestartLimits(max_delay=30, limit=5, window=60))
    assert history.next_delay(3, 3, RestartLimits(max_delay=30, limit=3, window=60)) is None
    assert history.next_delay(4, 4, RestartLimits(max_delay=0.15, limit=100, window=60)) == 0.15


def test_the_backoff_stays_at_its_cap_however_many_failures_came_in_a_row():
    """A worker dying 9 s after each start (under STABLE_AFTER) with crashLoopWindowSeconds 30
    never makes a crash loop, so its failures in a row grow without end: at the 1,024th (~11 h)
    the delay overflowed a float, the supervisor's pass raised, and the worker was neither
    restarted nor declared FATAL: the daemon hung (found by review)."""
    history, limits = RestartHistory(), RestartLimits(max_delay=30.0, limit=5, window=30.0)
    now = 0.0
    for _ in range(1100):
        started = now
        now += 9.0
        delay = history.next_delay(now, started, limits)
        assert delay is not None and delay <= 30.0
        now += delay
    assert delay == 30.0
