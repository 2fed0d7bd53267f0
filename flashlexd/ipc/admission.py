"""Who may talk to the daemon, decided per connection from the kernel's word about the peer.

Root, the daemon's own user, the uids of `flashlex.app.socket.allowUids`, and members of
`flashlex.app.socket.group` (primary group from SO_PEERCRED, supplementary groups from
SO_PEERGROUPS). Both come from the socket itself, so the check also works under the unit's
`ProtectProc=invisible`, where other users' /proc entries are hidden. A refused uid is logged
once per episode with a count, not once per connection: a local user reconnecting in a loop
cannot flood the journal (and so push the daemon's real lines out of journald's rate limit).
"""
from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Dict, FrozenSet, Iterable, Optional, Tuple

from flashlexd import fds
from flashlexd.ipc.socketfile import group_id
from flashlexd.logs import LineThrottle

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; not named by Python 3.9
_MAX_GROUPS = 256  # Python's getsockopt reads at most 1024 bytes: a peer in more groups gets ERANGE


def peer_credentials(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED); raises OSError."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def peer_groups(sock: socket.socket) -> FrozenSet[int]:
    """The peer's supplementary groups (SO_PEERGROUPS); empty where the kernel lacks it, or for
    a peer in more than 256 groups (then only its uid and primary group count)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_GROUPS)
    except OSError:
        return frozenset()
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))


def per_uid_cap(max_connections: int) -> int:
    """The connections one uid other than root may hold at once."""
    return max(1, max_connections // 4)


class Admission:
    def __init__(self, allow_uids: Iterable[int] = (), group: Optional[str] = None):
        # root: never capped per uid, and slots kept for it past the cap (`sudo flashlexctl
        # status` always gets in); not the daemon's own user, as which apps may run too
        self.privileged = frozenset({0})
        self.uids = frozenset({0, os.geteuid()}) | frozenset(allow_uids)
        self.gid = group_id(group) if group else None
        self._refused: Dict[int, LineThrottle] = {}  # uid -> its lines

    def admits(self, sock: socket.socket, uid: int, gid: int) -> bool:
        if uid in self.uids:
            return True
        return self.gid is not None and (gid == self.gid or self.gid in peer_groups(sock))

    def over_cap(self, uid: int, held: int, total: int, cap: int) -> Optional[str]:
        """Why one more connection from `uid`, which holds `held` of the `total` open, is
        refused (None: it is not), `cap` being maxConnections: one user may hold a quarter of
        them (a connection parked in `wait` is never idle), and root goes on past the cap into
        PRIVILEGED_CONNECTIONS, so `sudo flashlexctl status` always gets in."""
        if uid in self.privileged:
            return None if total < cap + fds.PRIVILEGED_CONNECTIONS else f"too many connections ({total})"
        if total >= cap:
            return f"too many connections ({cap})"
        if held >= per_uid_cap(cap):
            return f"too many connections from uid {uid} ({per_uid_cap(cap)}, a quarter of maxConnections)"
        return None

    def note_refused(self, uid: int, pid: int, now: float) -> None:
        """One WARNING per uid per minute, with how many were refused since the last one."""
        since = self._refused.setdefault(uid, LineThrottle()).due(now)
        if since:
            log.warning("API: refused %d connection%s from uid %d (last pid %d): neither in allowUids"
                        " nor in the socket's group", since, "" if since == 1 else "s", uid, pid)
