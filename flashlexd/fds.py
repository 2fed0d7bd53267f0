"""File descriptors: the supervisor's budget of them, so that local clients cannot use it up.

systemd starts services with a soft RLIMIT_NOFILE of 1024 (the hard limit is far higher, for
programs that ask). Every API connection is a descriptor of the supervisor, and a restart of a
worker needs new ones (its socketpair, the fork): with ~1,011 idle connections held by one
local user, a worker's restart failed with EMFILE and took the daemon down. So the supervisor
raises its soft limit to the hard one at start, and API connections are capped RESERVED_FDS
below the limit, whatever `maxConnections` says: what the supervisor itself needs is always
left (stdio, the selector, the signal pipe, the listener, LMDB's files, the worker links, a
socketpair and fork per restart, the config memfd, the credentials check on reload).
"""
from __future__ import annotations

import logging
import os
import resource
from typing import Optional

log = logging.getLogger(__name__)

RESERVED_FDS = 64
PRIVILEGED_CONNECTIONS = 8  # API connections beyond the cap, kept for root


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(configured: int, limit: Optional[int] = None) -> int:
    """API connections allowed: `configured`, but never closer than RESERVED_FDS to the limit
    with the PRIVILEGED_CONNECTIONS beyond it open too."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, limit - RESERVED_FDS - PRIVILEGED_CONNECTIONS))


class SpareFd:
    """One descriptor held back for the moment the others run out: released, it lets the
    listener accept one connection to answer `busy` and close it, instead of leaving every
    new client hanging in the backlog until its timeout (the libev/nginx "spare fd" trick)."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        self.take()

    def take(self) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = None  # tried again at the next release

    def release(self) -> bool:
        """Give the descriptor back to the system; False when there was none to give."""
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def close(self) -> None:
        self.release()
