"""MQTT topic filter matching, for the API's `topic=` filters, and the rules a topic must meet
to be published.

Written here rather than taken from paho (`topic_matches_sub`) so that the processes that hold
no MQTT connection (the supervisor, the expiry worker) need not import paho and ssl at all:
that import alone costs each of them about 5 MB of private memory.
"""
from __future__ import annotations

import re
from typing import Optional


def valid_filter(topic: str) -> bool:
    """An MQTT topic filter: `+` a whole level, `#` only as the last level."""
    if not topic or "\0" in topic or len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return False
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` matches `topic_filter` (`+` one level, `#` the rest), per MQTT 3.1.1
    section 4.7: a filter starting with a wildcard does not match topics starting with `$`."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    filter_levels = topic_filter.split("/")
    for index, part in enumerate(filter_levels):
        if part == "#":
            return index == len(filter_levels) - 1
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(levels) == len(filter_levels)


# Code points no broker should be sent in a topic or any MQTT string: U+0000 and the C0/C1
# control characters (AWS IoT and MQTT 5 reject them; MQTT 3.1.1 section 1.5.3 says SHOULD NOT;
# mosquitto closes the link), and the Unicode non-characters (U+FDD0-U+FDEF and the last two code
# points of every plane).
_FORBIDDEN = re.compile("[\0-\x1f\x7f-\x9f\ufdd0-\ufdef"
                        + "".join(chr(plane + last) for plane in range(0, 0x110000, 0x10000)
                                  for last in (0xFFFE, 0xFFFF)) + "]")
DEFAULT_MAX_TOPIC_BYTES = 256  # AWS IoT Core's limit
BASIC_INGEST_PREFIX = "$aws/rules/"  # AWS IoT Core's Basic Ingest: $aws/rules/<rule>/<topic>
AWS_SERVICE_PREFIX = "$aws/"  # the only topics beginning with '$' that AWS IoT Core takes


def string_problem(text: str) -> Optional[str]:
    """Why a broker would close the link over `text` in any MQTT string (a topic, a property),
    or None: not valid UTF-8, or a code point of _FORBIDDEN."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 (lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start})"
    bad = _FORBIDDEN.search(text)
    if bad is None:
        return None
    code = ord(bad.group())
    kind = ("U+0000 (NUL)" if code == 0 else f"control character U+{code:04X}"
            if code <= 0x9F else f"Unicode non-character U+{code:04X}")
    return f"contains {kind} at character {bad.start()}"


def publish_topic_problem(topic: str, max_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
                          max_slashes: Optional[int] = None) -> Optional[str]:
    """Why a broker would refuse `topic` as a PUBLISH topic (one phrase naming the rule), or
    None when it is fine. Checked by `publish` so that no application can queue an entry that
    would be refused (and, under MQTT 3.1.1, cut the egress connection) at every attempt.
    `max_slashes` is given on AWS IoT Core endpoints only, which bring AWS's other topic rules."""
    if not topic:
        return "is empty"
    problem = string_problem(topic)
    if problem:
        return problem
    size = len(topic.encode("utf-8"))
    for wildcard in ("+", "#"):
        if wildcard in topic:
            return f"contains the wildcard {wildcard!r} (only subscriptions may use + and #)"
    if max_slashes is not None and topic.startswith("$") and not topic.startswith(AWS_SERVICE_PREFIX):
        return f"begins with '$', reserved by AWS IoT Core (only {AWS_SERVICE_PREFIX}... may be published)"
    if topic.startswith("$SYS"):
        # the broker's own status topics: mosquitto refuses a publish to any topic beginning
        # so (`$SYSx/y` too; MQTT 5: 0x87) and under 3.1.1 drops it without a word, counted as sent
        return "begins with '$SYS', the broker's own status topics"
    counted, prefix = topic, ""
    if max_slashes is not None and topic.startswith(BASIC_INGEST_PREFIX) and topic.count("/") >= 3:
        # AWS IoT Core's limits exclude Basic Ingest's three mandatory levels ($aws/rules/<rule>/)
        prefix = "/".join(topic.split("/", 3)[:3]) + "/"
        counted = topic[len(prefix):]
        size = len(counted.encode("utf-8"))
    if size > max_bytes:
        return f"is {size} bytes in UTF-8{' after ' + prefix if prefix else ''}, over maxTopicBytes ({max_bytes})"
    if max_slashes is not None and counted.count("/") > max_slashes:
        return (f"has {counted.count('/')} slashes{' after ' + prefix if prefix else ''}, over the broker's"
                f" {max_slashes} (AWS IoT Core's topic levels)")
    return None
