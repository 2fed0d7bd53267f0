"""The `flashlexd` command: `run` (the daemon, in the foreground, as systemd wants it),
`check` (the old bootstrap: is this thing ready?), `service` (systemd/rsyslog/logrotate files),
`store` (verify, recover) and `reload` (the unit's ExecReload)."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from typing import List, Optional

from flashlexd import __version__, logs, reloadcmd, service, storecmd
from flashlexd.argtypes import positive_seconds
from flashlexd.config import ConfigError, LOG_LEVELS, trusted_files
from flashlexd.oldstore import old_store_note

EXIT_CONFIG = 2
EXIT_START = 1
CHECK_TIMEOUT = 10.0  # seconds each network step of `flashlexd check` may take


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The FlashLex SDK's options: the config file, and where the store and key files are."""
    parser.add_argument("--config", "-c", required=True, help="FlashLex YAML config file")
    parser.add_argument("--data-dir", "-d", help="store directory (default: flashlex.app.db.dataPath,"
                                                 " else /var/lib/flashlexd)")
    parser.add_argument("--keys-dir", "-k", help="directory the key file names are relative to"
                                                 " (default: the config file's directory)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashlexd",
        description="On-device durable message cache for FlashLex / AWS IoT things.")
    parser.add_argument("--version", action="version", version=f"flashlexd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground (systemd Type=notify)",
                              description="Run the supervisor and its ingress, egress and expiry"
                                          " workers in the foreground.")
    _add_config_arguments(run)
    run.add_argument("--socket", help="API socket path (default: $FLASHLEXD_SOCKET, config,"
                                      " /run/flashlexd/flashlexd.sock)")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="default: flashlex.app.logLevel or info")
    run.add_argument("--allow-insecure-key", action="store_true",
                     help="start even if the private key file is readable by group or others"
                          " (refused otherwise, exit 2)")
    _add_check_parser(commands)
    service.add_parser(commands)
    storecmd.add_parser(commands)
    reloadcmd.add_parser(commands)
    return parser


def run_config(argv: List[str]) -> Optional[str]:
    """The --config a `flashlexd run ...` command line (from `run` on) runs with, as our own
    parser reads it (abbreviations, `-c=X`, the last of several); None if it does not parse."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = _parser().parse_known_args(argv)
    except SystemExit:
        return None
    return getattr(args, "config", None)


def _add_check_parser(commands) -> None:
    parser = commands.add_parser(
        "check", help="check that this device is ready: config, keys, broker, MQTT, store",
        description="Check step by step that flashlexd can run here: the config file, the key"
                    " files, the broker (DNS, TCP, TLS), an MQTT connect, a probe message"
                    " published to the ingress topic and received back, and the store. Exit"
                    " status 0 only if every step passes. A running flashlexd also receives the"
                    ' probe message and stores it.')
    _add_config_arguments(parser)
    parser.add_argument("--timeout", type=positive_seconds, default=CHECK_TIMEOUT, metavar="S",
                        help=f"seconds each network step may take (default: {CHECK_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true",
                        help='print {"ok": ..., "steps": [{"name", "status", "detail"}]} instead of lines')



def _fail(message: str, code: int) -> int:
    # under systemd every line carries its priority (logs.py): without it journald files the
    # reason the service did not start at LOG_INFO, out of `journalctl -p err`
    priority = "<3>" if logs.under_systemd() else ""
    print(f"{priority}flashlexd: {message}", file=sys.stderr)
    return code


def _hold_hangups() -> List[int]:
    """Until the supervisor installs its handlers, a SIGHUP's default action would end the
    daemon without a word: note it instead, for the supervisor to reload once it runs. A
    Python handler, not SIG_IGN, so that what start-up execs (the key check) gets the default."""
    from flashlexd import hangups  # installed already when started by `python -m` or the script
    return hangups.hold()


def _no_core_files() -> None:
    """A hung worker gets SIGABRT: its core file would hold the thing's private key (the unit
    sets LimitCORE=0; this covers `flashlexd run` by hand after `ulimit -c unlimited`)."""
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def run(args: argparse.Namespace) -> int:
    hangups = _hold_hangups()
    _no_core_files()
    from flashlexd.ipc.server import ServerError
    from flashlexd.ipc.socketfile import SocketGroupError
    from flashlexd.paths import AlreadyRunning, UnsafePath, control_warnings
    from flashlexd.store import StoreError
    from flashlexd.storebase import NewerSchema
    from flashlexd.supervisor import Overrides, Supervisor

    overrides = Overrides(args.config, args.data_dir, args.keys_dir, args.socket, args.log_level,
                          args.allow_insecure_key)
    try:
        config = overrides.load()
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    logs.setup(config.log_level, "flashlexd")
    for warning in [*config.warnings, old_store_note(config.store.data_dir), service.stale_unit_note(),
                    *control_warnings(trusted_files(config), os.geteuid())]:
        if warning:
            logging.getLogger("flashlexd").warning("%s", warning)
    try:
        return Supervisor(config, overrides, hangups).run()
    except (SocketGroupError, NewerSchema) as exc:  # a restart would fail the same way
        return _fail(f"cannot start: {exc}", EXIT_CONFIG)
    except (StoreError, ServerError, UnsafePath, AlreadyRunning) as exc:
        return _fail(f"cannot start: {exc}", EXIT_START)


def _check(args: argparse.Namespace) -> int:
    """`flashlexd check`: its output failing (`--json > file` on a full disk) is one line, exit 1,
    not a traceback; a reader gone (`check | head -1`) leaves its result the exit code."""
    from flashlexd import check  # ssl and friends: not loaded by the daemon's own process
    from flashlexd.client.ctlview import flushed, output_failed, shown

    try:
        return flushed(check.run(args, shown))
    except OSError as exc:
        return output_failed("flashlexd", exc)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    from flashlexd.client.ctlview import reader_gone

    try:  # `flashlexd service --dir D | head` (check keeps its result: `_check`)
        if args.command == "check":
            return _check(args)
        if args.command == "service":
            return service.run(args)
        if args.command == "store":
            return storecmd.run(args)
        if args.command == "reload":
            return reloadcmd.run(args)
    except BrokenPipeError:
        return reader_gone()
    raise AssertionError(args.command)
