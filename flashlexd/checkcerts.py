"""`flashlexd check`'s keys step: the certificate and private key, inspected without the network.

Certificate dates come from a small DER walk over the certificate (stdlib only: the
`cryptography` package is a test dependency, `ssl` has no public decoder for a local
certificate, and `SSLContext.get_ca_certs()` lists CA certificates only). No key material is
ever printed: only file names, dates and modes.
"""
from __future__ import annotations

import datetime
import re
import ssl
import stat
from pathlib import Path
from typing import Any, List, Optional, Tuple

from flashlexd.config import ConfigError, Thing

EXPIRY_WARNING_DAYS = 30
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----")


class Failed(Exception):
    """A step failed; the message is its one-line reason. `result` is what later steps may
    still use (the keys step's TLS context when only the key file's mode is wrong)."""

    def __init__(self, reason: str, result: Any = None):
        super().__init__(reason)
        self.result = result


def check_keys(thing: Thing, now: Optional[datetime.datetime] = None) -> Tuple[str, Optional[ssl.SSLContext]]:
    """Every key problem, in one line. Returns the TLS context for the broker step when the
    certificate and key load (an expired certificate or a too-open key still lets the broker
    step run: its answer says more)."""
    from flashlexd.mqttclient import tls_context, uses_alpn

    keys = thing.keys
    now = now or datetime.datetime.now(datetime.timezone.utc)
    problems: List[str] = []
    notes: List[str] = []
    validity = None
    try:
        validity = certificate_validity(_read(keys.cert))
    except Failed as exc:
        problems.append(f"certificate {keys.cert}: {exc}")
    key_problem = _private_key_problem(keys.private_key)
    if key_problem:
        problems.append(key_problem)

    context = None
    if not problems:  # never hand an encrypted key to OpenSSL: it would prompt on the terminal
        try:
            context = tls_context(keys, alpn=uses_alpn(thing))
            notes.append("certificate matches the private key")
        except ConfigError as exc:
            message = str(exc)
            if "KEY_VALUES_MISMATCH" in message:
                message = f"certificate {keys.cert} does not match private key {keys.private_key}"
            problems.append(message)

    if validity is not None:
        not_before, not_after = validity
        if now < not_before:
            problems.append(f"certificate {keys.cert} is not valid before {_utc(not_before)} (now is"
                            f" {_utc(now)}: is the system clock right?)")
        elif now >= not_after:
            problems.append(f"certificate {keys.cert} expired on {_utc(not_after)} (now is {_utc(now)}:"
                            f" renew it, unless the system clock is wrong)")
        else:
            days = (not_after - now).days
            soon = f" (expires in {days} day{'' if days == 1 else 's'}: renew it)" \
                if days < EXPIRY_WARNING_DAYS else ""
            notes.append(f"valid until {_utc(not_after)}{soon}")

    mode = stat.S_IMODE(keys.private_key.stat().st_mode)
    if mode & 0o077:
        problems.append(f"private key {keys.private_key} is readable by other users (mode {mode:04o}):"
                        f" run: chmod 600 {keys.private_key}")
    else:
        notes.append(f"private key mode {mode:04o}")
    if problems:
        raise Failed("; ".join(problems), result=context)
    return f"{keys.cert.name}: " + ", ".join(notes), context


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Failed(f"cannot read: {exc.strerror}") from None


def _private_key_problem(path: Path) -> Optional[str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"private key {path}: cannot read: {exc.strerror}"
    match = _PEM_KEY.search(data)
    if match is None:
        return f"private key {path}: no PEM private key in it"
    if match.group(1).startswith(b"ENCRYPTED") or b"Proc-Type: 4,ENCRYPTED" in data:
        return f"private key {path} is encrypted with a passphrase: flashlexd needs it unencrypted"
    return None


def certificate_validity(pem: bytes) -> Tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter), in UTC, of the first PEM certificate in `pem`.

    The stdlib decodes certificates only for a TLS peer (`getpeercert`), so this walks the DER
    itself (RFC 5280): Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    OPTIONAL, serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE, validity SEQUENCE {
    notBefore Time, notAfter Time }, ... }, ... }. `ssl.PEM_cert_to_DER_cert` does the base64.
    Raises `Failed` for anything that is not such a certificate."""
    match = _PEM_CERT.search(pem)
    if match is None:
        raise Failed("no PEM certificate in it")
    block = ssl.PEM_HEADER + "\n" + match.group(1).decode("ascii", "replace") + "\n" + ssl.PEM_FOOTER
    try:
        der = ssl.PEM_cert_to_DER_cert(block)
        tag, start, _ = _der_item(der, 0)
        _expect(tag, 0x30)
        tag, pos, _ = _der_item(der, start)  # tbsCertificate
        _expect(tag, 0x30)
        tag, _, end = _der_item(der, pos)
        if tag == 0xA0:  # [0] EXPLICIT version
            pos = end
        for expected in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
            tag, _, pos = _der_item(der, pos)
            _expect(tag, expected)
        tag, pos, _ = _der_item(der, pos)  # validity
        _expect(tag, 0x30)
        not_before, pos = _der_time(der, pos)
        not_after, _ = _der_time(der, pos)
    except (ValueError, IndexError):
        raise Failed("not a valid X.509 certificate (PEM/DER decoding failed)") from None
    return not_before, not_after


def _der_item(der: bytes, offset: int) -> Tuple[int, int, int]:
    """(tag, content start, content end) of the DER item at `offset`."""
    tag, length = der[offset], der[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or offset + count > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[offset:offset + count], "big")
        offset += count
    if offset + length > len(der):
        raise ValueError("DER item runs past the end")
    return tag, offset, offset + length


def _expect(tag: int, expected: int) -> None:
    if tag != expected:
        raise ValueError(f"DER tag {tag:#x}, expected {expected:#x}")


def _der_time(der: bytes, offset: int) -> Tuple[datetime.datetime, int]:
    """A UTCTime (YYMMDDHHMMSSZ, 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    tag, start, end = _der_item(der, offset)
    text = der[start:end].decode("ascii")
    if tag == 0x17 and len(text) == 13:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == 0x18 and len(text) == 15):
        raise ValueError("not an RFC 5280 time")
    if not text.endswith("Z") or not text[:-1].isdigit():
        raise ValueError("not an RFC 5280 time")
    moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    return moment, end


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
