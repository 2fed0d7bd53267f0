"""One API connection's state, and the budget of incoming bytes all connections share.

Incoming frames are read exactly: first the 4-byte header, then, once the whole frame's size
is reserved from the shared `ByteBudget`, its body straight into a buffer of that size. So the
memory all peers can make the daemon hold with frames they have started is bounded by the
budget (600 connections each sending a near-maximum frame used to take the supervisor from
23 MB to 799 MB), and a frame either has all its room or is refused at once (`busy`): never
half-buffered frames starving each other. A frame must also arrive whole within the frame
timeout of its first byte, so a peer trickling a byte now and then cannot hold its share.
"""
from __future__ import annotations

import select
import selectors
import socket
from enum import Enum
from typing import Any, Optional, Tuple

from flashlexd.ipc.protocol import HEADER, Pending

_DISCARD = bytearray(64 * 1024)  # scratch for input read only to be thrown away
# a request read even when the budget is spent (`status`: 40 bytes; an ack of 1,000 ids: 9 KB),
# so one user announcing large requests cannot keep every other app from its small calls: the
# frames held stay under the budget plus this much per connection
SMALL_REQUEST = 16 * 1024


class ByteBudget:
    """Bytes that all connections may hold together: incoming frames, or unsent responses."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def fits(self, count: int) -> bool:
        return self.used + count <= self.limit

    def reserve(self, count: int) -> bool:
        if not self.fits(count):
            return False
        self.used += count
        return True

    def charge(self, count: int) -> None:
        """Count bytes held whether or not they fit (a small answer is never held back)."""
        self.used += count

    def release(self, count: int) -> None:
        self.used -= count

    @property
    def spent(self) -> bool:
        return self.used >= self.limit


class Received(Enum):
    AGAIN = "again"            # nothing more to read now
    PROGRESS = "progress"      # some bytes arrived
    FRAME = "frame"            # a whole frame is ready (`take_frame`)
    EOF = "eof"                # the peer closed (or the socket failed)
    TOO_LARGE = "too_large"    # the header announces more than the frame limit
    NO_BUDGET = "no_budget"    # the frame does not fit in what the budget has left
    HELD = "held"              # a header behind a parked request: its body waits for its turn


class Connection:
    __slots__ = ("owner", "sock", "uid", "pid", "head", "body", "filled", "frame_started",
                 "announced", "wbuf", "events", "parked", "parked_id", "parked_resends", "closing", "closed",
                 "last_active", "last_write")

    def __init__(self, owner: Any, sock: socket.socket, uid: int, pid: int, now: float):
        self.owner, self.sock, self.uid, self.pid = owner, sock, uid, pid
        self.head = bytearray()               # the header of the frame being read
        self.body: Optional[bytearray] = None  # its body, sized and reserved once the header is in
        self.filled = 0
        self.frame_started: Optional[float] = None  # when its first byte arrived
        self.announced = 0                    # the length a refused header announced
        self.wbuf = bytearray()
        self.events = selectors.EVENT_READ
        self.parked: Optional[Pending] = None
        self.parked_id: Any = None
        self.parked_resends = False  # the parked request's client sends it again if turned away
        self.closing = self.closed = False  # closing: close once the write buffer is flushed
        self.last_active = self.last_write = now

    @property
    def frame_ready(self) -> bool:
        return self.body is not None and self.filled == len(self.body)

    @property
    def reading(self) -> bool:
        """Whether a frame has begun and is not complete yet (the frame deadline runs)."""
        return self.frame_started is not None and not self.frame_ready

    @property
    def header_held(self) -> bool:
        """A frame's header is in, its body not reserved yet: it came behind a parked request
        or unread responses."""
        return self.body is None and len(self.head) == HEADER.size

    def receive(self, budget: ByteBudget, max_frame: int, now: float, hold: bool = False) -> Received:
        """One non-blocking read towards the current frame. `hold`: the connection's earlier
        request is parked or its responses are unread, so a next frame's body is neither
        reserved nor read (its room in the shared budget would be held for as long as the wait,
        an hour at most, or as the peer reads a little every write timeout): HELD."""
        if self.body is None:
            if len(self.head) < HEADER.size:
                try:
                    data = self.sock.recv(HEADER.size - len(self.head))
                except (BlockingIOError, InterruptedError):
                    return Received.AGAIN
                except OSError:
                    data = b""
                if not data:
                    return Received.EOF
                if not self.head:
                    self.frame_started = now
                self.head += data
                self.last_active = now
                if len(self.head) < HEADER.size:
                    return Received.PROGRESS
            (length,) = HEADER.unpack(self.head)
            self.announced = length
            if length > max_frame:
                return Received.TOO_LARGE
            if hold:
                self.frame_started = None  # its deadline runs once its turn has come
                return Received.HELD
            if self.frame_started is None:
                self.frame_started = now
            if length <= SMALL_REQUEST:
                budget.charge(length)
            elif not budget.reserve(length):
                return Received.NO_BUDGET
            self.body, self.filled = bytearray(length), 0
            return Received.FRAME if length == 0 else Received.PROGRESS
        try:
            count = self.sock.recv_into(memoryview(self.body)[self.filled:])
        except (BlockingIOError, InterruptedError):
            return Received.AGAIN
        except OSError:
            count = 0
        if not count:
            return Received.EOF
        self.filled += count
        self.last_active = now
        return Received.FRAME if self.frame_ready else Received.PROGRESS

    def take_frame(self, budget: ByteBudget) -> bytearray:
        """The complete frame's body; its room goes back to the budget."""
        body = self.body
        assert body is not None and self.filled == len(body)
        self.drop_frame(budget)
        return body

    def drop_frame(self, budget: ByteBudget) -> None:
        """Forget the frame being read (taken, refused, or the connection closes)."""
        if self.body is not None:
            budget.release(len(self.body))
        self.head, self.body, self.filled, self.frame_started = bytearray(), None, 0, None

    def frame_progress(self) -> Tuple[int, int]:
        """(bytes received, bytes announced) of the frame being read, for log lines."""
        if self.body is None:
            return len(self.head), HEADER.size
        return HEADER.size + self.filled, HEADER.size + len(self.body)

    def wanted_events(self, hold: bool) -> int:
        """Selector interest: read unless closing or a complete frame or a held header (`hold`,
        as in `receive`) waits its turn; write while responses are owed."""
        events = 0 if self.closing or self.frame_ready or (hold and self.header_held) \
            else selectors.EVENT_READ
        return events | (selectors.EVENT_WRITE if self.wbuf else 0)

    def hung_up(self) -> bool:
        """Whether the peer closed its end, seen without reading (POLLHUP): input held behind a
        parked wait, or after a half-close, is not read, so its end-of-file is not seen there."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def discard_input(self, rounds: int = 4) -> None:
        """Read away (a bounded amount of) what a refused peer sent: a Unix socket closed with
        unread input resets the peer instead of giving it a clean end-of-file after our error."""
        for _ in range(rounds):
            try:
                if not self.sock.recv_into(_DISCARD):
                    return
            except OSError:
                return
