"""The ingress's topic filters on each link, and those a broker refuses by closing the link.

RabbitMQ 3.10 (MQTT 3.1.1) refuses a SUBSCRIBE outside the user's permissions by closing the
link, without a SUBACK. Asked for with the others, one refused filter kept every configured
filter from being received, the thing's main topic included, link after link (found by review:
a bad `subscriptions` entry took the whole ingress offline). So after a link closed while a
SUBSCRIBE was unanswered, the next link asks for each filter in a SUBSCRIBE of its own, in
order: a broker answers a link's SUBSCRIBEs in turn, so the first left unanswered by a second
such close in a row is the one it refuses. That filter is left out of later links, named in
`status`, and asked for again alone, on a live link, once the link without it has been stable
(`stableConnectionTimeSecond`), then at doubling intervals up to RETRY_MAX_SECONDS: a policy
mended in the cloud is taken up without a restart, at the cost of one link each time it is not.
A broker that refuses in its SUBACK (MQTT 5's reason codes, mosquitto, AWS IoT Core) costs no
link: those filters are asked for again at each connect, as before.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from flashlexd.mqttv5 import reason_name
from flashlexd.quotas import FILTERS_PER_SUBSCRIBE

log = logging.getLogger(__name__)

RETRY_MAX_SECONDS = 3600.0


class Subscriptions:
    """What to SUBSCRIBE at a connect, what each SUBACK granted, and the filters refused by a
    closed link with when each is asked for again."""

    def __init__(self, topics: Sequence[str], first_retry_seconds: float):
        self.topics = list(topics)
        self.first_retry = max(1.0, first_retry_seconds)
        self.codes: Dict[str, Any] = {}  # filter -> the reason code its SUBACK gave, this link
        self._refused: Dict[str, Tuple[float, float]] = {}  # filter -> (asked again at, the wait before)
        self.probing: Optional[str] = None  # the refused filter asked for again on this link

    def at_connect(self, isolate: bool, now: float) -> List[List[str]]:
        """The SUBSCRIBEs of a new link, each a list of filters: one filter each when the last
        link closed at a SUBSCRIBE (`isolate`), to tell which one the broker refuses."""
        self.codes, self.probing = {}, None
        for topic, (_, wait) in self._refused.items():  # asked on a link stable that long
            self._refused[topic] = (now + wait, wait)
        wanted = [t for t in self.topics if t not in self._refused]
        size = 1 if isolate else FILTERS_PER_SUBSCRIBE
        return [wanted[at:at + size] for at in range(0, len(wanted), size)]

    def link_closed(self, unanswered: List[List[str]], closes_in_a_row: int, now: float) -> None:
        """A link closed with these SUBSCRIBEs unanswered (in the order sent): the first, alone
        in its SUBSCRIBE, is refused at the second such close in a row, or at once when it was
        a refused filter asked for again."""
        probe, self.probing = self.probing, None
        if not unanswered or len(unanswered[0]) != 1:
            return
        (suspect,) = unanswered[0]
        if suspect == probe:
            self._still_refused(suspect, now)
        elif closes_in_a_row >= 2 and suspect not in self._refused:
            self._refused[suspect] = (now + self.first_retry, self.first_retry)

    def due(self, now: float) -> Tuple[Optional[str], float]:
        """A refused filter to ask for again now (None if none), and when the next one is due."""
        if self.probing is not None or not self._refused:
            return None, float("inf")
        topic, (at, _) = min(self._refused.items(), key=lambda item: item[1][0])
        if at > now:
            return None, at
        self.probing = topic
        return topic, float("inf")

    def answered(self, filters: Sequence[str], reason_codes: Sequence[Any], now: float) -> None:
        """A SUBACK of this link: its codes kept; a refused filter asked for again and granted
        is subscribed from now on."""
        self.codes.update(zip(filters, reason_codes))
        probe = self.probing
        if probe is None or probe not in filters:
            return
        self.probing = None
        if self.codes[probe].is_failure:
            self._still_refused(probe, now)
            return
        del self._refused[probe]
        log.info("the broker now grants the subscription to %s", probe)

    def report(self) -> Tuple[List[List[Any]], Optional[str]]:
        """What `status` shows: the filters granted (topic, QoS), and the error naming those
        refused, None when none is."""
        granted = [[t, self.codes[t].value] for t in self.topics
                   if t in self.codes and not self.codes[t].is_failure]
        refused = [f"{t} ({reason_name(self.codes[t])})" for t in self.topics
                   if t in self.codes and self.codes[t].is_failure and t not in self._refused]
        refused += [f"{t} (it closed the link at its SUBSCRIBE: the others are subscribed without it, and it"
                    " is asked for again from time to time)" for t in self.topics if t in self._refused]
        if not refused:
            return granted, None
        return granted, f"broker refused the subscription to {', '.join(refused)} (check the thing's policy)"

    def _still_refused(self, topic: str, now: float) -> None:
        wait = min(self._refused[topic][1] * 2, RETRY_MAX_SECONDS)
        self._refused[topic] = (now + wait, wait)
        log.info("the broker still refuses the subscription to %s: asking again in %.0fs", topic, wait)
