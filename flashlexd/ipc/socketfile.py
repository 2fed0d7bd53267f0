"""The API socket file: created with its final mode and group, never over a live daemon's.

Binding under a umask leaves no window with wider permissions; an existing socket file is
replaced only when nothing answers on it (a daemon killed with SIGKILL leaves one behind).
"""
from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Optional, Sequence, Tuple

log = logging.getLogger("flashlexd.ipc")


class ServerError(Exception):
    """A reason the API socket cannot be served, worded as one line for the operator."""


class SocketGroupError(ServerError):
    """A socket group the daemon cannot give its socket: only a change of the config (or of
    the unit) cures it, so a restart would fail the same way (`run` exits 2, not 1)."""


def group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise SocketGroupError(f"socket group {group!r} does not exist (flashlex.app.socket.group)") from None


def check_group(group: str) -> None:
    """SocketGroupError when the start could not give the socket `group`: it does not exist, or
    the process may not chown to it (not in it, no CAP_CHOWN: the unit keeps none). A reload
    runs it so that it refuses what would fail the next start, not accept it in silence."""
    gid = group_id(group)
    if gid != os.getegid() and gid not in os.getgroups() and not _may_chown():
        # a reload cannot tell whether the unit was rendered again with the group already
        after = ", after `flashlexd service ... --install` has put the unit in it" \
            if os.environ.get("INVOCATION_ID") else ""
        raise SocketGroupError(f"the running service is not in group {group!r}"
                               f" (flashlex.app.socket.group): a new socket group takes a restart{after}")


def _may_chown() -> bool:
    """Whether the process has CAP_CHOWN (bit 0 of CapEff): root outside the unit has it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            effective = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return os.geteuid() == 0
    return bool(int(effective, 16) & 1)


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody answers on; refuse if a live daemon does."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket: remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)  # stale: left by a daemon that died without cleaning up
        except FileNotFoundError:
            pass
        log.info("removed stale socket %s", path)
        return
    except (socket.timeout, BlockingIOError):
        pass  # a listener with a full backlog is alive
    except OSError as exc:
        raise ServerError(f"cannot check existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ServerError(f"another flashlexd is running on {path} (stop it first, or use another --socket)")


def bind_socket(path: str, mode: int = 0o660, group: Optional[str] = None) -> Tuple[socket.socket, int]:
    """A non-blocking listening socket at `path` created with `mode` (umask, so there is no
    window with wider permissions) and owned by `group`; returns it and the file's inode."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
            os.chmod(parent, 0o755)
        except OSError as exc:
            raise ServerError(f"cannot create socket directory {parent}: {exc.strerror}") from None
    gid = group_id(group) if group else None
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        reason = "another flashlexd is running there" if exc.errno == 98 else (exc.strerror or str(exc))
        raise ServerError(f"cannot bind API socket {path}: {reason}") from None
    finally:
        os.umask(old_umask)
    try:
        if gid is not None and os.stat(path).st_gid != gid:  # under the unit, Group= already did it
            os.chown(path, -1, gid)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        message = f"cannot set up API socket {path}: {exc.strerror or exc}"
        if exc.errno == errno.EPERM and gid is not None:
            raise SocketGroupError(message + _group_hint(group)) from None  # type: ignore[arg-type]
        raise ServerError(message) from None
    return sock, inode


def socket_file_state(path: str, inode: int) -> str:
    """"ours" while `path` is the socket bound with `inode`; "gone" when nothing is there (or
    its directory is gone); "other" when another file took the path."""
    try:
        return "ours" if os.stat(path).st_ino == inode else "other"
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "other"


def closed_to_uids(path: str, allow_uids: Sequence[int]) -> Optional[str]:
    """Why the users of allowUids cannot reach the socket at `path`, or None: the socket is
    0666 for them, but a directory on its way that others may not search (no o+x) stops them
    first. The unit's runtime dir gets o+x only from a unit rendered with allowUids."""
    if not allow_uids:
        return None
    directory = Path(path).absolute().parent
    for place in (*reversed(directory.parents), directory):
        try:
            mode = os.stat(place).st_mode
        except OSError:
            return None  # not there yet: the start makes it 0755
        if not mode & stat.S_IXOTH:
            return (f"flashlex.app.socket.allowUids: the socket's directory {place} is closed to"
                    f" them (mode {stat.S_IMODE(mode):04o}): render the unit again (`flashlexd"
                    " service ... --install`, then restart) or, outside the unit, chmod o+x it")
    return None


def _group_hint(group: str) -> str:
    """Under the unit (no capabilities) the socket gets its group only from Group= or
    SupplementaryGroups=, rendered from the socket.group of its install."""
    if not os.environ.get("INVOCATION_ID"):
        return ""
    return (f": the service is not in group {group!r} (flashlex.app.socket.group);"
            " run `flashlexd service ... --install` again after changing it, then restart")
