"""Entry point of a worker after the supervisor's fork + exec.

`python -m flashlexd.workers NAME --config FILE [--data-dir D] [--keys-dir K] [--log-level L]`
with the supervisor link on fd 3. Not meant to be run by hand.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import signal
import sys
from pathlib import Path

from setproctitle import setproctitle

from flashlexd import config as config_module
from flashlexd import logs
from flashlexd.channel import Channel, read_inherited_config
from flashlexd.configtext import MAX_CONFIG_BYTES
from flashlexd.store import StoreError
from flashlexd.workers.base import EXIT_BOOT_ERROR

WORKERS = {
    "ingress": "flashlexd.workers.ingress:IngressWorker",
    "egress": "flashlexd.workers.egress:EgressWorker",
    "expiry": "flashlexd.workers.expiry:ExpiryWorker",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashlexd-worker")
    parser.add_argument("name", choices=sorted(WORKERS))
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--keys-dir")
    parser.add_argument("--log-level")
    args = parser.parse_args(argv)
    setproctitle(f"flashlexd: {args.name}")
    # A worker the supervisor finds hung gets SIGABRT: faulthandler writes every thread's stack
    # to the log before it dies. SIGUSR1 writes the same without stopping it (for a look).
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logs.setup(args.log_level or "info", f"flashlexd[{args.name}]")
    log = logging.getLogger(f"flashlexd.{args.name}")
    channel = Channel.inherited()
    try:
        config = config_module.loads(_config_text(), Path(args.config),
                                     data_dir=args.data_dir, keys_dir=args.keys_dir,
                                     log_level=args.log_level)
        logging.getLogger().setLevel(config.log_level.upper())
        module_name, class_name = WORKERS[args.name].split(":")
        worker_class = getattr(importlib.import_module(module_name), class_name)
        return worker_class(config, channel).run()
    except (config_module.ConfigError, StoreError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_BOOT_ERROR


def _config_text() -> str:
    """The config text the supervisor validated, inherited on CONFIG_FD."""
    try:
        return read_inherited_config(MAX_CONFIG_BYTES)
    except (OSError, ValueError) as exc:
        raise config_module.ConfigError(f"no config from the supervisor: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
