"""The thing's key files, checked before the daemon starts and before a reload is accepted.

A garbage certificate, key or CA file, or a key that does not belong to the certificate, is a
bad config: one line naming the file, exit 2 (a reload keeps the running config). Without this
the workers found out one by one and crash-looped for seconds before the daemon gave up.

Loading the files into an `ssl.SSLContext` is the only stdlib way to know they work together,
and the supervisor does not load `ssl` (commit c37be55): the check runs in a short-lived
`python -m flashlexd.credentials` process instead. Measured on the development machine:
importing ssl and loading a context would cost the long-lived supervisor 0.5 MB of private
memory (1.6 MB RSS) for its whole life, and would put the private key in the memory of the one
process that talks to local clients; the subprocess costs about 85 ms once per start and per
reload, and nothing afterwards. Certificate dates are not checked here: a Pi without a
real-time clock boots in 1970, and the daemon must start anyway (`flashlexd check` reports them).

A private key readable by group or others is refused too, unless `--allow-insecure-key`.
"""
from __future__ import annotations

import os
import re
import selectors
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from flashlexd.config import ConfigError, Keys

WhileWaiting = Callable[[], Optional[float]]
CHECK_TIMEOUT = 30.0  # seconds the checking process may take (a slow SD card, a huge CA bundle)
_KEY_PATH = "flashlex.thing.keys"
# set by the supervisor for its workers when `run` has --allow-insecure-key: a link that loads
# a renewed key (mqttclient.LinkCredentials) holds it to the same rule as a start or reload
ALLOW_INSECURE_KEY_ENV = "FLASHLEXD_ALLOW_INSECURE_KEY"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----")
_ENCRYPTED = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")


def insecure_key_problem(keys: Keys) -> Optional[str]:
    """One line when the private key file may be read (or written) by group or others."""
    mode = stat.S_IMODE(keys.private_key.stat().st_mode)
    if not mode & 0o077:
        return None
    return (f"{_KEY_PATH}.privateKey: {keys.private_key} is readable by other users (mode {mode:04o}):"
            f" run chmod 600 {keys.private_key}, or start with --allow-insecure-key")


def verify(keys: Keys, allow_insecure_key: bool = False, timeout: float = CHECK_TIMEOUT,
           while_waiting: Optional[WhileWaiting] = None) -> None:
    """Raise ConfigError (one line naming the file) unless the key files load together.
    `while_waiting` is called as the check starts and again when it asks (see `_run`)."""
    problem = None if allow_insecure_key else insecure_key_problem(keys)
    if problem:
        raise ConfigError(problem)
    argv = [sys.executable, "-m", "flashlexd.credentials", str(keys.root_ca), str(keys.cert),
            str(keys.private_key)]
    try:
        returncode, output = _run(argv, timeout, while_waiting)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{_KEY_PATH}: checking the key files took over {timeout:g}s") from None
    except OSError as exc:
        raise ConfigError(f"{_KEY_PATH}: cannot check the key files: {exc.strerror or exc}") from None
    if returncode != 0:
        lines = output.decode("utf-8", "replace").strip().splitlines()
        raise ConfigError(lines[-1] if lines else f"{_KEY_PATH}: the key file check failed"
                          f" (exit {returncode})")


def stamp(keys: Keys) -> str:
    """What tells a reload that the three files changed in place: each one's identity and
    change time (a write, a copy over it, a rename onto it all move `st_ctime_ns`). Their
    contents are never read here: the supervisor, which talks to local clients, must not hold
    the private key even in freed memory."""
    stamps = []
    for path in (keys.root_ca, keys.cert, keys.private_key):
        try:
            found = path.stat()
        except OSError:
            stamps.append("unreadable")
            continue
        stamps.append(f"{found.st_dev}:{found.st_ino}:{found.st_size}:{found.st_mtime_ns}:{found.st_ctime_ns}")
    return "/".join(stamps)


def _run(argv: List[str], timeout: float, while_waiting: Optional[WhileWaiting] = None) -> Tuple[int, bytes]:
    """(exit code, output) of `argv`, waiting in select() only. `subprocess.run(timeout=)`
    polls waitpid with time.sleep, which a daemon stepped by libfaketime (the clock-step tests)
    cannot call; here the child's closed output says it is exiting, then waitpid blocks.
    `while_waiting()` returns the seconds until it wants to be called again (None: never):
    the supervisor feeds systemd's watchdog from it, as the check may outlast WatchdogSec."""
    deadline = time.monotonic() + timeout
    call_at = None if while_waiting is None else 0.0
    chunks: List[bytes] = []
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as process, selectors.DefaultSelector() as waiting:
        output = process.stdout
        assert output is not None
        waiting.register(output, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if call_at is not None and now >= call_at:
                again = while_waiting()  # type: ignore[misc]
                call_at = None if again is None else now + again
            left = deadline - now
            if left <= 0:
                process.kill()
                process.wait()
                raise subprocess.TimeoutExpired(argv, timeout)
            if not waiting.select(left if call_at is None else min(left, max(0.0, call_at - now))):
                continue
            chunk = os.read(output.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return process.wait(), b"".join(chunks)


def load_problem(root_ca: Path, cert: Path, private_key: Path) -> Optional[str]:
    """What is wrong with the three files, in one line, or None. Runs in the checking process."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_ca))
    except (ssl.SSLError, ValueError) as exc:
        return f"{_KEY_PATH}.rootCA: {root_ca} is not a PEM CA certificate ({_reason(exc)})"
    cert_pem = cert.read_bytes()
    if not _PEM_CERT.search(cert_pem):
        return f"{_KEY_PATH}.cert: {cert} is not a PEM certificate"
    try:  # the certificate alone, parsed as a trust anchor: tells a bad cert from a bad key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        return f"{_KEY_PATH}.cert: {cert} is not a PEM certificate ({_reason(exc)})"
    if _ENCRYPTED.search(private_key.read_bytes()):
        return (f"{_KEY_PATH}.privateKey: {private_key} is encrypted with a passphrase:"
                f" flashlexd needs it unencrypted")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert), str(private_key),
                                                                password=refuse_passphrase)
    except (ssl.SSLError, ValueError) as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return f"{_KEY_PATH}.privateKey: {private_key} does not match the certificate {cert}"
        return f"{_KEY_PATH}.privateKey: {private_key} is not a PEM private key ({_reason(exc)})"
    return None


def refuse_passphrase() -> bytes:
    """The `password` of every load_cert_chain: without one, OpenSSL asks for an encrypted
    key's passphrase on the terminal, and a key renewed in place as an encrypted one stalled the
    fork server until the daemon gave up (review "security")."""
    raise ValueError("encrypted with a passphrase")  # never prompt on the terminal


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc).replace("_", " ").lower()


def main(argv: List[str]) -> int:
    """`python -m flashlexd.credentials ROOT_CA CERT KEY`: exit 0, or 2 and one line on stdout."""
    if len(argv) != 3:
        print("usage: python -m flashlexd.credentials ROOT_CA CERT KEY", flush=True)
        return 2
    try:
        problem = load_problem(*(Path(a) for a in argv))
    except OSError as exc:  # removed or made unreadable since the config was read
        problem = f"{_KEY_PATH}: cannot read {exc.filename or ' or '.join(argv)}: {exc.strerror}"
    if problem:
        print(problem, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
