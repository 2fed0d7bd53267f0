"""MQTT filter matching agrees with paho's on the spec's examples and on random cases."""
from hypothesis import given, strategies as st
from paho.mqtt.client import topic_matches_sub

from flashlexd.topics import topic_matches

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


level = st.sampled_from(["a", "b", "", "$x"])


@given(st.lists(st.sampled_from(["a", "b", "+", ""]), min_size=1, max_size=4), st.booleans(),
       st.lists(level, min_size=1, max_size=5))
def test_agrees_with_paho(filter_levels, hash_tail, topic_levels):
    topic_filter = "/".join(filter_levels + (["#"] if hash_tail else []))
    topic = "/".join(topic_levels)
    assert topic_matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)
