"""The supervisor's care of the named consumers: the store agrees with the config (at start and
after each reload), and every `sweepSeconds` idle dynamic consumers go (one WARNING each) and
each consumer is trimmed to its maxBacklog, a bounded step per turn of the loop. Ingest never
does this work: it adds no write per message for consumers.

Idleness is wall-clock time (a consumer's last use is stored as such, across boots), less the
forward steps of the wall clock seen after that use, while the daemon runs or (from the store's
boot frames) in an earlier run of this boot or an earlier boot: a Pi that boots with
its clock days behind and then steps it forward (NTP) must not find an app that read a second
ago unused for a week, nor keep one unused since the step for a week too long. And no consumer
goes in the first START_GRACE after the start: after a long power-off every consumer looks
idle until its app, started after the daemon, uses it again.

While the store is full and refuses what the broker sends (`whenFull: reject`: the running
ingress reports `store_full`), a dynamic consumer unused for FULL_IDLE_SECONDS goes as if its
idle days were over: an app that used a name once and went away (a typo, a crashed test, a retired app)
held every message it matched, the store filled (17 hours at 50 messages a second at the default
cap) and no app got anything new until the 7 days were over (found by review). A declared
consumer never goes so: declare the ones whose messages must wait longer."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, List, Optional, Tuple

from flashlexd.configconsumers import ConsumerSettings
from flashlexd.consumers import MAX_CONSUMERS, SEEN_EVERY, NoRoomForConsumer
from flashlexd.store import Store, StoreDamaged, StoreError
from flashlexd.storeconsumers import Declared
from flashlexd.wire import MAX_WAIT_SECONDS

log = logging.getLogger(__name__)
START_GRACE = 3600.0  # seconds after the start before an idle consumer goes
# a dynamic consumer unused this long goes while the store is full: well past what a live app
# can look unused for (its reads write its last use hourly, and a `wait` may last an hour; an
# hour's threshold took a reader's consumer, which came back at the earliest stored message)
FULL_IDLE_SECONDS = 2 * (SEEN_EVERY + MAX_WAIT_SECONDS)
STEP_SECONDS = 60.0  # a jump of the wall clock against the monotonic one this big is a step


def declared_changes(declared: Declared, on_widened: Callable[[str], None]) -> None:
    """What a declare changed in the store, said and passed on (`on_widened(name)`: a replay
    for its readers), wherever it ran: after a reload here, or on a declared consumer's first
    use (ipc/consumeraccess.py). Its refusals are the caller's: there they repeat at each call."""
    for name in declared.widened:
        on_widened(name)
    for name in declared.created:
        log.info("consumer %r declared: it starts at the earliest stored message", name)
    for name in declared.adopted:  # an app's own until now: its acks were taken as the new one's
        log.warning("consumer %r declared: it was dynamic (an app used the name, or it was taken out of"
                    " the config) and keeps its place and acks, so what was acked under the name is not"
                    " delivered again; `flashlexctl consumers reset %s --to earliest` gives it every stored"
                    " message", name, name)
    for name in declared.gave_place:
        on_widened(name)  # removed: should it come back, it starts at the earliest message
        log.warning("consumer %r removed: taken out of flashlex.app.consumers, it gave its place"
                    " to a newly declared one (%d are stored, the most there may be); the messages"
                    " it alone still held back were released (those no other consumer matches"
                    " stay, for unnamed apps and expiry)", name, MAX_CONSUMERS)


