"""`flashlexd reload --config FILE PID`: the unit's ExecReload. It sends the daemon SIGHUP and waits for the
reload's outcome, so that `systemctl reload flashlexd` fails when the daemon refused the new
config (and keeps running the previous one) instead of succeeding as soon as the signal is sent.

The outcome is read from the daemon's `status` (its `reload` part: how many reloads it has done,
why the last one was refused, and its notes: what it applied only in part, printed one line each
on stderr, exit 0). systemd's own documentation asks for an ExecReload that
waits for the reload to complete, not one that only sends a signal.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from flashlexd.argtypes import positive_seconds
from flashlexd.config import ConfigError
from flashlexd.unitplaces import read_places
from flashlexd.wire import SOCKET_ENV

# seconds; a reload takes at most the key check's 30 s, and this says so before the unit's
# TimeoutStartSec (90 s) ends the command with systemd's word only
WAIT = 80.0
ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket
POLL = 0.05  # seconds between status calls while the reload has not been done
LINK_WAIT = 15.0  # seconds a link the reload restarted has to connect before its error is said
LINKS = ("ingress", "egress")


class ReloadFailed(Exception):
    """The reload was refused, or its outcome could not be learned (one line)."""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "reload", help="reload a running daemon's config and wait for the outcome (ExecReload)",
        description="Send the daemon SIGHUP and wait until it has reloaded its config. Exit 1"
                    " with its one-line reason when it refused the new config (it keeps running"
                    " the previous one). The unit's ExecReload, so `systemctl reload flashlexd`"
                    " fails on a refused config.")
    parser.add_argument("pid", type=int, help="the daemon's pid (systemd: $MAINPID)")
    parser.add_argument("--config", "-c", required=True,
                        help="the config file the daemon runs with")
    parser.add_argument("--socket", help="API socket path (default: the one PID listens on; among"
                                         " several, or none found: $FLASHLEXD_SOCKET, then the config's)")
    parser.add_argument("--timeout", type=positive_seconds, default=WAIT, metavar="S",
                        help=f"seconds to wait for the outcome (default: {WAIT:g})")


def run(args: argparse.Namespace) -> int:
    try:
        _check_config(args.pid, args.config)
        reload(args.pid, _socket_path(args), args.timeout)
    except ReloadFailed as failed:
        print(f"flashlexd reload: {failed}", file=sys.stderr)
        return 1
    return 0


def _check_config(pid: int, config: str) -> None:
    """A daemon reloads the file it was started with: another FILE was neither checked nor
    applied, and the command said nothing, exit 0 (found by review). Not checked when the
    daemon's command line cannot be read (another user's process)."""
    running = _running_config(pid)
    if running is not None and not _same_file(running, config):
        raise ReloadFailed(f"pid {pid} runs with {running}, not {config}: a reload rereads the file"
                           f" it was started with; edit that one (nothing sent)")


def _same_file(one: str, other: str) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:  # one is gone: by its path
        return os.path.realpath(one) == os.path.realpath(other)


def _running_config(pid: int) -> Optional[str]:
    """The --config of `flashlexd run` as process `pid` was started (made absolute against its
    working directory), from /proc; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as raw:
            argv = [arg.decode(errors="surrogateescape") for arg in raw.read().split(b"\0")]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    if "run" not in argv:
        return None
    from flashlexd.cli import run_config  # the cli imports this module: its parser reads it as run did
    value = run_config(argv[argv.index("run"):])
    return None if not value else os.path.join(cwd, value)


def _socket_path(args: argparse.Namespace) -> str:
    """Where the daemon listens: --socket, else the one socket `pid` listens on, else the
    daemon's own precedence (`run` under the unit has no --socket): $FLASHLEXD_SOCKET, then
    the config's flashlex.app.socket.path."""
    if args.socket:
        return args.socket
    listening = _listening_sockets(args.pid)
    if len(listening) == 1:
        return listening[0]
    # none found (another user's process), or several (a launcher left it some): as configured
    return _configured_socket(args.config)


def _configured_socket(config: str) -> str:
    """$FLASHLEXD_SOCKET, else the config's flashlex.app.socket.path (read leniently)."""
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    try:
        places, unreadable = read_places(Path(config))
    except ConfigError as exc:
        unreadable = str(exc)
    if unreadable:  # the daemon would refuse it the same way: not sent
        raise ReloadFailed(f"not sent, the daemon keeps running its previous config: {unreadable}")
    return places.socket_path


