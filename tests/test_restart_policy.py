"""The restart/backoff state machine, with a fake clock."""
import pytest

from flashlexd.restart import FIRST_DELAY, STABLE_AFTER, CrashLoop, RestartPolicy


def test_backoff_doubles_per_consecutive_failure_up_to_the_cap():
    policy = RestartPolicy(max_delay=1.0, limit=100, window=60)
    delays = [policy.next_delay(now=float(i), started_at=float(i)) for i in range(6)]
    assert delays == [FIRST_DELAY, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_resets_after_a_stable_run():
    policy = RestartPolicy(max_delay=30, limit=100, window=1)
    policy.next_delay(now=0, started_at=0)
    policy.next_delay(now=1, started_at=1)
    assert policy.next_delay(now=100, started_at=100 - STABLE_AFTER) == FIRST_DELAY


def test_too_many_failures_in_the_window_is_a_crash_loop():
    policy = RestartPolicy(max_delay=30, limit=3, window=60)
    for second in range(3):
        policy.next_delay(now=second, started_at=second)
    with pytest.raises(CrashLoop):
        policy.next_delay(now=3, started_at=3)


def test_failures_outside_the_window_are_forgotten():
    policy = RestartPolicy(max_delay=30, limit=2, window=10)
    policy.next_delay(now=0, started_at=0)
    policy.next_delay(now=1, started_at=1)
    policy.next_delay(now=20, started_at=15)  # the first two are older than the window
