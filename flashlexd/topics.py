"""MQTT topic filter matching, for the API's `topic=` filters.

Written here rather than taken from paho (`topic_matches_sub`) so that the processes that hold
no MQTT connection (the supervisor, the expiry worker) need not import paho and ssl at all:
that import alone costs each of them about 5 MB of private memory.
"""
from __future__ import annotations


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
