"""The daemon's directories: made with explicit modes, checked like sshd's StrictModes, and the
data dir locked for the daemon's life.

Run by hand under a loose umask (000), `os.makedirs` would leave every directory it creates
open to everyone, and a local user could then swap the socket dir (and capture what a root
application sends) or the data dir (and read the messages). So every directory we create gets
its mode with `chmod` (the umask cannot widen it), and every directory we use, created by us or
not, is refused unless it and each directory above it is owned by root or by the daemon's user
and writable by nobody else (a sticky directory such as /tmp is fine above it: others cannot
rename or remove what is ours there).

One daemon per data dir: two daemons on one store would both connect to the broker with the
thing's client ids and kick each other off. The data dir's lock file holds an exclusive
`flock` for the daemon's life (the kernel drops it when the process ends, however it ends)
and says whose it is.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

DATA_DIR_MODE = 0o700
SOCKET_PASSAGE = 0o011  # search, no listing: for a socket placed inside the data dir
SOCKET_DIR_MODE = 0o755  # reaching the socket is decided by the socket's own mode and SO_PEERCRED
PARENT_MODE = 0o755
LOCK_NAME = "flashlexd.lock"


class UnsafePath(Exception):
    """A directory the daemon must not use, or cannot make; one line for the operator."""


class ReadOnlyDisk(UnsafePath):
    """The data dir's file system is read-only (a card the kernel remounted after an error).
    `run` exits 1 all the same, retried every 2 s: a disk mounted late (a USB stick, a `nofail`
    partition, beside a read-only root) looks the same at first, and exit 2 left the service
    down for good once it came (re-read 31)."""

    def __init__(self, data_dir: Path):
        super().__init__(f"the disk under data dir {data_dir} is read-only (the kernel remounts a file"
                         f" system read-only after an I/O error: a failing SD card? see dmesg); what is"
                         f" stored is intact: `flashlexd store recover --data-dir {data_dir} --to NEWDIR`"
                         f" copies it to another disk, or fsck the disk and reboot")


SANDBOX_HINT = ("; under systemd the unit makes only the data and socket directories it was rendered with"
                " writable: run `flashlexd service ... --install` again after changing"
                " flashlex.app.db.dataPath or flashlex.app.socket.path")


def _read_only(data_dir: Path) -> UnsafePath:
    """Why `data_dir` is read-only: its file system (a card the kernel remounted after an error)
    or only its mount here (the unit's sandbox after dataPath was edited, which was named a
    failing card: re-read 30). /proc/self/mountinfo tells them apart: the mount's own options
    against its file system's."""
    if _file_system_read_only(data_dir) is not False:
        return ReadOnlyDisk(data_dir)
    return UnsafePath(f"data dir {data_dir} is read-only here (its mount, not its disk)"
                      f"{SANDBOX_HINT if os.environ.get('INVOCATION_ID') else ''}")


def _file_system_read_only(path: Path) -> Optional[bool]:
    """Whether the file system under `path` is read-only itself (None: mountinfo unreadable)."""
    real, best, read_only = os.path.realpath(path), "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                mine, _, theirs = line.partition(" - ")
                fields = mine.split()
                point = fields[4].replace("\\040", " ") if len(fields) > 4 else ""
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best) and len(theirs.split()) >= 3:
                    # ext4 after an error: `emergency_ro` (newer kernels), or `ro`
                    best, read_only = point, bool({"ro", "emergency_ro"} & set(theirs.split()[2].split(",")))
    except OSError:
        return None
    return read_only


class AlreadyRunning(Exception):
    """Another daemon holds the data dir's lock, or (pid None) `store verify`/`recover` do."""

    def __init__(self, data_dir: Path, pid: Optional[str]):
        if pid is None:
            super().__init__(f"data dir {data_dir} is being read by `flashlexd store verify` or"
                             " `store recover`: start flashlexd once it has ended")
        else:
            super().__init__(f"another flashlexd (pid {pid}) is running on data dir {data_dir}:"
                             f" stop it first, or use another --data-dir")
        self.pid = pid


def make_dir(path: Path, mode: int, parents_mode: int = PARENT_MODE) -> None:
    """Create `path` with `mode` and its missing parents with `parents_mode`, whatever the umask."""
    path = Path(os.path.abspath(path))
    missing = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    for directory in reversed(missing):
        wanted = mode if directory == path else parents_mode
        try:
            os.mkdir(directory, 0o700)  # never wider than wanted while it is being set up
        except FileExistsError:
            continue  # someone made it meanwhile: check_dir judges it
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EROFS and os.environ.get("INVOCATION_ID"):
                # under the unit `flashlexd service` rendered, only the directories the config
                # named then are writable (ProtectSystem=strict)
                hint = SANDBOX_HINT
            raise UnsafePath(f"cannot create {directory}: {exc.strerror or exc}{hint}") from None
        os.chmod(directory, wanted)


