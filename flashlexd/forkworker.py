"""Workers made by fork without exec: the imported code is shared, not loaded four times.

A worker used to be `fork` + `exec python -m flashlexd.workers`: four interpreters each
importing the stdlib, ssl, paho, lmdb and flashlexd on their own (~12 MB private each). Forked
after `preload`, a worker shares those pages with the supervisor (copy on write), and
`gc.freeze()` keeps the collector from writing into the inherited objects' headers (which
would copy their pages one by one). The fork server also parses the config and builds the TLS
context once for the workers it forks next (`WorkerMaker.prepare`): they share the result. Workers are forked from the fork server (`forkserver`),
itself forked before the supervisor opens its LMDB environment, so no environment crosses a
fork.

What exec gave, and how the forked child (`become_worker`, which never returns) keeps it:
- Descriptors: every one but stdio and the link (CHANNEL_FD) is closed.
- Signals: inherited Python handlers and the wake-up fd are reset (SIG_DFL; SIGINT back to
  KeyboardInterrupt as in a fresh interpreter), the mask is emptied; ignored signals stay
  ignored, as across exec. The worker's loop then installs its own.
- Threads and locks: the fork server runs no thread, so none is missing and no lock is held
  in the child; stdio buffers are flushed before every fork (nothing is printed twice).
- The environment: systemd's notification variables are removed (`child_environment`).
- The child leaves by `os._exit` after flushing the logs: no atexit hook or finaliser of the
  supervisor's runs in it.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import traceback
from typing import Dict, Optional, Set, Tuple, Union

from flashlexd import mallocs
from flashlexd.channel import CHANNEL_FD, place_child_fds
from flashlexd.config import Config, ConfigError
from flashlexd.mqttclient import prepare_tls_context, uses_alpn
from flashlexd.workers.launch import WORKERS, read_config, run_worker, worker_class

EXIT_CHILD_FAILED = 70  # the child failed before its worker could report anything


def preload() -> None:
    """In the supervisor, once before the fork server is made: import every worker's code
    (shared with the fork server and the workers from then on) and freeze what exists, so no
    collection writes into it. Threads share one malloc arena from here on (`mallocs`)."""
    mallocs.one_arena()
    for name in WORKERS:
        worker_class(name)
    gc.freeze()  # no collection first: the holes it leaves would be filled (copied) after forks


def flush_stdio() -> None:
    """Before a fork: what is buffered would otherwise be written by parent and child."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


class WorkerMaker:
    """What the fork server needs to make workers: their environment, the command line's
    overrides, and the config parsed once in the server (`prepare`), so the workers forked
    with it share the parsed config instead of each parsing the YAML (~2.4 MB each)."""

    def __init__(self, env: Dict[str, str], config_path: str, data_dir: Optional[str] = None,
                 keys_dir: Optional[str] = None, log_level: Optional[str] = None):
        self.env = env
        self.config_path, self.data_dir, self.keys_dir = config_path, data_dir, keys_dir
        self.log_level = log_level
        self._config_file: Optional[Tuple[int, int]] = None  # which memfd was parsed
        self._config: Union[Config, ConfigError, None] = None

    def prepare(self, config_fd: int) -> None:
        """In the fork server: parse the config of memfd `config_fd` unless it is the one
        parsed last (each `ConfigFile` is a new memfd), and build the TLS context from the key
        files as they are now (a restarted worker reads them afresh, as an exec'd one did)."""
        identity = os.fstat(config_fd)
        key = (identity.st_dev, identity.st_ino)
        if key != self._config_file:
            try:
                self._config = read_config(config_fd, self.config_path, self.data_dir,
                                           self.keys_dir, self.log_level, close=False)
                self._config_file = key
            except ConfigError as exc:  # read again at the next start: what failed may be mended
                self._config = exc
        if isinstance(self._config, Config):
            thing = self._config.thing
            prepare_tls_context(thing.keys, uses_alpn(thing))

    def config(self) -> Config:
        """In the worker: the config `prepare` parsed."""
        if not isinstance(self._config, Config):
            raise self._config or ConfigError("no config from the supervisor")
        return self._config

    def become(self, name: str, link_fd: int) -> None:
        """In the forked child: drop what is not the worker's, run worker `name`, exit. Never
        returns."""
        code = EXIT_CHILD_FAILED
        try:
            gc.freeze()  # what was inherited: never traversed by this child's collections
            reset_signals()
            place_child_fds(link_fd, link_fd)
            close_inherited_fds(keep={CHANNEL_FD})
            os.environ.clear()
            os.environ.update(self.env)
            code = run_worker(name, self.config, self.log_level)
        except BaseException:  # noqa: BLE001 - the child must reach os._exit, whatever happened
            traceback.print_exc()
        finally:
            logging.shutdown()
            flush_stdio()
            os._exit(code)


def reset_signals() -> None:
    """Signal dispositions as a fresh interpreter after exec would have them."""
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if callable(handler):
            fresh = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, fresh)


def close_inherited_fds(keep: Set[int]) -> None:
    """Close every descriptor but stdio and `keep`."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own descriptor, already closed by listdir
