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


def probe_topic(topic_filter: str) -> str:
    """A topic the ingress filter matches: its wildcards, if any, filled in."""
    levels = topic_filter.split("/")
    return "/".join(PROBE_KEY if level in ("+", "#") else level for level in levels)


def is_probe(payload: bytes, topic: str, probe_topic_: str) -> bool:
    """Whether `payload` on `topic` is a probe of `probe_payload`'s exact shape on the probe's
    topic (the length first: one comparison per message received; RabbitMQ may turn a
    topic's `.` into `/`)."""
    return len(payload) == _SIZE and payload.startswith(_PREFIX) and payload.endswith(b'"}') \
        and topic.replace(".", "/") == probe_topic_.replace(".", "/")
