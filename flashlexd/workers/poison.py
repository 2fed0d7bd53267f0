"""Which outbox entry makes the broker drop the link.

Under MQTT 3.1.1 a broker refuses a publish (too big, a topic it rejects) only by closing the
connection, and a resend on the next connection closes it again: one entry can stop the whole
outbox. So: when the link drops with entries in flight, the culprit is one of them, and the
egress sends them one at a time, whether or not earlier entries were acknowledged on that
connection (a broker acknowledges the entries before the one it refuses); an entry that is alone in
flight when the link drops `attempts` times is the culprit and goes to the dead letters. Once
that happens, or once the newest of the suspects is acknowledged (the drop had another cause),
the drain goes on at full speed.
A broker may also refuse a publish by dropping it and acknowledging the later ones (AWS IoT
Core under 3.1.1): the link watch then closes the link (`Verdict.OVERTAKEN`), and an entry
skipped so on `attempts` links in a row, each time resent first on a fresh connection (no
quota spent yet), goes to the dead letters too.
A drop that is most likely the path's counts as 1/PATH_CUTS of a drop: one without the
broker's TLS close (close_notify, which mosquitto sends when it closes a link over a publish,
whatever its size; a reset, a NAT or a proxy ending the link sends none: three such resets, the
broker taking the next CONNECT at once, dead-lettered a healthy entry alone in flight behind a
slow path), and under MQTT 5 one before the broker had all of the entry (our bytes still
queued, or not acknowledged by its TCP: Wi-Fi roaming, a NAT), which used to dead-letter a
healthy large entry in 3 cuts. Not as nothing: a broker that closes on the header of a publish
over a limit its CONNACK did not give looks the same, or one that sends no TLS close, and such
an entry would hold the outbox for good.
Pure, so the policy is unit-tested without a broker.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

PATH_CUTS = 3  # drops that are most likely the path's that count as one drop

class PoisonWatch:
    def __init__(self, attempts: int):
        self.attempts = attempts
        self.suspects_until: Optional[int] = None  # one at a time up to this entry id
        # entry id -> drops while it was alone in flight, in 1/PATH_CUTS
        self.alone_drops: Dict[int, int] = {}
        self.alone_links: Dict[int, int] = {}  # entry id -> those drops, each one (a cut too)
        # the drops that made the last culprit one: its dead letter's `attempts`, up to
        # PATH_CUTS x `attempts` when the path's cuts made them up
        self.culprit_drops = 0
        self.skips: Dict[int, int] = {}            # entry id -> links closed because it was skipped
        # the last search ended with its suspects acknowledged, no culprit: the drops that
        # started it had another cause (a clone of the client id kicking the link, the network)
        self.fruitless = False
        self._stall_search = False  # the one-at-a-time run was started by a stall, not a drop

    @property
    def single(self) -> bool:
        """One entry in flight at a time."""
        return self.suspects_until is not None

    @property
    def excuses_drops(self) -> bool:
        """Whether a drop with entries in flight is taken for an entry's doing, so that the
        reconnect backoff does not grow: always while one entry is tested alone; with several
        in flight, unless the last search found none of them guilty (then such drops are
        waited out as any other: a clone kicking the link reconnected every second for ever)."""
        return self.single or not self.fruitless

    def window(self, full: int) -> int:
        return 1 if self.single else full

    def acknowledged(self, entry_id: int) -> None:
        self.alone_drops.pop(entry_id, None)
        self.alone_links.pop(entry_id, None)
        self.skips.pop(entry_id, None)
        if self.suspects_until is not None and entry_id >= self.suspects_until:
            self.suspects_until = None
            self.fruitless = self.fruitless or not self._stall_search  # a stall says nothing of drops
            self._stall_search = False

    def answered(self, entry_id: int) -> None:
        """The broker refused a publish in its PUBACK (MQTT 5's 0x97 Quota exceeded): it answers
        the suspects, it does not drop the link over them, so the one-at-a-time run ends. (An
        entry refused so at every try, sent alone with nothing accepted between its refusals,
        was never told from a throttle: the outbox stalled for good, at 30 s pauses; re-read.)
        Unlike an acknowledgement of the newest suspect, it says nothing of what caused the
        drops: the search is not taken for fruitless (drops would no longer be excused)."""
        self.alone_drops.pop(entry_id, None)
        self.alone_links.pop(entry_id, None)
        self.skips.pop(entry_id, None)
        self.suspects_until = None
        self._stall_search = False

    def dropped(self, inflight: Sequence[int], path_cut: bool = False) -> Optional[int]:
        """The link dropped with `inflight` (entry ids, oldest first) unacknowledged; `path_cut`,
        most likely the path's doing (see above). Returns the entry to dead-letter, if one has now been
        alone at `attempts` drops."""
        if len(inflight) == 1:
            entry = inflight[0]
            self.alone_drops[entry] = self.alone_drops.get(entry, 0) + (1 if path_cut else PATH_CUTS)
            self.alone_links[entry] = self.alone_links.get(entry, 0) + 1
            if self.alone_drops[entry] >= self.attempts * PATH_CUTS:
                del self.alone_drops[entry]
                self.culprit_drops = self.alone_links.pop(entry)
                self.suspects_until = None
                self.fruitless = False
                return entry
            self.suspects_until = max(entry, self.suspects_until or entry)
            self._stall_search = False
        elif inflight:
            self.suspects_until = max(inflight)
            self._stall_search = False
        return None

    def stalled(self, inflight: Sequence[int]) -> None:
        """The link was closed because the broker went on answering but stopped acknowledging
        with `inflight` (entry ids) sent: RabbitMQ past its max_message_size acknowledges
        nothing more on that link, entries sent before the one it refuses included, so the
        oldest is no culprit and each link sent them all again. One at a time until the newest
        of them is acknowledged: a stall then sits on one entry, the one to name."""
        if len(inflight) > 1:
            self._stall_search = self._stall_search or self.suspects_until is None
            self.suspects_until = max(max(inflight), self.suspects_until or 0)

    def skipped(self, entry_id: int) -> bool:
        """The link was closed because the broker acknowledged later publishes but not this
        entry's; True (the entry is to be dead-lettered) at the `attempts`-th time in a row."""
        self.skips[entry_id] = self.skips.get(entry_id, 0) + 1
        if self.skips[entry_id] < self.attempts:
            return False
        del self.skips[entry_id]
        return True

    def drops(self, entry_id: int) -> float:
        return self.alone_drops.get(entry_id, 0) / PATH_CUTS