def check_dir(path: Path, what: str, uid: Optional[int] = None) -> None:
    """Refuse `path` unless it is a directory that only root or the daemon's user (`uid`, else
    this process's) can change, below directories that only they can change."""
    uid = os.geteuid() if uid is None else uid
    _check_links(Path(path), what, uid)
    real = Path(os.path.realpath(path))
    try:
        info = os.stat(real)
    except OSError as exc:
        raise UnsafePath(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{what} {path} is not a directory")
    _check_owner_and_mode(real, info, what, uid, f"chown it, or choose another {what}",
                          f"chmod go-w {real}")
    elsewhere = f"choose a {what} whose parents only root or uid {uid} can change"
    for parent in real.parents:
        _check_owner_and_mode(parent, os.stat(parent), f"{what} {path}: the directory above it",
                              uid, elsewhere, elsewhere, allow_sticky=True)


def _check_links(path: Path, what: str, uid: int) -> None:
    """Refuse a path that passes through a symlink another user owns: in a sticky directory
    such as /tmp its owner may re-point it at any time, and the daemon (and every client)
    keeps using the path, not where it led when it was checked. Links are followed one at a
    time, so a link reached through another link is judged too."""
    pending = list(Path(os.path.abspath(path)).parts[1:])
    current = Path("/")
    hops = 0
    while pending:
        candidate = current / pending.pop(0)
        try:
            info = os.lstat(candidate)
        except OSError:
            return  # missing: check_dir's stat names it
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        if info.st_uid not in (0, uid):
            raise UnsafePath(f"{what} {path}: {candidate} is a symlink owned by uid {info.st_uid},"
                             f" who could re-point it: use a path without it")
        hops += 1
        if hops > 40:
            raise UnsafePath(f"{what} {path}: too many levels of symlinks")
        try:
            target = Path(os.readlink(candidate))
        except OSError:
            return  # gone meanwhile: check_dir's stat names what is there now
        pending = list(target.parts[1:] if target.is_absolute() else target.parts) + pending
        if target.is_absolute():
            current = Path("/")


def _check_owner_and_mode(path: Path, info: os.stat_result, what: str, uid: int, owner_fix: str,
                          mode_fix: str, allow_sticky: bool = False) -> None:
    if info.st_uid not in (0, uid):
        raise UnsafePath(f"{what} {path} is owned by uid {info.st_uid}, not by root or the daemon's"
                         f" user (uid {uid}): {owner_fix}")
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not (allow_sticky and info.st_mode & stat.S_ISVTX):
        raise UnsafePath(f"{what} {path} is writable by group or others"
                         f" (mode {stat.S_IMODE(info.st_mode):04o}): {mode_fix}")


def others_can_change(path: Path, what: str, uid: int) -> Optional[str]:
    """Why a user other than root and the daemon's (`uid`) can change a file the daemon trusts
    (its config: `allowUids`, the endpoint; its key files): the file, a symlink on its way or a
    directory above it that they own or may write. A warning, not a refusal, as sshd's
    StrictModes would make it of an install that ran before the check existed; None: safe."""
    try:
        _check_links(Path(path), what, uid)
        real = Path(os.path.realpath(path))
        _check_owner_and_mode(real, os.stat(real), what, uid, f"chown root {real}", f"chmod go-w {real}")
        for parent in real.parents:
            _check_owner_and_mode(parent, os.stat(parent), f"{what} {real}: the directory above it", uid,
                                  "move the file", "move the file", allow_sticky=True)
    except UnsafePath as exc:
        return f"{exc} (whoever can change it controls what the daemon does)"
    except OSError:
        return None  # gone meanwhile: reading it says so
    return None


def control_warnings(files: Iterable[Tuple[Path, str]], uid: int) -> List[str]:
    """`others_can_change` of each (path, what), the daemon's user being `uid`."""
    return [warning for warning in (others_can_change(path, what, uid) for path, what in files) if warning]


def prepare_dir(path: Path, mode: int, what: str) -> None:
    """`make_dir` then `check_dir`: the directory exists and is safe to use."""
    make_dir(path, mode)
    check_dir(path, what)


def claim_directories(data_dir: Path, socket_path: str) -> "DataDirLock":
    """What `flashlexd run` does before opening anything: both directories made and checked,
    the data dir locked. Raises UnsafePath or AlreadyRunning."""
    socket_dir = Path(os.path.abspath(socket_path)).parent
    mode = data_dir_mode(Path(data_dir), socket_dir)
    prepare_dir(Path(data_dir), mode, "data dir")
    _close_to_others(Path(data_dir), mode & SOCKET_PASSAGE)
    lock = DataDirLock(Path(data_dir)).acquire()
    try:
        prepare_dir(socket_dir, SOCKET_DIR_MODE, "socket dir")
    except UnsafePath:
        lock.release()
        raise
    return lock


def data_dir_mode(data_dir: Path, socket_dir: Path) -> int:
    """0700, or 0711 when the API socket is inside the data dir: apps pass through to it."""
    return DATA_DIR_MODE | (SOCKET_PASSAGE if within(socket_dir, data_dir) else 0)


def within(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or below it (a socket inside the data dir)."""
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(directory))
    return real == top or top in real.parents


def _close_to_others(data_dir: Path, passage: int) -> None:
    """A data dir made by hand or restored from a backup (0755, its files 0644) let any local
    user read every message: it and its files are closed to group and others, with one
    WARNING. The search bits in `passage` are kept, or added: apps reach a socket placed
    inside it."""
    mode = stat.S_IMODE(os.stat(data_dir).st_mode)
    wanted = (mode & ~0o077) | passage
    loose = [entry for entry in os.scandir(data_dir)
             if entry.is_file(follow_symlinks=False) and stat.S_IMODE(entry.stat().st_mode) & 0o077]
    if mode == wanted and not loose:
        return
    log = logging.getLogger("flashlexd")
    try:
        os.chmod(data_dir, wanted)
        for entry in loose:
            os.chmod(entry.path, stat.S_IMODE(entry.stat().st_mode) & ~0o077)
    except OSError as exc:
        log.warning("data dir %s should be %04o, its files closed to group and others (it is %04o): %s;"
                    " run chmod %04o %s and chmod go= on its files", data_dir, wanted, mode,
                    exc.strerror or exc, wanted, data_dir)
        return
    if mode & 0o066 or loose:  # readable or writable: search bits alone were ours (a socket inside)
        log.warning("data dir %s was open to group or others (mode %04o, %d of its files too): closed,"
                    " it holds the messages", data_dir, mode, len(loose))
    else:
        log.info("data dir %s set to %04o: search bits for group and others only while the API"
                 " socket is inside it", data_dir, wanted)


class DataDirLock:
    """An exclusive flock on DATA_DIR/flashlexd.lock, holding the owner's pid, held until
    `release` or the process's end. Close-on-exec, and taken after the fork server was made:
    the workers do not hold it."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "DataDirLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise _read_only(self.path.parent) from None
            why = "it is a symlink (refused: whoever made it chooses what the daemon writes)" \
                if exc.errno == errno.ELOOP else exc.strerror or exc
            raise UnsafePath(f"cannot open lock file {self.path}: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = None if _only_shared_holds(fd) else _pid_in(fd)  # the file has the last daemon's
            os.close(fd)
            raise AlreadyRunning(self.path.parent, pid) from None
        try:
            _write_pid(fd)
        except OSError as exc:  # ENOSPC: a disk full to the last block
            os.close(fd)
            raise UnsafePath(f"cannot write lock file {self.path}: {exc.strerror or exc}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking would race)
            self.fd = None


def _write_pid(fd: int) -> None:
    """Our pid over the last daemon's, then the file cut to its length: cutting it first would
    give its block away, and on a full disk the pid would then find none."""
    pid = f"{os.getpid()}\n".encode()
    os.pwrite(fd, pid, 0)
    os.ftruncate(fd, len(pid))


def _only_shared_holds(fd: int) -> bool:
    """Whether the lock that refused us is held shared only (`holding_off`), not by a daemon;
    the shared hold taken to find out goes with `fd`'s close."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _pid_in(fd: int) -> str:
    return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"


def holder(data_dir: Path) -> Optional[str]:
    """The pid of the daemon holding `data_dir`'s lock, or None; writes nothing."""
    with holding_off(data_dir) as running:
        return running


@contextlib.contextmanager
def holding_off(data_dir: Path) -> Iterator[Optional[str]]:
    """The pid of the daemon holding `data_dir`'s lock (None: none), and while none does, a
    shared hold on the lock until the block ends, so that no daemon starts meanwhile (its
    start fails with AlreadyRunning): `store verify` and `recover` read the file beside no
    writer. Writes nothing (no lock file: no daemon ever ran there)."""
    try:
        fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield _pid_in(fd)
            return
        yield None
    finally:
        os.close(fd)
