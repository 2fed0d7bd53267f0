"""The supervisor's catch-all around one pass of its loop (`loopguard.LoopGuard`)."""
import logging

from flashlexd.loopguard import LoopGuard


def _fail(guard: LoopGuard, exc: Exception) -> bool:
    try:
        raise exc
    except Exception as caught:  # noqa: BLE001 - what the supervisor's loop does
        return guard.failed(caught)


def test_a_failure_is_logged_once_with_its_traceback_and_counted(caplog):
    guard = LoopGuard(limit=5)
    with caplog.at_level(logging.INFO, logger="flashlexd.supervisor"):
        for _ in range(3):
            assert _fail(guard, KeyError("workers")) is False
        guard.passed()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "KeyError: 'workers'" in errors[0].getMessage()
    assert "recovered after 3 failed passes" in caplog.text
    assert (guard.total, guard.in_a_row) == (3, 0)


def test_a_different_error_is_logged_again(caplog):
    guard = LoopGuard(limit=5)
    with caplog.at_level(logging.ERROR, logger="flashlexd.supervisor"):
        _fail(guard, KeyError("a"))
        _fail(guard, ValueError("b"))
        _fail(guard, ValueError("b"))
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == ["KeyError: 'a'",
                                                                           "ValueError: b"]


def test_it_gives_up_only_after_the_limit_in_a_row():
    guard = LoopGuard(limit=3)
    assert [_fail(guard, OSError("x")) for _ in range(2)] == [False, False]
    guard.passed()
    assert [_fail(guard, OSError("x")) for _ in range(3)] == [False, False, True]
    assert guard.total == 5
