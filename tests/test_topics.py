"""MQTT filter matching agrees with paho's on the spec's examples and on random cases; the rules
a topic must meet to be published."""
import pytest
from hypothesis import given, strategies as st
from paho.mqtt.client import topic_matches_sub

from flashlexd.topics import publish_topic_problem, topic_matches

CASES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/#", "sport", True),
    ("#", "anything/at/all", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/broker", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/broker", True),
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
]


def test_spec_examples():
    for topic_filter, topic, expected in CASES:
        assert topic_matches(topic_filter, topic) is expected, (topic_filter, topic)


# regular-expression characters in a level must match only themselves (filters are compiled)
level = st.sampled_from(["a", "b", "", "$x", ".*", "a.b", "a\nb"])


@given(st.lists(st.sampled_from(["a", "b", "+", "", ".*", "a.b"]), min_size=1, max_size=4), st.booleans(),
       st.lists(level, min_size=1, max_size=5))
def test_agrees_with_paho(filter_levels, hash_tail, topic_levels):
    topic_filter = "/".join(filter_levels + (["#"] if hash_tail else []))
    topic = "/".join(topic_levels)
    assert topic_matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)


@pytest.mark.parametrize("topic, rule", [
    ("", "is empty"),
    ("dev/a\0b", "U+0000 (NUL) at character 5"),
    ("dev/a\nb", "control character U+000A at character 5"),
    ("dev/\x1f", "control character U+001F"),
    ("dev/\x7f", "control character U+007F"),
    ("dev/\x85", "control character U+0085"),
    ("dev/\x9f", "control character U+009F"),
    ("dev/\ufffe", "Unicode non-character U+FFFE"),
    ("dev/\uffff", "Unicode non-character U+FFFF"),
    ("dev/\ufdd0", "Unicode non-character U+FDD0"),
    ("dev/\ufdef", "Unicode non-character U+FDEF"),
    ("dev/\U0001ffff", "Unicode non-character U+1FFFF"),
    ("dev/\U0010fffe", "Unicode non-character U+10FFFE"),
    ("dev/\ud800", "not valid UTF-8 (lone surrogate U+D800 at character 4)"),
    ("dev/+/x", "wildcard '+'"),
    ("dev/#", "wildcard '#'"),
    ("a+b", "wildcard '+'"),
    ("x" * 257, "257 bytes in UTF-8, over maxTopicBytes (256)"),
    ("é" * 129, "258 bytes in UTF-8, over maxTopicBytes (256)"),
])
def test_publish_topic_problems_name_the_rule(topic, rule):
    problem = publish_topic_problem(topic)
    assert problem is not None and rule in problem


@pytest.mark.parametrize("topic", ["a", "dev/a b/ü/€/😀", "x" * 256, "é" * 128, "/leading/", "$aws/things/x",
                                   "dev/\xa0/\ufdcf/\ufdf0/\ufffd/\U0001fffd"])
def test_publishable_topics_pass(topic):
    assert publish_topic_problem(topic) is None


def test_the_topic_size_limit_is_a_parameter():
    assert publish_topic_problem("x" * 300, max_bytes=300) is None
    assert "over maxTopicBytes (10)" in publish_topic_problem("x" * 11, max_bytes=10)


def test_the_slash_limit_applies_only_when_given():
    eight_levels, nine_levels = "a/b/c/d/e/f/g/h", "a/b/c/d/e/f/g/h/i"
    assert publish_topic_problem(nine_levels) is None  # brokers without AWS's limit
    assert publish_topic_problem(eight_levels, max_slashes=7) is None
    assert publish_topic_problem(nine_levels, max_slashes=7) == \
        "has 8 slashes, over the broker's 7 (AWS IoT Core's topic levels)"
