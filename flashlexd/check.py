"""`flashlexd check`: is this device ready to run flashlexd? The FlashLex SDK 1.4 `bootstrap.py`,
done step by step, each step saying what it saw or, in one line, why it failed.

1. config  the config file loads and validates (its warnings are shown as the detail);
2. keys    certificate and private key are PEM, match each other, the certificate is within
           its validity period, the private key is not readable by group or others;
3. broker  DNS resolves the endpoint, TCP reaches the port, the TLS handshake verifies the
           broker's certificate against rootCA and host name, and the broker accepts ours (with
           TLS 1.3 it says so only after the handshake: this step waits up to VERDICT_WAIT for
           its session ticket or alert; a broker that sends neither leaves it to step 4);
4. mqtt    the broker accepts an MQTT CONNECT, under client id `<thing name>-check` and a clean
           session, so a running daemon (other ids) is not disturbed and nothing stays behind;
5. probe   subscribe to the ingress topic at QoS 1, publish `{"flashlexd-check": "<uuid>"}` to
           it at QoS 1 and time its return. A running flashlexd (or its persistent session on
           the broker) receives the probe too and stores it in its inbox, like any message;
6. store   the data directory is writable and the store opens, its pages walked unless a running
           daemon holds it (nothing is written to it; a store that does not exist yet is not
           made: `flashlexd run` makes it, as the service's user).

A step that cannot run because one it needs failed is skipped. `--timeout` bounds each network
step. No key material is ever printed: only file names, dates and modes. This module runs the
steps; `checkcerts` inspects the key files (step 2), `checkprobe` talks to the broker (3-5).
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from flashlexd import config as config_module, paths
from flashlexd.checkcerts import Failed, check_keys
from flashlexd.checkprobe import ProbeSession, check_broker
from flashlexd.config import Config, ConfigError
from flashlexd.oldstore import old_store_note
from flashlexd.ratelimit import describe_rate


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # "ok", "fail" or "skip"
    detail: str

    def line(self) -> str:
        label = {"ok": "ok", "fail": "FAIL", "skip": "skip"}[self.status]
        return f"{label:<4} {self.name}: {self.detail}"

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail}


# -- the command line ---------------------------------------------------------------------------

def run(args: argparse.Namespace, show: Callable[[str], None]) -> int:
    """`show` prints a line at once; the CLI's goes on when the reader went (`check | head -1`):
    the exit code is the check's result."""
    printer: Optional[Callable[[Step], None]] = None
    if not args.json:
        printer = lambda step: show(step.line())  # noqa: E731
    steps = check(args.config, keys_dir=args.keys_dir, data_dir=args.data_dir,
                  timeout=args.timeout, on_step=printer)
    ok = all(step.status == "ok" for step in steps)
    show(json.dumps({"ok": ok, "steps": [step.to_dict() for step in steps]}, indent=2) if args.json
         else verdict(steps))
    return 0 if ok else 1


def verdict(steps: List[Step]) -> str:
    failed = [step.name for step in steps if step.status == "fail"]
    skipped = [step.name for step in steps if step.status == "skip"]
    if not failed and not skipped:
        return f"READY: all {len(steps)} checks passed"
    text = f"NOT READY: {len(failed)} of {len(steps)} checks failed ({', '.join(failed)})"
    if skipped:
        text += f", {len(skipped)} skipped ({', '.join(skipped)})"
    return text


# -- the steps ----------------------------------------------------------------------------------

def check(config_path: str, timeout: float, keys_dir: Optional[str] = None,
          data_dir: Optional[str] = None, on_step: Optional[Callable[[Step], None]] = None) -> List[Step]:
    """Run every step in order; `on_step` sees each one as soon as it is done."""
    steps: List[Step] = []

    def record(name: str, work: Optional[Callable[[], Tuple[str, Any]]], skip_reason: str = "") -> Any:
        result = None
        if work is None:
            step = Step(name, "skip", skip_reason)
        else:
            try:
                detail, result = work()
                step = Step(name, "ok", detail)
            except Failed as exc:
                step = Step(name, "fail", str(exc))
                result = exc.result
        steps.append(step)
        if on_step is not None:
            on_step(step)
        return result

    config: Optional[Config] = record("config", lambda: check_config(config_path, keys_dir, data_dir))
    context: Optional[ssl.SSLContext] = None
    if config is None:
        record("keys", None, "needs the config step to pass")
    else:
        context = record("keys", lambda: check_keys(config.thing))

    reachable = connected = None
    if config is None or context is None:
        record("broker", None, "needs the config step to pass" if config is None
               else "needs a certificate and private key that load")
    else:
        reachable = record("broker", lambda: check_broker(config.thing, context, timeout))  # type: ignore[arg-type]
    session: Optional[ProbeSession] = None

    def connect() -> Tuple[str, bool]:
        nonlocal session
        session = ProbeSession(config.thing, timeout, context)  # type: ignore[union-attr,arg-type]
        return session.connect()

    try:
        if reachable:
            connected = record("mqtt", connect)
        else:
            record("mqtt", None, "needs the broker step to pass")
        if connected:
            record("probe", session.probe)  # type: ignore[union-attr]
        else:
            record("probe", None, "needs the mqtt step to pass")
    finally:
        if session is not None:
            session.close()

    if config is None:
        record("store", None, "needs the config step to pass")
    else:
        record("store", lambda: check_store(config))
    return steps


