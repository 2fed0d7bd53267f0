"""The API's MQTT 5 params, checked like every other param: `publish`'s `properties` and
`expiry`, and the `user_property` filter of `messages` and `wait`. Stdlib only (the supervisor
serves the API without loading paho)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from flashlexd.topics import publish_topic_problem, string_problem

MAX_EXPIRY = 2 ** 32 - 1  # the Message Expiry Interval is a four-byte integer
MAX_FIELD = 65535  # an MQTT string or binary field: a two-byte length
_STRINGS = ("content_type", "response_topic")


def publish_properties(p: Any) -> Dict[str, Any]:
    """`properties` ({} when absent) with `expiry` as its message_expiry_interval. `p` is the
    call's methods._Params. A received message's properties are taken as they are, its
    message_expiry_interval as the expiry (an app echoing a message sends them back)."""
    given = p.get("properties")
    expiry = p.integer("expiry", None, 1, MAX_EXPIRY)
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise p.bad("properties", "a map of MQTT 5 properties", given)
    properties: Dict[str, Any] = {}
    for name, value in given.items():
        if name == "user_properties":
            properties[name] = _pairs(p, value)
        elif name in _STRINGS:
            properties[name] = _string(p, name, value)
        elif name == "correlation_data":
            properties[name] = _binary(p, name, value)
        elif name == "payload_format_indicator":
            if type(value) is not int or value not in (0, 1):
                raise p.bad("properties", "a payload_format_indicator of the integer 0 or 1", value)
            properties[name] = value
        elif name == "message_expiry_interval":
            if type(value) is not int or not 1 <= value <= MAX_EXPIRY or expiry not in (None, value):
                raise p.bad("properties", f"a message_expiry_interval of 1-{MAX_EXPIRY} seconds, the"
                            " same as `expiry` when both are given", value)
            expiry = value
        else:
            raise p.bad("properties", "a map with user_properties ([[name, value], ...]), content_type,"
                        " response_topic (strings), correlation_data (bytes), payload_format_indicator"
                        f" (the integer 0 or 1) or message_expiry_interval (seconds); {name!r} is not one",
                        value)
    problem = "response_topic" in properties and publish_topic_problem(properties["response_topic"], 65535)
    if problem:
        raise p.bad("properties", f"a response_topic that is a topic ({problem})", properties["response_topic"])
    if expiry is not None:
        properties["message_expiry_interval"] = expiry
    return properties


def user_property(p: Any) -> Optional[Tuple[str, str]]:
    """The `user_property` filter: [name, value], or None."""
    value = p.get("user_property")
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise p.bad("user_property", "a [name, value] pair of strings", value)
    return value[0], value[1]


def _pairs(p: Any, value: Any) -> List[List[str]]:
    if not isinstance(value, list) or not all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                              for pair in value):
        raise p.bad("properties", "user_properties as a list of [name, value] pairs of strings", value)
    for pair in value:
        problem = next(filter(None, map(_mqtt_string_problem, pair)), None)
        if problem:
            raise p.bad("properties", f"user_properties whose names and values are MQTT strings ({problem})",
                        pair)
    return [list(pair) for pair in value]


def _binary(p: Any, name: str, value: Any) -> bytes:
    """A correlation_data: bytes (a string is sent as its UTF-8)."""
    if not isinstance(value, (bytes, str)):
        raise p.bad("properties", f"a {name} of bytes", value)
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) > MAX_FIELD:
        raise p.bad("properties", f"a {name} of at most {MAX_FIELD} bytes", value)
    return data


def _string(p: Any, name: str, value: Any) -> str:
    """A content_type or response_topic: a non-empty MQTT string."""
    problem = "is empty" if value == "" else _mqtt_string_problem(value)
    if problem:
        raise p.bad("properties", f"a {name} that is an MQTT string ({problem})", value)
    return value


def _mqtt_string_problem(value: Any) -> Optional[str]:
    """Why `value` is no MQTT UTF-8 string, or None: paho cannot pack one over MAX_FIELD bytes,
    and a broker closes the link over what `string_problem` names (MQTT 5 1.5.4; mosquitto does),
    which would make the entry look like poison: the rule `publish` applies to topics."""
    if not isinstance(value, str):
        return "is not a string"
    problem = string_problem(value)
    if problem:
        return problem
    size = len(value.encode("utf-8"))
    return f"is {size} bytes in UTF-8, over {MAX_FIELD}" if size > MAX_FIELD else None
