"""The `flashlexd` command: `run` (the daemon, in the foreground, as systemd wants it),
`check` (the old bootstrap: is this thing ready?) and `service` (systemd/rsyslog/logrotate files)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from flashlexd import __version__, check, logs, service
from flashlexd.config import ConfigError, LOG_LEVELS

EXIT_CONFIG = 2
EXIT_START = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashlexd",
        description="On-device durable message cache for FlashLex / AWS IoT things.")
    parser.add_argument("--version", action="version", version=f"flashlexd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground (systemd Type=notify)",
                              description="Run the supervisor and its ingress, egress and expiry"
                                          " workers in the foreground.")
    run.add_argument("--config", "-c", required=True, help="FlashLex YAML config file")
    run.add_argument("--data-dir", "-d", help="store directory (default: flashlex.app.db.dataPath,"
                                              " else /var/lib/flashlexd)")
    run.add_argument("--keys-dir", "-k", help="directory the key file names are relative to"
                                              " (default: the config file's directory)")
    run.add_argument("--socket", help="API socket path (default: $FLASHLEXD_SOCKET, config,"
                                      " /run/flashlexd/flashlexd.sock)")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="default: flashlex.app.logLevel or info")
    check.add_parser(commands)
    service.add_parser(commands)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"flashlexd: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from flashlexd.ipc.server import ServerError
    from flashlexd.store import StoreError
    from flashlexd.supervisor import Overrides, Supervisor

    overrides = Overrides(args.config, args.data_dir, args.keys_dir, args.socket, args.log_level)
    try:
        config = overrides.load()
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    logs.setup(config.log_level, "flashlexd")
    for warning in config.warnings:
        logging.getLogger("flashlexd").warning("%s", warning)
    try:
        return Supervisor(config, overrides).run()
    except (StoreError, ServerError) as exc:
        return _fail(f"cannot start: {exc}", EXIT_START)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "check":
        return check.run(args)
    if args.command == "service":
        return service.run(args)
    raise AssertionError(args.command)
