"""What the systemd unit must know from the config: where the store and the socket live, and
who may reach the socket. `flashlexd service` renders these into the unit, so that every
documented option works under its sandbox:

- data dir: `StateDirectory=` when under /var/lib (systemd makes it, owned by the service
  user), otherwise `ReadWritePaths=` (ProtectSystem=strict makes everything else read-only);
- socket dir: `RuntimeDirectory=` when under /run, otherwise `ReadWritePaths=`;
- `socket.group`: the service's `Group=` (or `SupplementaryGroups=` when --group names another),
  so the socket is created in that group without CAP_CHOWN, and the runtime dir is 0750 in it;
- `allowUids`: users outside that group, so the runtime dir is 0755 and the socket 0666; who
  may talk is decided by SO_PEERCRED on each connection.

The config is read leniently (only these keys, types checked): the unit can be rendered before
the key files are in place.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from flashlexd import paths
from flashlexd.config import DEFAULT_DATA_DIR, DEFAULT_SOCKET, ConfigError
from flashlexd.configkeys import MAX_STOP_TIMEOUT
from flashlexd.configtext import parse_yaml

HOME_DIRS = ("/home/", "/root/", "/run/user/")
STOP_TIMEOUT = 30  # seconds: TimeoutStopSec, at least
STOP_MARGIN = 20  # seconds beyond stopTimeoutSeconds: the supervisor's own stop
TMP_DIRS = ("/tmp/", "/var/tmp/")  # PrivateTmp=yes would hide them, or give the service its own


@dataclass(frozen=True)
class Places:
    data_dir: str = DEFAULT_DATA_DIR
    socket_path: str = DEFAULT_SOCKET
    socket_group: Optional[str] = None
    allow_uids: Tuple[int, ...] = ()
    key_files: Tuple[str, ...] = ()  # where the key files are (symlinks followed): readable too
    stop_timeout: float = 10.0  # flashlex.app.supervisor.stopTimeoutSeconds: systemd must wait longer


def read_places(config_path: Path, keys_dir: Optional[str] = None) -> Tuple[Places, Optional[str]]:
    """The unit's settings from the config file, and a note when the file cannot be read.
    `keys_dir`: what key file names are relative to (default: the config file's directory)."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Places(), f"config {config_path} not readable ({exc}): rendered with the defaults"
    document = parse_yaml(text, str(config_path))  # what `run` refuses (anchors, over 1 MiB) too
    app = _mapping(_mapping(document, "flashlex"), "app")
    db, socket = _mapping(app, "db"), _mapping(app, "socket")
    uids = socket.get("allowUids") or []
    if not isinstance(uids, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in uids):
        raise ConfigError("flashlex.app.socket.allowUids: expected a list of numeric uids")
    keys = _mapping(_mapping(_mapping(document, "flashlex"), "thing"), "keys")
    base = keys_dir or str(config_path.resolve().parent)
    key_files = tuple(os.path.realpath(os.path.join(base, name)) for name in
                      (_text(keys, key, "flashlex.thing.keys") for key in ("rootCA", "cert", "privateKey"))
                      if name)
    stop = _mapping(app, "supervisor").get("stopTimeoutSeconds")
    places = Places(data_dir=_absolute(db, "dataPath", "flashlex.app.db") or DEFAULT_DATA_DIR,
                    socket_path=_absolute(socket, "path", "flashlex.app.socket") or DEFAULT_SOCKET,
                    socket_group=_text(socket, "group", "flashlex.app.socket"),
                    allow_uids=tuple(uids), key_files=key_files,
                    # a bad value is the config's to refuse, at the start
                    stop_timeout=stop if isinstance(stop, (int, float)) and not isinstance(stop, bool)
                    and 0 < stop <= MAX_STOP_TIMEOUT else Places.stop_timeout)
    # a directory of their own: the unit makes it writable (or has systemd make it); /run or
    # /var/lib itself would be all of it made writable, and not the service user's to write in
    if socket_dir(places) in ("/run", "/var/lib", "/"):
        raise ConfigError(f"flashlex.app.socket.path: {places.socket_path} needs a directory of its"
                          f" own (e.g. /run/flashlexd/{os.path.basename(places.socket_path)}):"
                          f" the unit cannot make {socket_dir(places)} writable")
    if os.path.normpath(places.data_dir) in ("/run", "/var/lib", "/"):
        raise ConfigError(f"flashlex.app.db.dataPath: {places.data_dir} needs a directory of its own"
                          f" (e.g. /var/lib/flashlexd)")
    return places, None


def _mapping(value: Any, key: str) -> Dict[str, Any]:
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, dict) else {}


def _text(section: Dict[str, Any], key: str, path: str) -> Optional[str]:
    value = section.get(key)
    if value is not None and not isinstance(value, (str, int)):
        raise ConfigError(f"{path}.{key}: expected a string, got {type(value).__name__}")
    return None if value is None else str(value)


def _absolute(section: Dict[str, Any], key: str, path: str) -> Optional[str]:
    """A path key, absolute as `run` wants it: a relative one (or a number) rendered a unit
    whose ReadWritePaths= named another place, or one systemd refuses, where `run` exits 2."""
    value = _text(section, key, path)
    if value is not None and not os.path.isabs(value):
        raise ConfigError(f"{path}.{key}: must be an absolute path, got {value!r}")
    return value


