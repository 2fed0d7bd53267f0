"""Real ages on a device whose wall clock steps.

A Raspberry Pi has no real-time clock: it boots with the time `fake-hwclock` saved (or 1970)
and NTP steps the clock, minutes later, by hours or days. Ages measured on the wall clock jump
with it. So every stamp is three numbers: the wall clock (for apps, and the fallback), the
store's number for this boot (`seq`), and CLOCK_BOOTTIME, which counts real seconds since boot,
suspend included, and is never stepped. The rule (README "Clock steps"):

- a stamp of this boot: real age = boottime now - boottime then; its wall-clock arrival time is
  re-based on today's offset (wall - boottime), so a step after it moves it too;
- a stamp of an earlier boot: boottimes of different boots cannot be compared, so it is aged on
  the wall clock, from its boottime plus the last offset that boot recorded (a step that boot
  saw is applied, a step after the reboot is not);
- a stamp without boottime (a store written before schema 2): aged on the wall clock.

Each boot's offsets live in the store's meta database as a `BootFrame`: the offset at the boot's
first stamp (the frame its expiry keys are written in, never changed) and the last offset seen
(rewritten only when it moved by more than STEP_TOLERANCE). No per-message write is added.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
# Test-only: when set, replaces the kernel's boot id, so a test can simulate a reboot.
BOOT_ID_ENV = "FLASHLEXD_TEST_BOOT_ID"
# An offset (wall - boottime) that moved more than this is a clock step; NTP slews less.
STEP_TOLERANCE = 2.0
LEGACY_SEQ = 0  # the frame of stamps written before boot frames existed: plain wall clock


def boottime() -> float:
    """Seconds since boot on CLOCK_BOOTTIME (Linux); CLOCK_MONOTONIC where there is none."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return time.monotonic()


def read_boot_id() -> bytes:
    """This boot's id (16 bytes). Without /proc: a random id, so every start counts as a boot
    (the wall-clock rule)."""
    text = os.environ.get(BOOT_ID_ENV)
    if not text:
        try:
            with open(BOOT_ID_FILE) as source:
                text = source.read()
        except OSError:
            return os.urandom(16)
    return text.strip().encode()[:36]


@dataclass(frozen=True)
class Reading:
    """The wall clock and the boot clock read together."""
    wall: float
    boottime: float

    @property
    def offset(self) -> float:
        return self.wall - self.boottime


class Clock(Protocol):
    """What the store reads time from: this machine's (`SystemClock`) or a test's."""
    boot_id: bytes

    def now(self) -> Reading: ...


class SystemClock:
    """The clocks of this machine."""

    def __init__(self) -> None:
        self.boot_id = read_boot_id()

    def now(self) -> Reading:
        return Reading(time.time(), boottime())


@dataclass(frozen=True)
class BootFrame:
    """What the store keeps per boot: its id, the offset at its first stamp (`first`: expiry
    keys of the boot are in that frame) and the last offset it recorded (`last`)."""
    seq: int
    boot_id: bytes
    first: float
    last: float

    def to_wire(self) -> list:
        return [self.boot_id, self.first, self.last]

    @classmethod
    def from_wire(cls, seq: int, value: list) -> "BootFrame":
        boot_id, first, last = value
        return cls(seq, bytes(boot_id), float(first), float(last))

    def stepped(self, reading: Reading) -> bool:
        """Has the clock stepped since this frame last recorded its offset?"""
        return abs(reading.offset - self.last) > STEP_TOLERANCE


_LEGACY = BootFrame(LEGACY_SEQ, b"", 0.0, 0.0)


def _rebased(wall: float, boottime: float, offset: float) -> float:
    """A stamp's wall-clock time under `offset`: the stamp itself unless its boot's clock
    stepped after it (a value read twice is the same)."""
    return wall if abs(wall - boottime - offset) <= STEP_TOLERANCE else boottime + offset


class Timeline:
    """One moment's view of every stamp: real ages, re-based arrival times, expiry cut-offs.
    `current` is this boot's frame; `frames` every boot the store still knows."""

    def __init__(self, reading: Reading, current: BootFrame, frames: Dict[int, BootFrame]):
        self.reading = reading
        self.current = current
        self.frames = frames
        self._seq, self._offset_now = current.seq, reading.offset  # read once per stamp: hot

    def _offset(self, seq: int) -> Optional[float]:
        """The offset that turns boottimes of boot `seq` into wall-clock times (None: unknown)."""
        if seq == self._seq:
            return self._offset_now
        frame = self.frames.get(seq)
        return None if frame is None or seq == LEGACY_SEQ else frame.last

    def arrival(self, wall: float, seq: int, boottime: Optional[float]) -> float:
        """The wall-clock time of a stamp, re-based when its boot's clock stepped after it
        (else the stamp itself: a value read twice is the same)."""
        offset = self._offset(seq)
        return wall if offset is None or boottime is None else _rebased(wall, boottime, offset)

    def times(self, wall: float, seq: int, boottime: Optional[float]) -> Tuple[float, float]:
        """(arrival, age) of a stamp: both, for one lookup of its boot (a read's hot path)."""
        if seq == self._seq and boottime is not None:
            return (_rebased(wall, boottime, self._offset_now),
                    max(0.0, self.reading.boottime - boottime))
        return self.arrival(wall, seq, boottime), self.age(wall, seq, boottime)

    def age(self, wall: float, seq: int, boottime: Optional[float]) -> float:
        if seq == self._seq and boottime is not None:
            return max(0.0, self.reading.boottime - boottime)
        return max(0.0, self.reading.wall - self.arrival(wall, seq, boottime))

    def expiry_wall(self, key_time: float, wall: float, seq: int, boottime: Optional[float]) -> float:
        """An expiry key (in its boot's `first` frame) as a wall-clock time: the re-based
        arrival plus the lifetime the key was written with (to the millisecond, as keyed)."""
        if boottime is None:
            return key_time
        lifetime = key_time - self.arrival_key(wall, seq, boottime)
        return round(self.arrival(wall, seq, boottime) + lifetime, 3)

    def arrival_key(self, wall: float, seq: int, boottime: Optional[float]) -> float:
        """A stamp's arrival as an expiry key of its boot (what `cutoff` is compared with):
        an expiry key is this plus the lifetime. The wall clock when its boot's frame is gone
        (a recovered store), as for its age: its boottime alone made it due at once."""
        if boottime is None or self._offset(seq) is None:
            return wall
        return boottime + self._frame(seq).first

    def cutoff(self, seq: int) -> float:
        """Expiry keys of boot `seq` at or before this are due: for this boot, real time passed
        since the stamp; for earlier boots, the wall clock."""
        frame = self._frame(seq)
        if seq == self.current.seq:
            return self.reading.boottime + frame.first
        return self.reading.wall - (self._offset(seq) or 0.0) + frame.first

    def _frame(self, seq: int) -> BootFrame:
        return self.current if seq == self.current.seq else self.frames.get(seq, _LEGACY)