class ConsumerKeeper:
    def __init__(self, store: Callable[[], Store], settings: Callable[[], ConsumerSettings],
                 every: Callable[[], float], start_grace: float = START_GRACE,
                 wall: Callable[[], float] = time.time,
                 on_widened: Callable[[str], None] = lambda name: None,
                 store_full: Callable[[], bool] = lambda: False):
        """`on_widened(name)`: a declare gave `name` a filter matching stored messages its old
        one did not, or `name` was removed (a consumer of that name again starts at the earliest
        stored message); its readers past them start over (the API counts a replay). `store_full`:
        the store refuses what the broker sends for want of room (the ingress says so)."""
        self._store, self._settings, self._every = store, settings, every
        self._store_full = store_full
        self._full_sweep = False  # the sweep under way removes after FULL_IDLE_SECONDS
        self._on_widened = on_widened
        self._start_grace, self._wall = start_grace, wall
        self.next_run = 0.0  # monotonic: the next sweep, or its next step while one is under way
        self._sweep: Optional[Iterator[Optional[str]]] = None
        self._sweep_started = 0.0
        self._started: Optional[float] = None  # loop (monotonic) time of the first tick
        self._offset: Optional[float] = None  # wall - monotonic at the last tick
        self._steps: List[Tuple[float, float]] = []  # forward steps: (wall time just after, seconds)

    def declare(self) -> None:
        self._sweep = None  # a sweep under way starts again on the store and settings as now
        try:
            declared = self._store().consumer_declare(self._settings().declared, time.time())
        except StoreError as exc:
            self._failed("declaring the configured consumers", exc)
            return
        declared_changes(declared, self._on_widened)
        for name in declared.refused:
            log.error("flashlex.app.consumers.%s: %s; it is declared again at the next reload", name,
                      NoRoomForConsumer(name))

    def tick(self, now: float) -> None:
        """One step of the sweep when one is under way or due (`Store.consumers_upkeep`): a
        sweep over a large store takes several turns of the loop, never one long one."""
        if self._started is None:
            self._started = now
            self._steps_before_start()
        self._watch_clock(now)
        if self._sweep is None:
            if now < self.next_run:
                return
            self._sweep_started = now
            idle = self._idle_seconds(now)
            self._sweep = self._store().consumers_upkeep(self._wall(), idle, self._steps,
                                                         self._settings().dynamic_max_backlog)
        try:
            removed = next(self._sweep)
        except StopIteration:
            self._end_sweep()
            return
        except StoreError as exc:
            self._end_sweep()
            self._failed("consumer upkeep", exc)
            return
        self.next_run = now  # the next step at the next turn
        if removed is None:
            return
        if self._full_sweep:
            why = (f"unused for over {FULL_IDLE_SECONDS / 3600:g} hours while the store is full and"
                   f" refuses new messages (declare a consumer whose messages must wait longer)")
        else:
            why = f"unused for {self._settings().idle_seconds / 86400:g} days (flashlex.app.consumerIdleDays)"
        log.warning("consumer %r removed: %s; the messages it alone still held back were released"
                    " (those no other consumer matches stay, for unnamed apps and expiry)", removed, why)
        self._on_widened(removed)  # its apps' places stand past what a new one of the name reads

    def _idle_seconds(self, now: float) -> Optional[float]:
        """How long unused a dynamic consumer goes by this sweep; None: none goes (the start's
        grace)."""
        self._full_sweep = False
        if now - self._started < self._start_grace:  # type: ignore[operator]
            return None
        idle = self._settings().idle_seconds
        if idle > FULL_IDLE_SECONDS and self._store_full():
            self._full_sweep = True
            return FULL_IDLE_SECONDS
        return idle

    def _steps_before_start(self) -> None:
        """The steps an earlier run of this boot or an earlier boot saw (the store's boot
        frames have them), each as a step just before the start: a restart or a reboot after
        NTP must not count them as idle time either. A consumer last used after such a step
        (its last use is a bare wall time) is kept that much longer, never removed early."""
        wall = self._wall()
        self._steps.extend((wall, step) for step in self._store().clock_steps_recorded()
                           if step >= STEP_SECONDS)

    def _watch_clock(self, now: float) -> None:
        """Note a forward step of the wall clock (its offset to `now`, monotonic, jumped)."""
        wall = self._wall()
        if self._offset is not None and wall - now - self._offset >= STEP_SECONDS:
            self._steps.append((wall, wall - now - self._offset))
        self._offset = wall - now

    def _end_sweep(self) -> None:
        self._sweep = None
        self.next_run = self._sweep_started + self._every()

    @staticmethod
    def _failed(what: str, exc: StoreError) -> None:
        if not isinstance(exc, StoreDamaged):  # damage: the store logged it once
            log.error("%s failed: %s", what, exc)
