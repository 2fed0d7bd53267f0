"""The ingress's SUBSCRIBEs and the filters a broker refuses by closing the link
(workers/subscriptions.py), on a clock the test sets: asks are seconds to an hour apart.
test_link_liveness.py has a real worker do the same against brokers that close so or reset,
and against RabbitMQ."""
from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from flashlexd.workers.subscriptions import RETRY_MAX_SECONDS, Subscriptions

TOPICS = [f"t/{n}" for n in range(10)]
GRANTED, REFUSED = ReasonCode(PacketTypes.SUBACK, identifier=1), ReasonCode(PacketTypes.SUBACK, identifier=0x80)


def suspected(subs: Subscriptions, topic: str, now: float) -> None:
    """Two links in a row closed at their SUBSCRIBEs: the second, one filter each, at `topic`."""
    subs.at_connect(False, now)
    subs.link_closed([TOPICS[:8], TOPICS[8:]], 1, now)
    sent = subs.at_connect(True, now)
    subs.link_closed(sent[sent.index([topic]):], 2, now)


def refused(subs: Subscriptions, topic: str, now: float) -> None:
    """`topic` suspected, then the next link closed at it, asked for alone."""
    suspected(subs, topic, now)
    subs.at_connect(False, now)
    assert subs.due(now)[0] == topic
    subs.asked(topic)
    subs.link_closed([[topic]], 0, now)


def grant(subs: Subscriptions, packets) -> None:
    for packet in packets:
        subs.answered(packet, [GRANTED] * len(packet))


def test_after_a_close_at_a_subscribe_each_filter_is_asked_for_alone() -> None:
    subs = Subscriptions(TOPICS, 20)
    assert subs.at_connect(False, 0) == [TOPICS[:8], TOPICS[8:]]  # AWS IoT Core's 8 a SUBSCRIBE
    assert subs.at_connect(True, 0) == [[t] for t in TOPICS]


def test_a_filter_refused_by_a_closed_link_is_found_and_left_out() -> None:
    """Asked for with the others, one refused filter (RabbitMQ closes the link) kept every
    filter from being received, link after link (found by review)."""
    subs = Subscriptions(TOPICS, 20)
    subs.at_connect(False, 0)
    subs.link_closed([TOPICS[:8], TOPICS[8:]], 1, 0)  # once: a drop (a NAT's reset looks the same)
    assert subs.at_connect(True, 1) == [[t] for t in TOPICS]
    subs.link_closed([TOPICS[:8]], 2, 2)  # several filters in it: no single suspect
    assert subs.at_connect(True, 3) == [[t] for t in TOPICS]
    subs.link_closed([[t] for t in TOPICS[3:]], 2, 4)  # t/3 the suspect
    packets = subs.at_connect(False, 5)
    assert packets == [TOPICS[:3] + TOPICS[4:9], TOPICS[9:]]
    grant(subs, packets)
    assert subs.report() == ([[t, 1] for t in TOPICS if t != "t/3"], None)  # a suspect: not said yet
    assert subs.due(5)[0] == "t/3"  # asked alone, the others answered
    subs.asked("t/3")
    subs.link_closed([["t/3"]], 0, 6)  # the broker closed the link at it: refused
    packets = subs.at_connect(False, 7)
    assert packets == [TOPICS[:3] + TOPICS[4:9], TOPICS[9:]]
    grant(subs, packets)
    granted, error = subs.report()
    assert [t for t, _ in granted] == TOPICS[:3] + TOPICS[4:]
    assert error is not None and "t/3 (it closed the link at its SUBSCRIBE" in error, error


def test_two_resets_in_a_row_take_no_filter_for_refused() -> None:
    """A reset right after CONNACK leaves the first filter, the main topic, the first one
    unanswered: two in a row made it refused, and the main topic's messages were not asked for
    until a link had lived `stableConnectionTimeSecond` (found by re-read). A suspect is asked
    for again alone as soon as the others are answered, and granted, it is back."""
    subs = Subscriptions(TOPICS, 20)
    suspected(subs, "t/0", 0)
    packets = subs.at_connect(False, 1)
    assert packets == [TOPICS[1:9], TOPICS[9:]]
    grant(subs, packets)
    assert subs.due(1)[0] == "t/0"
    subs.asked("t/0")
    subs.answered(["t/0"], [GRANTED])
    assert subs.report() == ([[t, 1] for t in TOPICS], None)
    assert subs.due(10 ** 6) == (None, float("inf")) and subs.at_connect(False, 2) == [TOPICS[:8], TOPICS[8:]]


