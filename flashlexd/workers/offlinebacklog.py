"""What the egress drains at `drainingFrequency` (the FlashLex SDK's offline queue): the outbox
entries queued while its link was down, as ranges of outbox ids, known across its restarts.

One mark used to say it all: the last id queued while the link was up. A stop or a drop in the
middle of a drain could not say both "the backlog is not drained yet" and "what came after it
was queued online", so it said the first, and everything queued online since drained at the
backlog's rate after the restart (a backlog of 400 held back 1,003 entries at 2/s, then 2,628
after ten restarts; review "compat"). Ranges say both. The store keeps them
(`Store.backlog_ranges`), and the one mark still as an earlier release reads it (the oldest
range's start: after a rollback the outage's rest drains slowly, with what came after it).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

Range = Tuple[int, int]  # (after, through]: the outbox ids after `after` up to `through`
MAX_RANGES = 16  # more (a link dropping in every drain): the two closest are taken as one


class OfflineBacklog:
    """The ranges still to drain, and the last id known queued online."""

    def __init__(self, queued_online_through: Optional[int], ranges: List[Range]) -> None:
        # None: never noted (a first start): all the outbox holds is an outage's backlog
        self.queued_online_through = queued_online_through
        self.ranges = list(ranges)

    def holds(self, cursor: int) -> bool:
        """Whether the entry after `cursor` (the newest id sent) is in the backlog."""
        return any(after <= cursor < through for after, through in self.ranges)

    def left(self, cursor: int) -> int:
        """Ids of the backlog after `cursor`, at most (acknowledged ones are gone)."""
        return sum(max(0, through - max(cursor, after)) for after, through in self.ranges)

    def link_down(self, cursor: int, last_id: int) -> None:
        """What is queued from now is queued while the link is down; what the drain has not
        reached yet stays backlog."""
        self.ranges = [(after, through) for after, through in self.ranges if cursor < through]
        self.queued_online_through = last_id

    def link_up(self, last_id: int, outbox_empty: bool) -> None:
        """What was queued since the link went down is backlog, after what is left of earlier ones."""
        if outbox_empty:
            self.ranges = []
            return
        since = self.queued_online_through or 0
        if last_id > since:
            self.ranges.append((since, last_id))
        while len(self.ranges) > MAX_RANGES:  # the fewest entries queued online taken with them
            gaps = [(later[0] - earlier[1], i) for i, (earlier, later) in enumerate(zip(self.ranges, self.ranges[1:]))]
            _, i = min(gaps)
            self.ranges[i:i + 2] = [(self.ranges[i][0], self.ranges[i + 1][1])]