def check_config(path: str, keys_dir: Optional[str], data_dir: Optional[str]) -> Tuple[str, Config]:
    try:
        config = config_module.load(path, data_dir=data_dir, keys_dir=keys_dir)
    except ConfigError as exc:
        raise Failed(str(exc)) from None
    thing = config.thing
    mqtt = thing.mqtt
    detail = (f"{path}: thing {thing.name!r}, broker {thing.endpoint}:{thing.mqtt.port}; egress rate"
              f" {describe_rate(mqtt.publish_rate, mqtt.publish_bytes_rate, mqtt.backlog_rate, mqtt.max_inflight)}")
    # as `run` warns of them, the daemon's user being the data dir's owner (the service user's,
    # under systemd), else the private key's (with mode 0600, the one user who can read it):
    # root checking a service's install before its first start is not its daemon
    directory = config.store.data_dir
    owner = (directory if directory.is_dir() else thing.keys.private_key).stat().st_uid
    warnings = [*config.warnings, *paths.control_warnings(config_module.trusted_files(config), owner)]
    if warnings:
        detail += "; warning: " + "; warning: ".join(warnings)
    return detail, config


def check_store(config: Config) -> Tuple[str, bool]:

    directory = config.store.data_dir
    if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        raise Failed(f"data dir {directory} is not writable by uid {os.geteuid()}"
                     f" (use --data-dir or flashlex.app.db.dataPath)")
    judged = ""
    if directory.is_dir():  # what `run` refuses, `check` fails on, as the daemon's user: the
        owner = directory.stat().st_uid  # data dir's owner (`sudo flashlexd check` failed a service user's)
        try:
            paths.check_dir(directory, "data dir", owner)
        except paths.UnsafePath as exc:
            raise Failed(str(exc)) from None
        if owner not in (0, os.geteuid()):  # said: run as this user, it would be refused (re-read 31)
            judged = f"; judged for uid {owner}, its owner: the service must run as that user"
    detail, ok = _store_figures(config)
    note = old_store_note(directory)
    return f"{detail}{judged}" + ("" if note is None else f"; {note}"), ok


def _store_figures(config: Config) -> Tuple[str, bool]:
    from flashlexd.store import Store, StoreError
    from flashlexd.storebase import OlderSchema

    directory = config.store.data_dir
    if not (directory / "data.mdb").exists():
        return _store_to_come(directory), True
    # under a running daemon the pages are not walked: the walk reads the file without a reader
    # slot, and LMDB frees and reuses pages as the daemon writes, so a live tree can read as
    # damaged (LMDB's own reads, a reader slot each, are safe beside it)
    running = paths.holder(directory)
    try:
        store = Store.from_config(config.store, check_pages=running is None, migrate=False)
    except OlderSchema as exc:  # left as it is: the running (or previous) version reads it
        return f"{exc}; not opened here", True
    except StoreError as exc:
        raise Failed(str(exc)) from None
    try:
        stats = store.stats()
    except StoreError as exc:
        raise Failed(str(exc)) from None
    finally:
        store.close()
    unwalked = "" if running is None else (f"; flashlexd (pid {running}) is running it: pages not"
                                           " walked (`flashlexd store verify` with it stopped does)")
    disk, room = _filesystem(directory, stats["cap_bytes"])
    line = (f"store in {directory} opens: {stats['inbox_count']} messages in the inbox,"
            f" {stats['outbox_count']} queued for the cloud, {_megabytes(stats['used_bytes'])}"
            f" of {_megabytes(stats['cap_bytes'])} used{disk}{unwalked}")
    if not room:
        raise Failed(line)
    return line, True


def _filesystem(directory: Path, cap: int) -> Tuple[str, bool]:
    """The store's filesystem: its free space, and whether there is room (a full disk passed
    as READY, the store's figures far from its cap; review "diskfull")."""
    from flashlexd.storebase import NEARLY_FULL_BYTES
    try:
        found = os.statvfs(directory)
    except OSError as exc:
        return f"; its filesystem not read ({exc.strerror or exc})", True
    free, size = found.f_bavail * found.f_frsize, found.f_blocks * found.f_frsize
    if found.f_files and not found.f_favail:
        return "; its filesystem has no free inodes (df -i): the store cannot grow", False
    if free < NEARLY_FULL_BYTES:
        return (f"; its filesystem is full ({_megabytes(free)} free of {_megabytes(size)}): the store"
                f" cannot grow, only room inside it (acks, expiry) takes new messages"), False
    over = " (the cap is over the filesystem's size: the disk fills first)" if cap > size else ""
    return f"; its filesystem has {_megabytes(free)} free of {_megabytes(size)}{over}", True

def _store_to_come(directory: Path) -> str:
    """A store that does not exist yet is not made here: `check` runs as root (sudo) before the
    service exists, and a data dir it made outside /var/lib stayed root's (0700), so the
    service's user could not open its store (systemd chowns only its StateDirectory)."""
    existing = next(p for p in (directory, *directory.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise Failed(f"cannot open store in {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise Failed(f"cannot create store in {directory}: {existing} is not writable by uid"
                     f" {os.geteuid()} (use --data-dir or flashlex.app.db.dataPath)")
    return f"store in {directory} does not exist yet: flashlexd run creates it ({existing} is writable)"


def _megabytes(count: Any) -> str:
    return f"{int(count) / (1024 * 1024):.1f} MB"