def test_a_refused_filter_is_asked_for_again_at_doubling_intervals_and_taken_back() -> None:
    subs = Subscriptions(TOPICS, 20)
    refused(subs, "t/5", 0)
    subs.at_connect(False, 100)  # a link that has lived 20 s first
    assert subs.due(119.9) == (None, 120) and subs.due(120)[0] == "t/5"
    subs.asked("t/5")
    assert subs.due(121) == (None, float("inf"))  # one at a time
    subs.link_closed([["t/5"]], 0, 121)  # still refused: the next wait is twice as long
    subs.at_connect(False, 122)
    assert subs.due(160)[0] is None and subs.due(161)[0] == "t/5"
    subs.asked("t/5")
    subs.answered(["t/5"], [GRANTED])
    assert subs.due(10 ** 6) == (None, float("inf"))
    assert subs.at_connect(False, 400) == [TOPICS[:8], TOPICS[8:]]


def test_asks_go_on_over_links_shorter_than_the_wait() -> None:
    """Each connect put the next ask a whole wait away: with links of 15 minutes, a filter was
    asked for 6 times and then never again (found by re-read). The wait counts from the ask."""
    subs = Subscriptions(TOPICS, 20)
    refused(subs, "t/0", 0)
    now, asks = 0.0, 0
    while now < 2 * 86400:
        link_end = now + 900
        subs.at_connect(False, now)
        while True:
            topic, at = subs.due(now)
            if topic is None:
                now = min(at, link_end)
                if now == link_end:
                    break
                continue
            subs.asked(topic)
            asks += 1
            subs.link_closed([[topic]], 0, now)
            break
        now += 1
    assert asks >= 2 * 24, asks  # hourly at worst, for two days


def test_the_wait_between_asks_stops_at_an_hour() -> None:
    subs = Subscriptions(TOPICS, 20)
    refused(subs, "t/0", 0)
    now = 0.0
    for _ in range(12):
        subs.at_connect(False, now)
        now = subs.due(now)[1]
        assert subs.due(now)[0] == "t/0"
        subs.asked("t/0")
        subs.link_closed([["t/0"]], 0, now)
    subs.at_connect(False, now)
    assert subs.due(now)[1] - now == RETRY_MAX_SECONDS


def test_a_filter_refused_in_a_suback_costs_no_link_and_is_asked_at_each_connect() -> None:
    subs = Subscriptions(TOPICS[:2], 20)
    subs.at_connect(False, 0)
    subs.answered(TOPICS[:2], [GRANTED, REFUSED])
    granted, error = subs.report()
    assert granted == [["t/0", 1]] and error is not None and "t/1 (Unspecified error (0x80))" in error
    assert subs.at_connect(False, 1) == [TOPICS[:2]] and subs.due(10 ** 6)[0] is None


def test_a_filter_asked_for_again_and_refused_in_its_suback_is_told_with_its_reason() -> None:
    """A broker that answers (the device moved to one) gives the reason: it is shown, and the
    filter is asked for at each connect, as any filter refused so."""
    subs = Subscriptions(TOPICS[:2], 20)
    refused(subs, "t/1", 0)
    subs.at_connect(False, 0)
    subs.asked("t/1")
    subs.answered(["t/1"], [REFUSED])
    _, error = subs.report()
    assert error is not None and "t/1 (Unspecified error (0x80))" in error and "closed the link" not in error
    assert subs.at_connect(False, 1) == [TOPICS[:2]]


def test_a_grant_of_qos_0_only_is_an_error() -> None:
    """A broker granting QoS 0 where 1 was asked (mosquitto's max_qos 0, a CONNACK's Maximum
    QoS 0) was shown as healthy without a word, and messages sent while the link was down were
    lost (review "mqtt5": 10 of 10). The ingress logs the error once, as a refusal's."""
    qos0 = ReasonCode(PacketTypes.SUBACK, identifier=0)
    subs = Subscriptions(TOPICS[:2], 20)
    subs.at_connect(False, 0)
    subs.answered(TOPICS[:2], [GRANTED, qos0])
    granted, error = subs.report()
    assert granted == [["t/0", 1], ["t/1", 0]]
    assert error == ("broker grants only QoS 0 for t/1 (asked: 1; its Maximum QoS, a max_qos setting, or the"
                     " thing's policy): messages sent while the link is down are lost")
    subs.at_connect(False, 2)
    subs.answered(TOPICS[:2], [GRANTED, GRANTED])
    assert subs.report() == ([["t/0", 1], ["t/1", 1]], None)
