"""A worker's start, whichever way its process was made: after the supervisor's fork (the
daemon) or from `python -m flashlexd.workers` (a worker run alone, as the tests do).

Given its link and the config text the supervisor validated, it names the process, arms
faulthandler, sets up logging, builds the worker and runs its loop; returns the exit code.
"""
from __future__ import annotations

import faulthandler
import importlib
import logging
from pathlib import Path
from typing import Callable, Optional

from setproctitle import setproctitle

from flashlexd import config as config_module
from flashlexd import logs
from flashlexd.channel import Channel, read_inherited_config
from flashlexd.config import Config
from flashlexd.configtext import MAX_CONFIG_BYTES
from flashlexd.oomscore import prefer_for_oom
from flashlexd.store import StoreError
from flashlexd.workers.base import EXIT_BOOT_ERROR

WORKERS = {
    "ingress": "flashlexd.workers.ingress:IngressWorker",
    "egress": "flashlexd.workers.egress:EgressWorker",
    "expiry": "flashlexd.workers.expiry:ExpiryWorker",
}


def worker_class(name: str) -> type:
    module_name, class_name = WORKERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def read_config(fd: int, config_path: str, data_dir: Optional[str] = None,
                keys_dir: Optional[str] = None, log_level: Optional[str] = None,
                close: bool = True) -> Config:
    """The config the supervisor validated, from its memfd `fd`, with the command line's
    overrides; raises ConfigError."""
    try:
        text = read_inherited_config(MAX_CONFIG_BYTES, fd, close)
    except (OSError, ValueError) as exc:
        raise config_module.ConfigError(f"no config from the supervisor: {exc}") from None
    return config_module.loads(text, Path(config_path), data_dir=data_dir, keys_dir=keys_dir,
                               log_level=log_level, validated=True)


def run_worker(name: str, config: Callable[[], Config], log_level: Optional[str] = None) -> int:
    """Run worker `name` to its end, with the link on CHANNEL_FD; `config()` gives its config
    or raises ConfigError."""
    setproctitle(f"flashlexd: {name}")
    # A worker the supervisor finds hung gets SIGABRT: faulthandler writes every thread's stack
    # to the log before it dies. SIGUSR1 writes the same without stopping it (for a look).
    faulthandler.enable(all_threads=True)
    logs.dump_stacks_on_sigusr1(name)
    logs.setup(log_level or "info", f"flashlexd[{name}]")
    log = logging.getLogger(f"flashlexd.{name}")
    problem = prefer_for_oom()  # taken by the OOM killer before the supervisor
    if problem:
        log.debug("%s", problem)
    channel = Channel.inherited()
    try:
        loaded = config()
        logging.getLogger().setLevel(loaded.log_level.upper())
        return worker_class(name)(loaded, channel).run()
    except (config_module.ConfigError, StoreError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_BOOT_ERROR
