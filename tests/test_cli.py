"""The command line: help, version, `python -m flashlexd`, the journald log format, packaging."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flashlexd import __version__

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "flashlexd", "--help"],
    [sys.executable, "-m", "flashlexd", "run", "--help"],
    [str(Path(sys.executable).parent / "flashlexd"), "--help"],
    [str(Path(sys.executable).parent / "flashlexctl"), "--help"],
])
def test_every_command_has_help(argv):
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.parametrize("tool", ["flashlexd", "flashlexctl"])
def test_version(tool):
    result = run(str(Path(sys.executable).parent / tool), "--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_missing_config_file_is_one_line_and_exit_2(tmp_path):
    result = run(sys.executable, "-m", "flashlexd", "run", "--config", str(tmp_path / "nope.yml"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nope.yml" in result.stderr
    assert "Traceback" not in result.stderr


def test_log_lines_carry_syslog_priorities_under_systemd():
    code = ("import logging; from flashlexd import logs; logs.setup('info', 'flashlexd');"
            "logging.getLogger('x').error('boom'); logging.getLogger('x').info('fine')")
    result = run(sys.executable, "-c", code, env={"INVOCATION_ID": "abc", "PATH": "/usr/bin"})
    assert result.stderr.splitlines() == ["<3>flashlexd: boom", "<6>flashlexd: fine"]


def test_plain_install_ships_the_client_as_a_subpackage(tmp_path):
    """`pip install .` (not editable) maps client/ to flashlexd.client."""
    result = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                 "--target", str(tmp_path / "site"), str(ROOT))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "flashlexd" / "client" / "__init__.py").exists()
    assert (tmp_path / "site" / "flashlexd" / "ipc" / "server.py").exists()


@pytest.mark.parametrize("argv, config", [
    (["run", "--config", "/a.yml"], "/a.yml"), (["run", "-c=/a.yml"], "/a.yml"), (["run", "-c/a.yml"], "/a.yml"),
    (["run", "--conf=/a.yml"], "/a.yml"), (["run", "--c", "/a.yml"], "/a.yml"),
    (["run", "-c", "/a.yml", "-c", "/b.yml"], "/b.yml"), (["run", "--data-dir", "/d"], None),
    (["run", "--config", "/a.yml", "--log-level", "debug", ""], "/a.yml")])
def test_the_reload_command_reads_a_daemons_config_as_run_did(argv, config):
    """`flashlexd reload` compares its --config with the daemon's; read by hand, `-c=X` was
    taken for `=X`, the first of two for the one run used, and `--conf=X` not at all (found by
    re-read)."""
    from flashlexd.cli import run_config
    assert run_config(argv) == config
