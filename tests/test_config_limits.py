"""Configs of any size reach the workers; oversized configs and YAML bombs are refused at once.

The workers get the config text the supervisor validated through an inherited sealed memfd, so
its size is no longer bounded by one SEQPACKET datagram (a 64 KiB config used to crash-loop the
workers). Over 1 MiB, or with any YAML anchor or alias (the FlashLex format has none), a config
is one line and exit 2 from `run`; `check` fails its config step with the same line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashlexd.channel import ConfigFile, read_inherited_config
from flashlexd.config import ConfigError, load
from flashlexd.configtext import MAX_CONFIG_BYTES
from tests.broker import wait_for
from tests.chaos.conftest import wait_ready
from tests.daemon import Daemon

# 1.6 KB that expands to 9 ** 9 strings when aliases are followed ("billion laughs")
ALIAS_BOMB = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) \
    + "flashlex:\n  thing:\n    name: *i\n"


def flashlexd(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlexd", *argv], capture_output=True, text=True,
                          timeout=60)


def with_comments(config: Path, size: int) -> Path:
    """`config` padded with comment lines to `size` bytes or a little more."""
    text = config.read_text()
    line = "# " + "padding " * 12 + "\n"
    padded = config.with_name("padded.yml")
    padded.write_text(text + line * ((size - len(text)) // len(line) + 1))
    return padded


def test_workers_run_a_config_over_64_kib(daemon_config: Path, tmp_path: Path) -> None:
    config = with_comments(daemon_config, 256 * 1024)
    daemon = Daemon(config, tmp_path / "run").start()
    try:
        status = wait_ready(daemon, 30)
        assert [w["state"] for w in status["workers"]] == ["ready"] * 3
        assert "no config" not in daemon.output()
    finally:
        daemon.stop()


def test_a_config_over_1_mib_is_one_line_and_exit_2(daemon_config: Path) -> None:
    config = with_comments(daemon_config, MAX_CONFIG_BYTES + 1)
    assert config.stat().st_size > MAX_CONFIG_BYTES
    result = flashlexd("run", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "over the limit of 1048576 bytes" in result.stderr
    exactly = with_comments(daemon_config, 0)
    exactly.write_bytes(exactly.read_bytes()[:MAX_CONFIG_BYTES].rsplit(b"\n", 1)[0] + b"\n")
    load(str(exactly))  # at the limit: fine


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 2000
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load(str(bomb))
    took = time.perf_counter() - started
    assert took < 0.1, f"the loader took {took * 1000:.0f} ms"
    assert str(caught.value) == f"{bomb}: line 1: YAML anchor &a is not allowed (FlashLex configs use" \
                                " no anchors or aliases)"

    started = time.perf_counter()
    result = flashlexd("run", "--config", str(bomb))
    took_run = time.perf_counter() - started
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "YAML anchor &a is not allowed" in result.stderr and "Traceback" not in result.stderr
    assert took_run < 5, f"flashlexd run took {took_run:.1f} s"  # interpreter start included
    print(f"\nalias bomb: refused by the loader in {took * 1000:.1f} ms, by `flashlexd run` (process"
          f" start to exit 2) in {took_run * 1000:.0f} ms")

    result = flashlexd("check", "--config", str(bomb))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"FAIL config: {bomb}: line 1: YAML anchor &a is not allowed" in result.stdout


@pytest.mark.parametrize("text, expected", [
    ("flashlex:\n  thing: *nothing\n", "line 2: YAML alias *nothing is not allowed"),
    ("flashlex: &root\n  thing: {}\n", "line 1: YAML anchor &root is not allowed"),
    ("[" * 5000 + "]" * 5000 + "\n", "not valid YAML: nested too deeply"),
    # found by review: YAML kept the last silently; a second `app:` moved the daemon to a new store
    ("flashlex:\n  app: {db: {dataPath: /srv/a}}\n  thing: {}\n  app: {logLevel: info}\n",
     "line 4: key 'app' is given twice \\(first at line 2\\); YAML would keep only the last"),
    ("flashlex: {thing: {mqtt: {port: 1, port: 2}}}\n", "line 1: key 'port' is given twice"),
])
def test_aliases_anchors_and_deep_nesting_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "odd.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("*", r"\*")):
        load(str(path))


def test_a_reload_to_a_bomb_keeps_the_running_config(daemon_config: Path, tmp_path: Path) -> None:
    daemon = Daemon(daemon_config, tmp_path / "run").start()
    try:
        wait_ready(daemon, 30)
        daemon_config.write_text(ALIAS_BOMB)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in daemon.output(), 10, "the reload refused")
        assert "YAML anchor &a is not allowed" in daemon.output()
        assert daemon.proc.poll() is None
        assert "Traceback" not in daemon.output()
    finally:
        daemon.stop()


def test_the_config_handed_to_workers_is_sealed() -> None:
    text = "flashlex: {}\n# ünï\n" * 1000
    handed = ConfigFile(text)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(handed.fd, b"changed", 0)
        assert read_inherited_config(MAX_CONFIG_BYTES, os.dup(handed.fd)) == text
        with pytest.raises(ValueError, match="over the limit of 100"):
            read_inherited_config(100, os.dup(handed.fd))
    finally:
        handed.close()


def test_a_restarted_worker_runs_the_validated_config_not_the_edited_file(
        daemon_config: Path, tmp_path: Path) -> None:
    daemon = Daemon(daemon_config, tmp_path / "run").start()
    try:
        wait_ready(daemon, 30)
        daemon_config.write_text("not: [valid")  # edited, no reload
        victim = daemon.children()["egress"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: daemon.children().get("egress") not in (None, victim), 15, "a new egress")
        status = wait_ready(daemon, 15)
        assert [w["state"] for w in status["workers"]] == ["ready"] * 3
        assert "cannot start" not in daemon.output()
    finally:
        daemon.stop()
