"""How a TLS link ended: with the peer's TLS close (close_notify), or without one.

A broker that closes a link (mosquitto refusing a publish, whatever its size) sends TLS's close
first; a reset, a NAT, a proxy or a crashed broker sends none. The poison search weighs a drop by
it (flashlexd/dialer.py, workers/poison.py). No paho here: `flashlexd check` imports it early.
"""
from __future__ import annotations

import ssl


def ragged_end(exc: BaseException) -> bool:
    """Whether a TLS read error is the peer's end without TLS's close: SSLEOFError, or under
    Python 3.9 with OpenSSL 3 a plain SSLError of that reason."""
    return isinstance(exc, ssl.SSLEOFError) or (
        isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None) == "UNEXPECTED_EOF_WHILE_READING")
