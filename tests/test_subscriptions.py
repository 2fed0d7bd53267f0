"""The ingress's SUBSCRIBEs and the filters a broker refuses by closing the link
(workers/subscriptions.py), on a clock the test sets: retries are minutes to an hour apart.
test_link_liveness.py has a real worker do the same against a broker that closes so, and
against RabbitMQ."""
from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from flashlexd.workers.subscriptions import RETRY_MAX_SECONDS, Subscriptions

TOPICS = [f"t/{n}" for n in range(10)]
GRANTED, REFUSED = ReasonCode(PacketTypes.SUBACK, identifier=1), ReasonCode(PacketTypes.SUBACK, identifier=0x80)


def refused_at(subs: Subscriptions, topic: str, now: float) -> None:
    """Two links in a row closed at the SUBSCRIBEs: the second, one filter each, at `topic`."""
    subs.at_connect(False, now)
    subs.link_closed([TOPICS[:8], TOPICS[8:]], 1, now)
    sent = subs.at_connect(True, now)
    subs.link_closed(sent[sent.index([topic]):], 2, now)


def test_after_a_close_at_a_subscribe_each_filter_is_asked_for_alone() -> None:
    subs = Subscriptions(TOPICS, 20)
    assert subs.at_connect(False, 0) == [TOPICS[:8], TOPICS[8:]]  # AWS IoT Core's 8 a SUBSCRIBE
    assert subs.at_connect(True, 0) == [[t] for t in TOPICS]


def test_the_first_filter_left_unanswered_by_a_second_close_in_a_row_is_left_out() -> None:
    """Asked for with the others, one refused filter (RabbitMQ closes the link) kept every
    filter from being received, link after link (found by review)."""
    subs = Subscriptions(TOPICS, 20)
    subs.at_connect(False, 0)
    subs.link_closed([TOPICS[:8], TOPICS[8:]], 1, 0)  # once: a drop (a NAT's reset looks the same)
    assert subs.at_connect(True, 1) == [[t] for t in TOPICS]
    subs.link_closed([TOPICS[:8]], 2, 2)  # several filters in it: no single suspect
    assert subs.at_connect(True, 3) == [[t] for t in TOPICS]
    subs.link_closed([[t] for t in TOPICS[3:]], 2, 4)
    assert subs.at_connect(False, 5) == [TOPICS[:3] + TOPICS[4:9], TOPICS[9:]]
    subs.answered(TOPICS[:3] + TOPICS[4:9], [GRANTED] * 8, 5)
    subs.answered(TOPICS[9:], [GRANTED], 5)
    granted, error = subs.report()
    assert [t for t, _ in granted] == TOPICS[:3] + TOPICS[4:]
    assert error is not None and "t/3 (it closed the link at its SUBSCRIBE" in error, error


def test_a_refused_filter_is_asked_for_again_at_doubling_intervals_and_taken_back() -> None:
    subs = Subscriptions(TOPICS, 20)
    refused_at(subs, "t/5", 0)
    subs.at_connect(False, 100)  # the next link: the wait counts from its connect
    assert subs.due(119.9)[0] is None and subs.due(119.9)[1] == 120
    assert subs.due(120) == ("t/5", float("inf"))
    assert subs.due(121) == (None, float("inf"))  # one at a time
    subs.link_closed([["t/5"]], 1, 121)  # still refused: the next wait is twice as long
    subs.at_connect(False, 200)
    assert subs.due(239)[0] is None and subs.due(240)[0] == "t/5"
    subs.answered(["t/5"], [REFUSED], 240)  # refused in a SUBACK: the same
    assert subs.due(319)[0] is None and subs.due(320)[0] == "t/5"
    subs.answered(["t/5"], [GRANTED], 320)
    assert subs.due(10 ** 6) == (None, float("inf"))
    assert subs.at_connect(False, 400) == [TOPICS[:8], TOPICS[8:]]


def test_the_wait_between_asks_stops_at_an_hour() -> None:
    subs = Subscriptions(TOPICS, 20)
    refused_at(subs, "t/0", 0)
    now = 0.0
    for _ in range(12):
        now = subs.due(now)[1]
        assert subs.due(now)[0] == "t/0"
        subs.link_closed([["t/0"]], 1, now)
        subs.at_connect(False, now)
    assert subs.due(now)[1] - now == RETRY_MAX_SECONDS


def test_a_filter_refused_in_its_suback_costs_no_link_and_is_asked_at_each_connect() -> None:
    subs = Subscriptions(TOPICS[:2], 20)
    subs.at_connect(False, 0)
    subs.answered(TOPICS[:2], [GRANTED, REFUSED], 0)
    granted, error = subs.report()
    assert granted == [["t/0", 1]] and error is not None and "t/1 (Unspecified error (0x80))" in error
    assert subs.at_connect(False, 1) == [TOPICS[:2]] and subs.due(10 ** 6)[0] is None
