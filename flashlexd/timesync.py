"""Say when the clock is the problem.

A device without a real-time clock (a Raspberry Pi) starts with a clock days or years behind
until NTP steps it. A TLS handshake then fails with "certificate is not yet valid", which reads
like a CA problem. When a broker certificate is not yet valid or has expired and the clock
looks unsynchronised, the error says so in one line and the connection retries every
CLOCK_RETRY_SECONDS, so it is up within seconds of the step.

"Looks unsynchronised": the clock is before this flashlexd's release (RELEASE_FLOOR, or the
installed package files' mtime when later: a clock before the files were installed is wrong),
or systemd runs, /run/systemd/timesync/synchronized (written by systemd-timesyncd) is missing
and timedatectl does not report NTPSynchronized=yes (chrony and ntpd set the kernel flag it
reads).
"""
from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Optional, Tuple

from flashlexd.config import Thing
from flashlexd.credentials import refuse_passphrase

CLOCK_RETRY_SECONDS = 2.0
RELEASE_FLOOR = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc).timestamp()
SYNCHRONIZED_FLAG = Path("/run/systemd/timesync/synchronized")
SYSTEMD_RUNNING = Path("/run/systemd/system")
_NOT_YET_VALID, _EXPIRED = 9, 10  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
_PROBE_CACHE_SECONDS = 60.0
PROBE_SECONDS = 1.0  # the certificate-date probe runs in a worker's loop: short, or no dates
_TIMEDATECTL_CACHE_SECONDS = 30.0  # it is asked at every 2 s retry otherwise
_timedatectl: list = [None, None]  # [monotonic time asked, its answer]
_probed: dict = {}  # (host, port) -> (monotonic time, validity or None)
_last: Tuple[Optional[BaseException], Optional[str]] = (None, None)


def clock_floor() -> float:
    """The earliest the clock can truly be: the release date, or the package's install time."""
    try:
        installed = os.stat(Path(__file__).with_name("__init__.py")).st_mtime
    except OSError:
        installed = 0.0
    return max(RELEASE_FLOOR, installed)


def unsynchronised(now: Optional[float] = None) -> Optional[str]:
    """Why the clock looks unsynchronised, or None when nothing says so."""
    now = time.time() if now is None else now
    if now < clock_floor():
        return "before this flashlexd was installed"
    if SYNCHRONIZED_FLAG.exists() or not SYSTEMD_RUNNING.is_dir():
        return None
    asked_at, answer = _timedatectl
    if asked_at is not None and time.monotonic() - asked_at < _TIMEDATECTL_CACHE_SECONDS:
        return answer
    answer = _ask_timedatectl()
    _timedatectl[:] = [time.monotonic(), answer]
    return answer


def _ask_timedatectl() -> Optional[str]:
    """timedatectl's view (systemd-timesyncd, chrony or ntpd via the kernel flag)."""
    try:
        answer = subprocess.run(["timedatectl", "show", "--property=NTPSynchronized", "--value"],
                                capture_output=True, text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        answer = ""
    return None if answer == "yes" else "NTP has not synchronised it"


def clock_problem(exc: BaseException, thing: Thing, timeout: float) -> Optional[str]:
    """The one-line error when `exc` is a broker certificate not yet valid (or expired) and the
    clock looks unsynchronised; None otherwise. Asked twice about the same failure (wording,
    then retry pace), it answers from memory."""
    global _last
    if _last[0] is exc:
        return _last[1]
    problem = None
    code = getattr(exc, "verify_code", None)
    if isinstance(exc, ssl.SSLCertVerificationError) and code in (_NOT_YET_VALID, _EXPIRED):
        now = time.time()
        why = unsynchronised(now)
        if why is not None:
            problem = _wording(code == _NOT_YET_VALID, now, why, thing, timeout)
    _last = (exc, problem)
    return problem


def dates_problem(exc: BaseException, where: str) -> Optional[str]:
    """The one-line error of a certificate outside its dates by a clock that looks set: the
    certificate is the likely culprit, but the line says what the clock says, which may still
    be wrong (a clock stepped by hand, NTP lying), rather than blaming rootCA."""
    code = getattr(exc, "verify_code", None)
    if code not in (_NOT_YET_VALID, _EXPIRED):
        return None
    state = "is not yet valid" if code == _NOT_YET_VALID else "has expired"
    return (f"TLS: the broker's certificate at {where}, or a CA certificate above it, {state} by"
            f" the system clock, which says {_utc(time.time(), '%Y-%m-%d %H:%M UTC')}: renew it,"
            " or set the clock if that is wrong")


def _wording(not_yet_valid: bool, now: float, why: str, thing: Thing, timeout: float) -> str:
    clock = _utc(now, "%Y-%m-%d %H:%M UTC")
    validity = broker_validity(thing, min(timeout, PROBE_SECONDS))
    if validity is None:
        state = "not yet valid" if not_yet_valid else "expired"
        return (f"TLS: the broker certificate at {thing.endpoint}:{thing.mqtt.port} is {state} by the"
                f" system clock, which says {clock} ({why}): waiting for time sync")
    start, end = validity
    if not_yet_valid:
        return (f"TLS: the system clock says {clock}, before the broker certificate's start"
                f" {_utc(start.timestamp(), '%Y-%m-%d')} ({why}): waiting for time sync")
    return (f"TLS: the system clock says {clock}, after the broker certificate's end"
            f" {_utc(end.timestamp(), '%Y-%m-%d')} ({why}): waiting for time sync")


def broker_validity(thing: Thing, timeout: float
                    ) -> Optional[Tuple[datetime.datetime, datetime.datetime]]:
    """(notBefore, notAfter) of the broker's own certificate, read over a handshake that does
    not verify it (only its dates are used, for the message); None when it cannot be read
    within `timeout`. Remembered for a minute: the connection retries every 2 s."""
    from flashlexd.checkcerts import Failed, certificate_validity
    from flashlexd.quotas import ALPN_PORT, ALPN_PROTOCOL

    where = (thing.endpoint, thing.mqtt.port)
    cached = _probed.get(where)
    if cached is not None and time.monotonic() - cached[0] < _PROBE_CACHE_SECONDS:
        return cached[1]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if thing.mqtt.port == ALPN_PORT and not thing.mqtt.use_websocket:
        context.set_alpn_protocols([ALPN_PROTOCOL])
    validity = None
    try:
        context.load_cert_chain(str(thing.keys.cert), str(thing.keys.private_key),  # TLS 1.2 asks
                                password=refuse_passphrase)
        # half the time each for TCP and TLS: the whole probe stays within `timeout`
        with socket.create_connection(where, timeout=timeout / 2) as sock, \
                context.wrap_socket(sock, server_hostname=thing.endpoint) as tls:
            der = tls.getpeercert(binary_form=True)
        if der:
            validity = certificate_validity(ssl.DER_cert_to_PEM_cert(der).encode())
    except (OSError, ValueError, Failed):  # ValueError: an encrypted key (refuse_passphrase)
        validity = None
    _probed[where] = (time.monotonic(), validity)
    return validity


def _utc(moment: float, form: str) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime(form)
