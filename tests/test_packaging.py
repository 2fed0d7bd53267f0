"""`flashlexd service` output is accepted by the tools that will read it on a device."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FLASHLEXD = str(Path(sys.executable).parent / "flashlexd")


def service(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLASHLEXD, "service", *args], capture_output=True, text=True, timeout=30)


def test_rendered_unit_passes_systemd_analyze_verify(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text("flashlex: {}\n")
    rendered = service("--dir", str(tmp_path), "--venv", sys.prefix, "--config", str(config),
                       "--user", "root")
    assert rendered.returncode == 0 and rendered.stderr == ""
    unit = tmp_path / "flashlexd.service"
    unit.write_text(rendered.stdout)
    assert f"ExecStart={sys.prefix}/bin/flashlexd run --config {config}" in rendered.stdout
    assert "{{" not in rendered.stdout
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"})
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


@pytest.mark.skipif(not shutil.which("rsyslogd"), reason="rsyslog is installed by make test")
def test_rsyslog_rule_is_valid(tmp_path):
    rule = tmp_path / "flashlexd.conf"
    rule.write_text(service("--dir", str(tmp_path), "--rsyslog").stdout)
    check = subprocess.run(["rsyslogd", "-N1", "-f", str(rule)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "/var/log/flashlexd.log" in rule.read_text() and "stop" in rule.read_text()


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate is installed by make test")
def test_logrotate_file_is_accepted_and_reopens_rsyslog(tmp_path):
    conf = tmp_path / "flashlexd"
    conf.write_text(service("--dir", str(tmp_path), "--logrotate").stdout)
    check = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    text = conf.read_text()
    for directive in ("daily", "rotate 7", "maxage 7", "compress", "postrotate"):
        assert directive in text


def test_install_writes_the_unit_in_place(tmp_path):
    result = service("--dir", "/opt/fx", "--user", "pi", "--install", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "etc/systemd/system/flashlexd.service"
    assert "User=pi" in unit.read_text() and oct(unit.stat().st_mode & 0o777) == "0o644"
    assert "next: systemctl enable --now flashlexd" in result.stderr
    assert result.stdout == ""
