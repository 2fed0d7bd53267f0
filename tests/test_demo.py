"""`make demo`, the README's first command, works and leaves nothing running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(Path(sys.prefix) != ROOT / ".venv", reason="the demo uses the repo's .venv (make test)")
def test_demo_shows_messages_flowing_both_ways_and_stops_everything():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not JSON at all" in result.stdout  # stored and listed by flashlexctl messages
    assert 'received: {"hello": "cloud"}' in result.stdout
    leftovers = subprocess.run(["pgrep", "-f", str(ROOT / ".demo")], capture_output=True, text=True)
    assert leftovers.stdout == ""


@pytest.mark.skipif(Path(sys.prefix) != ROOT / ".venv", reason="the demo uses the repo's .venv (make test)")
def test_demo_interrupted_says_so_and_stops_everything(tmp_path):
    """Ctrl-C in `make demo` cleaned up but printed "timed out waiting for flashlexd to connect"
    (found by review)."""
    out = tmp_path / "out"
    with open(out, "w") as stdout:
        demo = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo.sh")], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: "Starting the daemon" in out.read_text(), 60, "the demo to start the daemon")
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        _, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 130 and err == "interrupted: stopping what the demo started\n", err
    leftovers = subprocess.run(["pgrep", "-f", str(ROOT / ".demo")], capture_output=True, text=True)
    assert leftovers.stdout == ""


def test_a_second_demo_while_one_runs_says_so():
    """Found by review: a second `make demo` replaced the running one's keys under it, which
    then failed with a TLS error (exit 2); the second waits for none and says why."""
    import fcntl
    with open(ROOT / ".demo.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running demo holds it
        result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True,
                                text=True, timeout=30)
    assert result.returncode == 1 and "another make demo is running" in result.stderr, result


@pytest.mark.skipif(Path(sys.prefix) != ROOT / ".venv", reason="the demo uses the repo's .venv (make test)")
def test_a_demo_killed_outright_leaves_no_lock_behind(tmp_path):
    """The lock's descriptor was inherited by the broker and the daemon the demo started, so
    a demo shell killed outright (SIGKILL, the OOM killer) left them holding it and every later
    `make demo` said another was running, for good (found by re-read)."""
    import fcntl
    out = tmp_path / "out"
    with open(out, "w") as stdout:
        demo = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo.sh")], stdout=stdout,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "The cloud sends three messages" in out.read_text(), 60, "the daemon up")
        os.kill(demo.pid, signal.SIGKILL)  # the shell only: its broker and daemon live on
        demo.wait()

        def free() -> bool:
            with open(ROOT / ".demo.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False
        wait_for(free, 20, "the lock free while the orphans run")
    finally:
        orphans = subprocess.run(["pgrep", "-f", str(ROOT / ".demo")], capture_output=True, text=True)
        for pid in orphans.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
