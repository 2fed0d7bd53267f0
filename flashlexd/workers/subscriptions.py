"""The ingress's topic filters on each link, and those a broker refuses by closing the link.

RabbitMQ 3.10 (MQTT 3.1.1) refuses a SUBSCRIBE outside the user's permissions by closing the
link, without a SUBACK. Asked for with the others, one refused filter kept every configured
filter from being received, the thing's main topic included, link after link (found by review:
a bad `subscriptions` entry took the whole ingress offline). So after a link closed while a
SUBSCRIBE was unanswered, the next link asks for each filter in a SUBSCRIBE of its own, in
order: a broker answers a link's SUBSCRIBEs in turn, so the first left unanswered by a second
such close in a row is the suspect. A path reset (a NAT, Wi-Fi roaming) right after CONNACK
looks the same and would make the first filter, the main topic, the suspect: so the suspect is
left out of the next link and asked for alone once every other filter is answered, and only a
close at that SUBSCRIBE, alone in flight, makes it refused. A refused filter is left out of
later links, named in `status`, and asked for again the same way once a link has lived
`stableConnectionTimeSecond`, then at doubling intervals up to RETRY_MAX_SECONDS, counted from
each ask across links: a policy mended in the cloud is taken up without a restart, at the cost
of one link each time it is not. A broker that refuses in its SUBACK (MQTT 5's reason codes,
mosquitto, AWS IoT Core) costs no link: such a filter is asked for at each connect, as before.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from flashlexd.mqttv5 import reason_name
from flashlexd.quotas import FILTERS_PER_SUBSCRIBE

log = logging.getLogger(__name__)

RETRY_MAX_SECONDS = 3600.0


class Subscriptions:
    """What to SUBSCRIBE at a connect, what each SUBACK granted, and the filters left out (a
    suspect, or refused by a closed link) with when each is asked for again."""

    def __init__(self, topics: Sequence[str], first_retry_seconds: float):
        self.topics = list(topics)
        self.first_retry = max(1.0, first_retry_seconds)
        self.codes: Dict[str, Any] = {}  # filter -> the reason code its SUBACK gave, this link
        # filter -> (asked again at, the wait before it): a wait of 0 is a suspect, asked for
        # as soon as the link's other filters are answered; more, a filter refused so
        self._left_out: Dict[str, Tuple[float, float]] = {}
        self.probing: Optional[str] = None  # the filter asked for again on this link

    def at_connect(self, isolate: bool, now: float) -> List[List[str]]:
        """The SUBSCRIBEs of a new link, each a list of filters: one filter each when the last
        link closed at a SUBSCRIBE (`isolate`), to tell which one the broker refuses."""
        self.codes, self.probing = {}, None
        for topic, (at, wait) in self._left_out.items():  # a refused one: on a link that lived a while
            self._left_out[topic] = (max(at, now + self.first_retry) if wait else now, wait)
        wanted = [t for t in self.topics if t not in self._left_out]
        size = 1 if isolate else FILTERS_PER_SUBSCRIBE
        return [wanted[at:at + size] for at in range(0, len(wanted), size)]

    def link_closed(self, unanswered: List[List[str]], closes_in_a_row: int, now: float) -> None:
        """A link closed with these SUBSCRIBEs unanswered (in the order sent). The filter asked
        for again, alone in flight, is refused (again); else the first, alone in its SUBSCRIBE,
        is the suspect at the second such close in a row."""
        asked, self.probing = self.probing, None
        if not unanswered or len(unanswered[0]) != 1:
            return
        (first,) = unanswered[0]
        if first == asked:
            wait = min(max(self.first_retry, 2 * self._left_out[first][1]), RETRY_MAX_SECONDS)
            if self._left_out[first][1]:
                log.info("the broker still refuses the subscription to %s: asking again in %.0fs", first, wait)
            self._left_out[first] = (now + wait, wait)
        elif closes_in_a_row >= 2 and first not in self._left_out:
            self._left_out[first] = (now, 0.0)

    def due(self, now: float) -> Tuple[Optional[str], float]:
        """A left-out filter to ask for again now (None if none), and when the next one is due."""
        if self.probing is not None or not self._left_out:
            return None, float("inf")
        topic, (at, _) = min(self._left_out.items(), key=lambda item: item[1][0])
        return (topic, float("inf")) if at <= now else (None, at)

    def asked(self, topic: str) -> None:
        """Its SUBSCRIBE is on its way."""
        self.probing = topic

    def answered(self, filters: Sequence[str], reason_codes: Sequence[Any]) -> None:
        """A SUBACK of this link: its codes kept. A filter asked for again is subscribed from
        now on, or, refused in the SUBACK, asked for at each connect as any such filter."""
        self.codes.update(zip(filters, reason_codes))
        asked = self.probing
        if asked is None or asked not in filters:
            return
        self.probing = None
        _, wait = self._left_out.pop(asked)
        if wait and not self.codes[asked].is_failure:
            log.info("the broker now grants the subscription to %s", asked)

    def report(self) -> Tuple[List[List[Any]], Optional[str]]:
        """What `status` shows: the filters granted (topic, QoS), and the error naming those
        refused, None when none is."""
        granted = [[t, self.codes[t].value] for t in self.topics
                   if t in self.codes and not self.codes[t].is_failure]
        refused = [f"{t} ({reason_name(self.codes[t])})" for t in self.topics
                   if t in self.codes and self.codes[t].is_failure]
        refused += [f"{t} (it closed the link at its SUBSCRIBE: the others are subscribed without it, and it"
                    " is asked for again from time to time)" for t in self.topics if self._left_out.get(t, (0, 0))[1]]
        # a grant of QoS 0 passed as healthy: at most once, an outage's messages lost (review "mqtt5")
        qos0 = [t for t in self.topics if t in self.codes and _qos0(self.codes[t])]
        problems = []
        if refused:
            problems.append(f"broker refused the subscription to {', '.join(refused)} (check the thing's policy)")
        if qos0:  # the ingress logs it (one ERROR when it is news)
            problems.append(f"broker grants only QoS 0 for {', '.join(qos0)} (asked: 1; its Maximum QoS, a"
                            f" max_qos setting, or the thing's policy): messages sent while the link is down"
                            f" are lost")
        return granted, "; ".join(problems) or None


def _qos0(code: Any) -> bool:
    """A SUBACK's grant of QoS 0 where 1 was asked (a failure is a refusal, said apart)."""
    return not code.is_failure and code.value == 0
