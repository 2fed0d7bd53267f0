"""flashlexd/hangups.py, the `flashlexd` command's entry: which command is `run`, and what a
Ctrl-C before the CLI runs does to the others."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from flashlexd.hangups import _command
from tests.daemon import default_sigint, importing


@pytest.mark.parametrize("argv, command", [
    (["run", "--config", "c.yml"], "run"),
    (["store", "recover", "--data-dir", "/d", "--to", "run"], "store"),
    (["check", "--config", "run"], "check"),
    (["service", "--dir", "/opt/fx", "--user", "run"], "service"),
    (["--version"], None),
    ([], None),
])
def test_only_the_run_command_is_run(argv, command):
    """`"run" in argv` matched an option's value: `store recover --to run` held SIGHUP and a
    Ctrl-C said "stopped before it was ready", exit 0 (found by review)."""
    assert _command(argv) == command


@pytest.mark.parametrize("argv", [["store", "verify", "--data-dir", "/nonexistent"],
                                  ["store", "recover", "--data-dir", "/nonexistent", "--to", "run"]])
def test_ctrl_c_during_another_command_ends_it_by_sigint(argv):
    """A shell script goes on with its next command when its child exits 130, and stops when
    the child dies of SIGINT, as it did before hangups.py: so the others still die of it, after
    one line instead of a traceback; never exit 0."""
    ran = subprocess.Popen([sys.executable, "-m", "flashlexd", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 15
    while not importing(ran.pid) and ran.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    ran.send_signal(signal.SIGINT)
    _out, err = ran.communicate(timeout=30)
    assert ran.returncode == -signal.SIGINT, err
    assert "Traceback" not in err and "stopped before it was ready" not in err, err


# an import held open until the test's Ctrl-C: the window is the imports, whatever the machine's pace
_HELD_IMPORT = """
import sys, time
class Held:
    def find_spec(self, name, path=None, target=None):
        if name == "argparse":
            print("importing", flush=True)
            time.sleep(30)
sys.meta_path.insert(0, Held())
from flashlexd.hangups import ctl_main
raise SystemExit(ctl_main())
"""


def test_ctrl_c_while_flashlexctl_imports_is_no_traceback():
    """Ctrl-C in flashlexctl's first ~0.2 s (its imports, before `main` catches it) printed a
    traceback; it exits 130 without one, as a Ctrl-C once `main` runs does."""
    ran = subprocess.Popen([sys.executable, "-c", _HELD_IMPORT, "status"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert ran.stdout.readline() == "importing\n"
    ran.send_signal(signal.SIGINT)
    _out, err = ran.communicate(timeout=30)
    assert ran.returncode == 130, err
    assert "Traceback" not in err, err
