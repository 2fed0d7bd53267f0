"""Is the clock the problem? The "looks unsynchronised" rules on real files and a real
`timedatectl` stand-in, and the one-line wording with the dates read from a real broker."""
from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest

from flashlexd import config as config_module
from flashlexd import timesync
from flashlexd.checkcerts import certificate_validity
from flashlexd.mqttclient import describe_error
from tests.broker import write_config


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine where systemd runs, timesyncd's flag is absent and timedatectl (a script in
    `bin`, none yet) answers what the test writes."""
    (tmp_path / "run-systemd").mkdir()
    monkeypatch.setattr(timesync, "SYSTEMD_RUNNING", tmp_path / "run-systemd")
    monkeypatch.setattr(timesync, "SYNCHRONIZED_FLAG", tmp_path / "synchronized")
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(timesync, "_timedatectl", [None, None])
    return tmp_path


def timedatectl(systemd: Path, answer: str) -> None:
    script = systemd / "bin" / "timedatectl"
    script.write_text(f"#!/bin/sh\necho {answer}\n")
    script.chmod(0o755)
    timesync._timedatectl[:] = [None, None]  # a new answer: not the one remembered for 30 s


def test_a_clock_before_the_installed_package_is_unsynchronised():
    assert timesync.unsynchronised(timesync.clock_floor() - 60) is not None
    assert timesync.clock_floor() >= timesync.RELEASE_FLOOR


def test_timesyncd_flag_or_ntp_synchronized_yes_means_synchronised(systemd: Path):
    now = timesync.clock_floor() + 60
    assert timesync.unsynchronised(now) == "NTP has not synchronised it"  # no timedatectl either
    timedatectl(systemd, "yes")
    assert timesync.unsynchronised(now) is None
    (systemd / "bin" / "timedatectl").write_text("#!/bin/sh\necho no\n")
    assert timesync.unsynchronised(now) is None  # remembered: not asked at every 2 s retry
    timedatectl(systemd, "no")
    assert timesync.unsynchronised(now) == "NTP has not synchronised it"
    timedatectl(systemd, "yes")
    assert timesync.unsynchronised(now) is None
    timedatectl(systemd, "no")
    (systemd / "synchronized").touch()
    assert timesync.unsynchronised(now) is None


def test_without_systemd_only_the_floor_tells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(timesync, "SYSTEMD_RUNNING", tmp_path / "absent")
    assert timesync.unsynchronised(timesync.clock_floor() + 60) is None


def certificate_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    exc.verify_code = code
    exc.verify_message = "certificate is not yet valid" if code == 9 else "certificate has expired"
    return exc


@pytest.mark.parametrize("code, words", [(9, "before the broker certificate's start"),
                                          (10, "after the broker certificate's end")])
def test_a_certificate_date_error_with_an_unsynchronised_clock_names_the_clock(
        broker, tmp_path: Path, systemd: Path, code: int, words: str):
    thing = config_module.load(str(write_config(tmp_path / "etc", broker))).thing
    start, end = certificate_validity(broker.certs.server.cert.read_bytes())
    message = describe_error(certificate_error(code), thing, 5)
    date = (start if code == 9 else end).strftime("%Y-%m-%d")
    assert message.startswith("TLS: the system clock says ") and f"{words} {date}" in message, message
    assert message.endswith(": waiting for time sync") and "rootCA" not in message


@pytest.mark.parametrize("code, words", [(9, "is not yet valid"), (10, "has expired")])
def test_a_certificate_date_error_with_a_synchronised_clock_blames_the_certificate(
        broker, tmp_path: Path, systemd: Path, code: int, words: str):
    """Found by review: it said "not trusted by rootCA (certificate has expired)", reading
    like a CA problem, and did not say what the clock said (it may still be wrong)."""
    (systemd / "synchronized").touch()
    thing = config_module.load(str(write_config(tmp_path / "etc", broker))).thing
    message = describe_error(certificate_error(code), thing, 5)
    assert f"or a CA certificate above it, {words} by the system clock, which says " in message, message
    assert time.strftime("%Y-%m-%d", time.gmtime()) in message
    assert "rootCA" not in message and "time sync" not in message
