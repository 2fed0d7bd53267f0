"""The probe `flashlexd check` publishes to the ingress topic and reads back. A running
daemon receives it too: stored, it was a message like any other, and an app written for the
FlashLex SDK (whose bootstrap.py probed `flashlex/test`, a topic the app never read) crashed on
it at every pass (`payload["message"]`) until it expired, or for good (review "compat"). The
ingress acknowledges it and keeps it out of the store."""
from __future__ import annotations

PROBE_KEY = "flashlexd-check"
_PREFIX = b'{"' + PROBE_KEY.encode() + b'": "'
_SIZE = len(_PREFIX) + 36 + 2  # a uuid's 36 characters, then '"}'


def probe_payload() -> bytes:
    """A new probe: `{"flashlexd-check": "<uuid4>"}` (as json.dumps writes it)."""
    import uuid  # here: the workers only recognise probes
    return _PREFIX + str(uuid.uuid4()).encode() + b'"}'


def is_probe(payload: bytes) -> bool:
    """Whether `payload` is a probe of `probe_payload`'s exact shape (the length first: one
    comparison per message received)."""
    return len(payload) == _SIZE and payload.startswith(_PREFIX) and payload.endswith(b'"}')
