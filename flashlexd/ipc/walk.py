"""Unpaged `messages` and `wait` with a filter, walked one page per loop turn.

Before `paged` (README, "A topic filter that matches little"), a filtered call answered a bare
list after walking the inbox up to `limit` matches or its end: 1.7 s at 500,000 stored, all of
it inside the supervisor's single loop, which meanwhile served no other call and watched no
worker. Callers of that protocol still get a bare list, but the walk is a `Walk`: its first page
is read when the call comes, and the server reads the next one (`Pending.walk`) on each later
turn of its loop, each page SCAN_BUDGET records at most, all walks together a few pages per turn
(`server.WALK_STEPS_PER_TURN`). A `wait` that reached the inbox's end with nothing found parks,
and walks on from where it stopped whenever the inbox changes (never from its `after` again).

A named consumer's `reset` is walked the same way (`Steps`): one bounded commit per turn.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

Records = List[Dict[str, Any]]
# (limit, after) -> (a `paged` answer {"messages", "cursor"}, the last id looked at)
PageReader = Callable[[int, Optional[int]], Tuple[Dict[str, Any], Optional[int]]]


class Walk:
    """One unpaged read in progress. `walking`: the server should call `step()` on its next
    turn (False: a `wait` at the inbox's end, until `poll()`)."""

    def __init__(self, read_page: PageReader, limit: int, after: Optional[int],
                 bounded: Callable[[Records], Records], waits: bool):
        """`bounded` trims records to the response budget; `waits`: a `wait`, which answers
        only once something is found."""
        self.read_page, self.limit, self.position = read_page, limit, after
        self.bounded, self.waits = bounded, waits
        self.found: Records = []
        self.walking = True

    def step(self) -> Optional[Records]:
        """One page on from where the walk stands; the answer once there is one."""
        answer, last = self.read_page(self.limit - len(self.found), self.position)
        self.found += answer["messages"]
        kept = self.bounded(self.found)
        if len(kept) < len(self.found):  # the response is full
            self.found = kept
            return kept
        if answer["cursor"] is not None:
            self.position = answer["cursor"]
            return None
        if self.found or not self.waits:
            return self.found
        if last is not None:
            self.position = last
        self.walking = False
        return None

    def poll(self) -> None:
        """The inbox changed: a parked `wait` walks on, from the server's next turns (a walk
        under way just goes on). Not stepped here: a burst of messages would step every parked
        walk at once."""
        self.walking = True


class Steps:
    """A write done in bounded commits, one per turn of the server's loop (a named consumer's
    reset over a large store): `step()` answers None while there is more."""

    walking = True

    def __init__(self, step: Callable[[], Optional[Any]]):
        self.step = step
