"""`flashlexd service`: the systemd unit, rsyslog rule and logrotate file for one install.

What the FlashLex guide had users copy and edit by hand (the `{{dir}}` template), rendered from
the files in packaging/ and, with `--install`, put in place. The rendered text is the only thing
written to stdout, so `flashlexd service ... > unit` works; notes go to stderr.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Set, Tuple

from flashlexd import paths
from flashlexd.config import ConfigError
from flashlexd.unitplaces import Places, read_places, service_group, unit_values, writable_dirs

EXIT_CONFIG = 2
EXIT_WRITE = 1  # the file could not be written
# what a data dir holds: LMDB's two files, the ack journal, the lock, and the space reserve
# (made by the first append, so in every data dir that ever stored a message)
STORE_FILES = {"data.mdb", "lock.mdb", "acks.journal", paths.LOCK_NAME, "space.reserve"}
UNIT_ENV = "FLASHLEXD_UNIT"  # the unit template's digest, set by the unit this release renders
REPO_PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
INSTALLED_PACKAGING = Path(sys.prefix) / "share" / "flashlexd"
FILES = {  # kind -> (file under packaging/ in the repo, name when installed, target on the system)
    "unit": ("systemd/flashlexd.service", "flashlexd.service", "etc/systemd/system/flashlexd.service"),
    "rsyslog": ("rsyslog/flashlexd.conf", "flashlexd.conf", "etc/rsyslog.d/flashlexd.conf"),
    "logrotate": ("logrotate/flashlexd", "flashlexd", "etc/logrotate.d/flashlexd"),
}


def template(kind: str) -> str:
    """A packaging file's text: from the source tree, or from the installed share directory."""
    in_repo, installed, _ = FILES[kind]
    for path in (REPO_PACKAGING / in_repo, INSTALLED_PACKAGING / installed):
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"packaging file {in_repo} not found (is flashlexd installed?)")


def template_digest(text: str) -> str:
    """The unit template's mark, rendered into the unit (UNIT_ENV) for `stale_unit_note`."""
    import hashlib  # here: only the daemon's start and `service` need it
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stale_unit_note() -> Optional[str]:
    """A daemon under systemd whose unit is not the one this release renders: an upgrade
    that skipped `flashlexd service --install` kept the earlier unit's settings and hardening
    (`ReadOnlyPaths=/run` missing, review "upgrade") with no word. None when it is, or when
    not under systemd."""
    if not os.environ.get("INVOCATION_ID"):
        return None
    try:
        current = template_digest(template("unit"))
    except OSError as exc:
        return f"cannot tell whether the systemd unit is this release's: {exc}"
    if os.environ.get(UNIT_ENV) == current:
        return None
    return ("the systemd unit was not rendered by this release's `flashlexd service` (an earlier"
            " release's, or written by hand): its settings and hardening may lack this release's;"
            " `flashlexd service ... --install` with the same options, then `systemctl daemon-reload`"
            " and a restart")