def _under(path: str, base: str) -> Optional[str]:
    """`path` relative to `base` (a directory ending in /), or None when not below it."""
    normal = os.path.normpath(path)
    return normal[len(base):] if normal.startswith(base) and len(normal) > len(base) else None


def socket_dir(places: Places) -> str:
    directory = os.path.dirname(os.path.abspath(places.socket_path))
    return directory[len("/var"):] if directory == "/var/run" or directory.startswith("/var/run/") \
        else directory


def writable_dirs(places: Places) -> List[Tuple[str, int]]:
    """(directory, mode) of the directories systemd does not make for the unit: they go into
    `ReadWritePaths=`, and `flashlexd service --install` makes them (nothing else can: the
    sandbox leaves their parents read-only)."""
    found = []
    # a socket dir inside the data dir is the daemon's to make: made here first, the data dir
    # was made as its parent (root's, 0755), and systemd makes a StateDirectory= only later
    if not _under(socket_dir(places), "/run/") and not paths.within(Path(socket_dir(places)), Path(places.data_dir)):
        found.append((socket_dir(places), paths.SOCKET_DIR_MODE))
    if not _under(places.data_dir, "/var/lib/"):
        found.append((os.path.normpath(places.data_dir), _data_dir_mode(places)))
    return found


def _data_dir_mode(places: Places) -> int:
    return paths.data_dir_mode(Path(places.data_dir), Path(socket_dir(places)))


def unit_word(text: str, exec_line: bool = False) -> str:
    """`text` as one word of a unit setting: `%` is a specifier (written `%%`), whitespace
    splits words and quotes and backslashes are syntax (so such a word is double-quoted, its
    quotes and backslashes escaped), and on an Exec line `$` expands a variable (`$$`)."""
    text = text.replace("%", "%%")
    if exec_line:
        text = text.replace("$", "$$")
    if any(c.isspace() or c in "\\\"'" for c in text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def service_group(places: Places, user: str, group: str) -> str:
    """The unit's Group=: `--group`, else `socket.group`, else the user's primary group (on
    Debian `nobody`'s is `nogroup`: a group named as the user may not exist), or the user's
    name when there is no such user yet."""
    if group or places.socket_group:
        return group or places.socket_group  # type: ignore[return-value]
    import grp  # here: the daemon imports this module for its command line, never needs these
    import pwd
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        return user


def unit_values(places: Places, user: str, group: str, venv: str, config: str,
                keys: str) -> Dict[str, str]:
    """The template's placeholders for these places (each one whole lines, or empty)."""
    group = service_group(places, user, group)
    runtime = _under(socket_dir(places), "/run/")
    outsiders = bool(places.allow_uids) or bool(places.socket_group and places.socket_group != group)
    # kept at a stop: systemd removes a RuntimeDirectory= when a unit stops (or fails to start)
    # even while another unit's daemon has its socket there
    runtime_lines = (f"RuntimeDirectory={unit_word(runtime)}\nRuntimeDirectoryMode={'0755' if outsiders else '0750'}"
                     "\nRuntimeDirectoryPreserve=yes" if runtime else "")
    state = _under(places.data_dir, "/var/lib/")
    # systemd sets the mode again at each start: 0711 when the socket is inside it, as the daemon does
    state_lines = f"StateDirectory={unit_word(state)}\nStateDirectoryMode=0{_data_dir_mode(places):o}" if state else ""
    writable = [directory for directory, _ in writable_dirs(places)]
    # the venv's interpreter may live in a home too (pyenv): ProtectHome=yes would hide it
    interpreter = os.path.realpath(os.path.join(venv, "bin", "python3"))
    used = (venv + "/", interpreter, config, keys + "/", places.data_dir + "/", socket_dir(places) + "/",
            *places.key_files)
    in_home = any(p.startswith(HOME_DIRS) for p in used)
    in_tmp = any(p.startswith(TMP_DIRS) for p in used)
    return {
        # the program's path is not expanded by systemd (only its arguments are): no `$$`
        "flashlexd": unit_word(venv.rstrip("/") + "/bin/flashlexd"),
        "config": unit_word(config, exec_line=True), "keys": unit_word(keys, exec_line=True),
        "user": user, "group": group,
        "supplementary_groups": (f"SupplementaryGroups={places.socket_group}"
                                 if places.socket_group and places.socket_group != group else ""),
        "runtime_directory": runtime_lines,
        "state_directory": state_lines,
        # "-": a missing path does not stop the unit; the daemon then names the problem itself
        "read_write_paths": "ReadWritePaths=" + " ".join(unit_word(f"-{p}") for p in writable) if writable else "",
        "protect_home": "read-only" if in_home else "yes",
        "private_tmp": "no" if in_tmp else "yes",
        # the supervisor stops the workers within stopTimeoutSeconds (then SIGKILLs them), and
        # then itself: systemd's own SIGKILL of the whole unit must come later
        "timeout_stop": str(max(STOP_TIMEOUT, math.ceil(places.stop_timeout) + STOP_MARGIN)),
    }
