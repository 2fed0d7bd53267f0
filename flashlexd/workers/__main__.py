"""Entry point of a worker run as its own program (the daemon forks its workers instead, see
`flashlexd.forkworker`).

`python -m flashlexd.workers NAME --config FILE [--data-dir D] [--keys-dir K] [--log-level L]`
with the supervisor link on fd 3 and the config text on fd 4. Not meant to be run by hand.
"""
from __future__ import annotations

import argparse
import sys

from flashlexd.channel import CONFIG_FD
from flashlexd.workers.launch import WORKERS, read_config, run_worker


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashlexd-worker")
    parser.add_argument("name", choices=sorted(WORKERS))
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--keys-dir")
    parser.add_argument("--log-level")
    args = parser.parse_args(argv)
    return run_worker(args.name, lambda: read_config(CONFIG_FD, args.config, args.data_dir,
                                                     args.keys_dir, args.log_level), args.log_level)


if __name__ == "__main__":
    sys.exit(main())
