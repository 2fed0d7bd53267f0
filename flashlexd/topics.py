"""MQTT topic filter matching, for the API's `topic=` filters, and the rules a topic must meet
to be published.

Written here rather than taken from paho (`topic_matches_sub`) so that the processes that hold
no MQTT connection (the supervisor, the expiry worker) need not import paho and ssl at all:
that import alone costs each of them about 5 MB of private memory.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Optional


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
    return filter_matcher(topic_filter)(topic) is not None


@functools.lru_cache(maxsize=256)
def filter_matcher(topic_filter: str) -> Callable[[str], Optional[re.Match[str]]]:
    """`topic_filter` compiled once into a regular expression's `fullmatch` (a match object, or
    None): consumers' reads and `status` test the filter on every record they pass, and the
    level-by-level comparison cost 0.6-0.8 us a record, twice the compiled match."""
    levels = topic_filter.split("/")
    if "#" in levels[:-1]:  # not a valid filter: `#` only as the last level
        return re.compile("(?!)").fullmatch
    words = ["[^/]*" if level == "+" else re.escape(level) for level in levels]
    if levels[-1] == "#":  # the rest: nothing (the parent level itself) or any further levels
        pattern = "/".join(words[:-1]) + "(?:/.*)?" if len(levels) > 1 else ".*"
    else:
        pattern = "/".join(words)
    no_system = "(?!\\$)" if topic_filter[:1] in ("+", "#") else ""
    return re.compile(no_system + pattern, re.DOTALL).fullmatch


# Code points no broker should be sent in a topic: U+0000 and the C0/C1 control characters
# (AWS IoT and MQTT 5 reject them; MQTT 3.1.1 section 1.5.3 says SHOULD NOT), and the Unicode
# non-characters (U+FDD0-U+FDEF and the last two code points of every plane).
_FORBIDDEN = re.compile("[\0-\x1f\x7f-\x9f\ufdd0-\ufdef"
                        + "".join(chr(plane + last) for plane in range(0, 0x110000, 0x10000)
                                  for last in (0xFFFE, 0xFFFF)) + "]")
DEFAULT_MAX_TOPIC_BYTES = 256  # AWS IoT Core's limit


def publish_topic_problem(topic: str, max_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
                          max_slashes: Optional[int] = None) -> Optional[str]:
    """Why a broker would refuse `topic` as a PUBLISH topic (one phrase naming the rule), or
    None when it is fine. Checked by `publish` so that no application can queue an entry that
    would be refused (and, under MQTT 3.1.1, cut the egress connection) at every attempt."""
    if not topic:
        return "is empty"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 (lone surrogate U+{ord(topic[exc.start]):04X} at character {exc.start})"
    bad = _FORBIDDEN.search(topic)
    if bad:
        code = ord(bad.group())
        kind = ("U+0000 (NUL)" if code == 0 else f"control character U+{code:04X}"
                if code <= 0x9F else f"Unicode non-character U+{code:04X}")
        return f"contains {kind} at character {bad.start()}"
    for wildcard in ("+", "#"):
        if wildcard in topic:
            return f"contains the wildcard {wildcard!r} (only subscriptions may use + and #)"
    if size > max_bytes:
        return f"is {size} bytes in UTF-8, over maxTopicBytes ({max_bytes})"
    if max_slashes is not None and topic.count("/") > max_slashes:
        return f"has {topic.count('/')} slashes, over the broker's {max_slashes} (AWS IoT Core's topic levels)"
    return None
