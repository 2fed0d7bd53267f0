"""`flashlexd store verify | recover`: the command line of `storetools`.

The store is named by `--data-dir`, or by `--config` (its `flashlex.app.db.dataPath`), like
`flashlexd run` does. Output is one line per database and a verdict; exit 0 when the store
reads back whole (verify) or a new store was written (recover), 1 otherwise, 2 bad usage.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Tuple

from flashlexd.config import DEFAULT_DATA_DIR, ConfigError

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE = 0, 1, 2
DEFAULT_CAP_BYTES = 256 * 1024 * 1024  # flashlex.app.db.capMegabytes' default, without --config


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "store", help="verify a store, or recover what is readable from a damaged one",
        description="verify: walk every database of the store and decode every record (exit 0"
                    " when all of it reads back, 1 otherwise). recover --to DIR: copy every"
                    " readable record into a fresh store in DIR and report what was lost.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("verify", "check that every record of the store reads back"),
                       ("recover", "copy every readable record into a fresh store")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--config", "-c", help="FlashLex config file (for its dataPath)")
        action.add_argument("--data-dir", "-d", help="store directory (wins over --config;"
                                                     f" default {DEFAULT_DATA_DIR})")
        action.add_argument("--keys-dir", "-k", help="directory the config's key file names are"
                                                     " relative to, as for run (default: the config"
                                                     " file's directory)")
        if name == "recover":
            action.add_argument("--to", required=True, metavar="DIR",
                                help="new, empty directory for the recovered store")


def _data_dir_and_cap(args: argparse.Namespace) -> Tuple[Path, int]:
    if args.config:
        from flashlexd import config as config_module

        store = config_module.load(args.config, data_dir=args.data_dir, keys_dir=args.keys_dir).store
        return Path(store.data_dir), store.cap_bytes
    return Path(args.data_dir or DEFAULT_DATA_DIR), DEFAULT_CAP_BYTES


def run(args: argparse.Namespace) -> int:
    try:
        data_dir, cap = _data_dir_and_cap(args)
    except ConfigError as exc:
        print(f"flashlexd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from flashlexd import paths, storetools  # lmdb: loaded only for this command

    with paths.holding_off(data_dir) as running:  # and none starts until the end
        if running:  # its writes could reuse pages under these readers, which take no LMDB slots
            print(f"flashlexd: a flashlexd (pid {running}) is running on data dir {data_dir}:"
                  f" stop it first", file=sys.stderr)
            return EXIT_DAMAGED
        if args.action == "verify":
            ok, lines = storetools.verify(data_dir)
        else:
            ok, lines = storetools.recover(data_dir, Path(args.to).resolve(), cap)
    for line in lines[:-1]:
        print(line)
    print(lines[-1], file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_DAMAGED