def _listening_sockets(pid: int) -> List[str]:
    """The paths of the Unix sockets `pid` listens on (its API, and any a launcher left it),
    from /proc: an edited flashlex.app.socket.path is applied at the next restart, so after
    such an edit the config no longer says where the running daemon listens."""
    try:
        targets = [_link(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        with open(f"/proc/{pid}/net/unix", encoding="utf-8", errors="replace") as table:
            rows = [line.split(None, 7) for line in table.read().splitlines()[1:]]
    except OSError:
        return []
    inodes = {target[len("socket:["):-1] for target in targets if target.startswith("socket:[")}
    return sorted({row[7] for row in rows  # Num RefCount Protocol Flags Type St Inode Path
                   if len(row) == 8 and row[6] in inodes and int(row[3], 16) & ACCEPTING
                   and row[7].startswith("/")})


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def reload(pid: int, socket_path: str, timeout: float) -> None:
    """SIGHUP to `pid`, then wait until its `status` counts one more reload done. (The client
    package is imported here: the daemon's own modules import without it, see
    tests/test_source_checkout.py.)"""
    from flashlexd.client import Client
    from flashlexd.client.errors import ConnectionLost, FlashlexError

    def status(sent: bool = True) -> Dict[str, Any]:
        """The daemon's status; answered once a reload under way is over (it holds the
        daemon's loop). `sent`: whether SIGHUP went out yet (the line says)."""
        try:
            return client.status()
        except ConnectionLost:
            raise ReloadFailed("the daemon stopped during the reload (see its log)" if sent else
                               "not sent: the daemon closed the connection") from None
        except FlashlexError as exc:
            raise ReloadFailed(f"cannot read the reload's outcome: {exc}" if sent else
                               f"not sent: cannot read the daemon's status: {exc}") from None

    def reloads(answer: Dict[str, Any]) -> Dict[str, Any]:
        """{"done": N, "refused": reason or None, "notes": [line, ...]} of a status `answer`."""
        part: Optional[Dict[str, Any]] = answer.get("reload")
        if not isinstance(part, dict):  # a daemon older than this command
            raise ReloadFailed("this daemon does not report its reloads: restart it to run this version")
        return part

    deadline = time.monotonic() + timeout
    try:
        client = Client(socket_path, timeout=max(1.0, timeout))
    except FlashlexError as exc:
        raise ReloadFailed(f"not sent: cannot reach the daemon's API ({exc})") from None
    try:
        first = status(sent=False)
        if first.get("pid") != pid:  # a mistyped pid: SIGHUP ends most processes
            raise ReloadFailed(f"pid {pid} is not the flashlexd answering on {socket_path}"
                               f" (pid {first.get('pid')}); nothing sent")
        before = reloads(first)["done"]
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise ReloadFailed(f"cannot signal pid {pid}: {exc.strerror}") from None
        while True:
            outcome = reloads(status())
            if outcome["done"] > before:
                break
            if time.monotonic() > deadline:
                raise ReloadFailed(f"SIGHUP sent; no reload done within {timeout:g}s (see the daemon's log)")
            time.sleep(POLL)
        if outcome["refused"]:
            raise ReloadFailed(f"refused, still running the previous config: {outcome['refused']}")
        for note in [*(outcome.get("notes") or ()), *_code_note(first.get("version"))]:
            print(f"flashlexd reload: {note}", file=sys.stderr)  # applied, but not all of it at once
        restarted = [name for name in outcome.get("restarted") or () if name in LINKS]
        for line in _links_down(status, first, restarted, min(deadline, time.monotonic() + LINK_WAIT)):
            print(f"flashlexd reload: {line}", file=sys.stderr)
    finally:
        client.close()


def _code_note(running: Any) -> List[str]:
    """A daemon started before an upgrade runs its own code through any reload (its workers
    are forked from it): a new key read "unknown key, ignored" and no word of why (review
    "upgrade")."""
    import flashlexd
    if running == flashlexd.__version__:
        return []
    return [f"the daemon runs flashlexd {running}, {flashlexd.__version__} is installed: a reload keeps"
            f" the running code (a restart of the service runs the installed one)"]


def _links_down(status: Callable[[], Dict[str, Any]], before: Dict[str, Any], restarted: List[str],
                deadline: float) -> List[str]:
    """What the links the reload restarted say once each is up or has failed (by `deadline`):
    a broker name that does not resolve, or a certificate from another CA, was applied with
    exit 0 and no word, both links then down (review "reload"). One line each one is down."""
    old_pids = {w.get("name"): w.get("pid") for w in before.get("workers") or ()}
    down: Dict[str, str] = {}
    started = time.monotonic()
    while restarted:
        answer = status()
        pids = {w.get("name"): w.get("pid") for w in answer.get("workers") or ()}
        for name in restarted:
            link = (answer.get("mqtt") or {}).get(name) or {}
            if pids.get(name) in (None, old_pids.get(name)) or not (link.get("connected") or link.get("error")):
                continue  # not yet the new process's first outcome
            if not link.get("connected"):
                down[name] = str(link["error"])
            restarted = [other for other in restarted if other != name]
        if restarted and time.monotonic() > deadline:  # said as it is: a wait cut by --timeout is shorter
            waited = time.monotonic() - started
            return [*_down_lines(down), *(f"the {name} link is not up {waited:.0f} s after the reload (an old"
                                          f" process still stopping, or a broker slow to answer; see flashlexctl"
                                          f" status)" for name in restarted)]
        time.sleep(POLL)
    return _down_lines(down)


def _down_lines(down: Dict[str, str]) -> List[str]:
    return [f"the {name} link is down since the reload: {error} (the new config runs; see"
            f" flashlexctl status)" for name, error in down.items()]