def render_unit(venv: str, config: str, user: str = "root", group: str = "",
                places: Optional[Places] = None, keys: Optional[str] = None) -> str:
    """The unit text for this install, with the data dir, socket and access from `places`. The
    keys dir is always explicit (default: the config file's directory), so the unit never
    depends on a default that differed between the FlashLex SDK and flashlexd."""
    values = unit_values(places or Places(), user, group, venv, config, keys or str(Path(config).parent))
    text = template("unit")
    values["unit_digest"] = template_digest(text)
    lines = []
    for line in text.splitlines():
        if line.startswith("{{") and line.endswith("}}") and not values[line[2:-2]]:
            continue  # a placeholder of whole lines with nothing to say here
        for name, value in values.items():
            line = line.replace("{{" + name + "}}", value)
        lines.append(line)
    return "\n".join(lines) + "\n"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "service", help="render or install the systemd unit (and rsyslog/logrotate files)",
        description="Render packaging/systemd/flashlexd.service for this install to stdout (or"
                    " --output), or --install it. --rsyslog / --logrotate do the same for the log files.")
    parser.add_argument("--dir", required=True, help="install directory (holds venv/ and keys/)")
    parser.add_argument("--venv", help="virtualenv with flashlexd (default: DIR/venv)")
    parser.add_argument("--config", help="config file (default: DIR/keys/config.yml)")
    parser.add_argument("--keys-dir", "-k", help="directory of the key files, rendered as"
                                                 " --keys-dir (default: the config file's directory)")
    parser.add_argument("--user", default=os.environ.get("SUDO_USER") or "root",
                        help="user the service runs as (default: $SUDO_USER, else root)")
    parser.add_argument("--group", default="", help="group of the service and socket (default: flashlex.app.socket.group, else the user's"
                        " primary group)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--rsyslog", action="store_true", help="the rsyslog rule instead of the unit")
    what.add_argument("--logrotate", action="store_true", help="the logrotate file instead of the unit")
    parser.add_argument("--output", "-o", help="write to this file instead of stdout")
    parser.add_argument("--install", action="store_true",
                        help="write it to its place under /etc and reload systemd")
    parser.add_argument("--root", default="/", help=argparse.SUPPRESS)  # tests install into a tree


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    kind = "rsyslog" if args.rsyslog else "logrotate" if args.logrotate else "unit"
    places = Places()
    if kind == "unit":
        config = Path(args.config).resolve() if args.config else directory / "keys" / "config.yml"
        try:
            places, note = read_places(config, str(Path(args.keys_dir).resolve()) if args.keys_dir else None)
        except ConfigError as exc:
            print(f"flashlexd: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if note:
            print(f"note: {note}", file=sys.stderr)
        venv = str(Path(args.venv).resolve()) if args.venv else str(directory / "venv")
        keys = str(Path(args.keys_dir).resolve()) if args.keys_dir else str(config.parent)
        exposed = _exposed(places, {"config": str(config), "keys dir": keys, "venv": venv,
                                    **{f"key file {f}": f for f in places.key_files}})
        if exposed:
            print(f"flashlexd: {exposed}", file=sys.stderr)
            return EXIT_CONFIG
        _warn_unreadable(args.user, (service_group(places, args.user, args.group), places.socket_group),
                         {str(config): "config", **{f: "key file" for f in places.key_files}})
        _warn_no_program(venv, bool(args.venv))
        text = render_unit(venv, str(config), args.user, args.group, places, keys)
    else:
        text = template(kind)
    target: Optional[Path] = Path(args.output) if args.output else None
    if args.install and target is None:  # --install --output: a second thing's unit, its own name
        target = Path(args.root) / FILES[kind][2]
    elif args.install and kind == "unit" and target is not None and target.suffix != ".service":
        print(f"flashlexd: --output {target}: a unit's name ends in .service (systemd reads no"
              f" other): e.g. /etc/systemd/system/flashlexd-NAME.service", file=sys.stderr)
        return EXIT_CONFIG
    if target is None:
        sys.stdout.write(text)
        return 0
    other = _other_config(target, text) if kind == "unit" else None
    if other:
        print(f"flashlexd: {target} runs another config ({other}); writing it would switch that"
              f" service to this one: remove it first if that is meant, or install this unit under"
              f" another name (--install --output /etc/systemd/system/flashlexd-NAME.service)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        paths.make_dir(target.parent, 0o755)  # explicit modes: a loose umask must not widen them
        target.write_text(text)
        target.chmod(0o644)
    except paths.UnsafePath as exc:
        print(f"flashlexd: cannot write {target}: {exc}", file=sys.stderr)
        return EXIT_WRITE
    except OSError as exc:
        print(f"flashlexd: cannot write {target}: {exc.strerror or exc}"
              f"{' (run it as root)' if args.install and exc.errno == errno.EACCES else ''}", file=sys.stderr)
        return EXIT_WRITE
    print(f"wrote {target}", file=sys.stderr)
    if args.install:
        live = Path(args.root) == Path("/")
        if kind == "unit" and live:
            make_directories(places, args.user, service_group(places, args.user, args.group))
        _after_install(kind, live, target)
    elif kind == "unit":
        missing = [d for d, _ in writable_dirs(places) if not os.path.isdir(d)]
        if missing:  # the sandbox keeps the daemon from making them: it would restart every 2 s
            print(f"note: {', '.join(missing)} must exist, owned by the service user, before the"
                  f" service starts: --install (with --output for this name) makes them", file=sys.stderr)
    return 0


def _other_config(target: Path, text: str) -> Optional[str]:
    """The config an installed unit at `target` runs, when not the one `text` runs: a second
    thing's --install replaced the first one's unit without a word."""
    def config_word(unit: str) -> Optional[str]:
        line = next((text for text in unit.splitlines() if text.startswith("ExecStart=")), "")
        return line.partition(" --config ")[2].partition(" --keys-dir ")[0] or None
    try:
        old = config_word(target.read_text(errors="replace"))
    except OSError:
        return None  # none yet, or unreadable: writing it says why
    return old if old is not None and old != config_word(text) else None


def _exposed(places: Places, used: Dict[str, str]) -> Optional[str]:
    """Why the unit would make the daemon's own program, config or keys writable (a data or
    socket dir that holds them goes into ReadWritePaths=), or None."""
    for directory, _ in writable_dirs(places):
        for what, path in used.items():
            if os.path.normpath(path) == directory or os.path.normpath(path).startswith(directory + "/"):
                setting = ("flashlex.app.db.dataPath" if directory == os.path.normpath(places.data_dir)
                           else "flashlex.app.socket.path")
                return (f"{setting}: {directory} holds the {what} ({path}): the unit would make it"
                        f" writable to the daemon; give it a directory of its own (e.g."
                        f" /var/lib/flashlexd, /run/flashlexd/flashlexd.sock)")
    return None


def _warn_no_program(venv: str, named: bool) -> None:
    """The unit runs VENV/bin/flashlexd: without it systemd fails every start (203/EXEC) before
    the daemon can say a word (a unit rendered for a venv not made, or made elsewhere)."""
    program = Path(venv) / "bin" / "flashlexd"
    if not os.access(program, os.X_OK):
        where = "" if named else ", or name the venv with --venv"
        print(f"warning: there is no program {program}: systemd would fail the service's every start"
              f" (203/EXEC) and restart it every 2 s; install flashlexd into {venv}{where}",
              file=sys.stderr)


def _warn_unreadable(user: str, groups: Tuple[str, Optional[str]], files: Dict[str, str]) -> None:
    """One warning per file the service could not read: the daemon would exit 2 at its start,
    after the unit was installed and enabled (one instead for a user or group not made yet).
    Works out the service's groups as systemd sets them (Group=, SupplementaryGroups= and the
    user's own), without running as the user."""
    import grp  # here: see make_directories
    import pwd
    group, socket_group = groups
    socket_group = socket_group if socket_group != group else None  # Group= itself
    account = _account(pwd.getpwnam, pwd.getpwuid, user)
    primary, extra = (_account(grp.getgrnam, grp.getgrgid, name) if name else None
                      for name in (group, socket_group))
    # a group named as a missing user is the one Group= defaults to for it (useradd makes both)
    missing = [f"{what} {name!r}" for what, name, found in (
        ("user", user, account), ("group", group, primary if account or group != user else True),
        ("group", socket_group, extra)) if name and found is None]
    for what in missing:  # systemd fails the start before the daemon runs: no line of ours, no exit 2
        print(f"warning: there is no {what}: systemd would fail the service's every start"
              f" (216/GROUP or 217/USER) and restart it every 2 s; create it before"
              f" `systemctl enable --now`", file=sys.stderr)
    if missing:
        return
    uid = account.pw_uid
    gids = set(os.getgrouplist(account.pw_name, primary.gr_gid))
    if extra is not None:  # SupplementaryGroups= when --group names another group
        gids.add(extra.gr_gid)
    for path, what in files.items():
        reason = _unreadable_because(Path(path), uid, gids)
        if reason:
            print(f"warning: {user} cannot read the {what} {path}: {reason}; the service would"
                  f" not start (chown or chmod it, or give {user} a group that may read it)",
                  file=sys.stderr)


def _account(by_name: Callable[[str], Any], by_id: Callable[[int], Any], name: str) -> Any:
    """The passwd or group entry systemd's User=/Group= would find: a name, or a number."""
    try:
        return by_id(int(name)) if name.isdigit() else by_name(name)
    except (KeyError, OverflowError):
        return None


def _unreadable_because(path: Path, uid: int, gids: Set[int]) -> Optional[str]:
    """Why `uid` in `gids` cannot read `path`, or None. Modes and owners only, root's too: the
    unit keeps no capability (CapabilityBoundingSet=), so root gets no override (ACLs not read)."""
    try:
        for directory in reversed(path.parents):  # each must let it search (x), / first
            if not _permits(directory.stat(), uid, gids, 0o1):
                return f"its directory {directory} is closed to it ({_mode_and_owner(directory.stat())})"
        if not _permits(path.stat(), uid, gids, 0o4):
            return _mode_and_owner(path.stat())
    except OSError:
        return None  # a missing file: the config check names it at the start
    return None


def _permits(st: os.stat_result, uid: int, gids: Set[int], bit: int) -> bool:
    """The kernel's choice of the owner, group or others bits, then `bit` (4 read, 1 search)."""
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
    return bool(st.st_mode >> shift & bit)


def _mode_and_owner(st: os.stat_result) -> str:
    import grp
    import pwd
    owner = f"{_name(pwd.getpwuid, st.st_uid)}:{_name(grp.getgrgid, st.st_gid)}"
    return f"mode {st.st_mode & 0o7777:04o}, owner {owner}"


def _name(lookup: Callable[[int], Any], number: int) -> str:
    """A user or group name (an entry's first field), or the number when there is none."""
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def make_directories(places: Places, user: str, group: str) -> None:
    """The data and socket dirs that systemd does not make (outside /var/lib and /run), made
    now as the daemon would, owned by the service user: inside the sandbox only they are
    writable, so the daemon could not make them itself."""
    import grp  # here: the daemon (which imports this module for its command line) never needs them
    import pwd
    import shutil
    dirs = writable_dirs(places)
    if not dirs:
        return  # systemd makes them (StateDirectory=, RuntimeDirectory=): no user to look up
    missing = f"user {user!r}"
    try:
        uid = pwd.getpwnam(user).pw_uid
        missing = f"group {group!r}"
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        print(f"warning: there is no {missing} yet: {', '.join(d for d, _ in dirs)} not made;"
              f" create it, then run `flashlexd service ... --install` again", file=sys.stderr)
        return
    for directory, mode in dirs:
        if not os.path.isdir(directory):
            paths.make_dir(Path(directory), mode)
            shutil.chown(directory, user, group)
            print(f"created {directory} ({mode:04o}, {user}:{group})", file=sys.stderr)
        elif directory == os.path.normpath(places.data_dir) and os.stat(directory).st_uid != uid \
                and _only_a_store(directory):
            # a data dir left by a run as root (`sudo flashlexd run`, an install for another
            # user): the service user could open neither its lock nor its store. Taken over as
            # systemd takes over a StateDirectory=, when it holds nothing but the store's
            # regular files (never through a link: a planted `data.mdb -> /etc/shadow`)
            for name in (".", *os.listdir(directory)):
                os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)
            print(f"{directory} was not {user}'s: now {user}:{group}'s", file=sys.stderr)
        elif os.stat(directory).st_uid != uid and uid != 0:
            print(f"warning: {directory} is not {user}'s: the service cannot write there"
                  f" (chown it, or choose a directory of its own)", file=sys.stderr)


def _only_a_store(directory: str) -> bool:
    """Whether `directory` holds nothing but a store's regular files (no link, nothing else)."""
    names = os.listdir(directory)
    return set(names) <= STORE_FILES and all(
        os.path.isfile(path) and not os.path.islink(path) for path in (os.path.join(directory, n) for n in names))


def _after_install(kind: str, live: bool, target: Path) -> None:
    if kind == "unit" and live:
        import subprocess  # noqa: E402 - see make_directories
        reload = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if reload.returncode != 0:
            print(f"systemctl daemon-reload failed: {reload.stderr.strip() or reload.returncode}",
                  file=sys.stderr)
    name = target.name.removesuffix('.service')
    # an upgrade's install again: the daemon running goes on under the earlier unit until restarted
    next_step = {"unit": f"systemctl enable --now {name} (running already: systemctl restart {name})",
                 "rsyslog": "systemctl restart rsyslog",
                 "logrotate": f"logrotate -d {target}  # to check it"}[kind]
    print(f"next: {next_step}", file=sys.stderr)
