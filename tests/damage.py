"""Damaged LMDB stores for tests, and a runner that tries each damage in a forked child.

Run as `python -m tests.damage OUT_DIR` (the tests do, in a subprocess, so that a SIGBUS or
SIGSEGV kills a child of this runner, is recorded as `crash:SIGBUS`, and fails the test instead
of killing pytest). It builds one real store with inbox, expiry, outbox, recent and meta
records, then for each case makes a damaged copy and, in a forked child, uses it the way the
daemon does (open with the pre-open check, stats, read every message and outbox entry, append,
ack, expire) and then runs `store verify` and `store recover` on it. One JSON line per case:
{"case", "daemon", "verify", "recover"} where daemon is `refused: <line>`, `damaged: <line>`
(met at run time: the store went read-only), `ok` (the damage was in a page nothing read) or
`crash:<signal>` / `traceback: <error>` (failures).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from flashlexd import storetools
from flashlexd.store import Incoming, Store, StoreDamaged, StoreError

CAP = 64 * 1024 * 1024
PAGE = 4096


def build_store(directory: Path, messages: int = 600, outbox: int = 60) -> Path:
    """A real store: `messages` inbox messages (some acked, so there are free pages), expiry
    ranges, DUP marks and outbox entries."""
    store = Store(directory, CAP, expire_seconds=3600)
    try:
        for batch in range(0, messages, 50):
            store.append([Incoming(f"ingress/thing/{i % 7}", os.urandom(64 + i % 300), 1, False,
                                   i % 65535 + 1) for i in range(batch, batch + 50)])
        store.ack(range(1, messages, 9))
        store.outbox_append([("egress/thing", os.urandom(200), 1, False) for _ in range(outbox)])
        store.outbox_remove(range(1, 6))
    finally:
        store.close()
    return directory


def truncate(data: Path, size: int) -> None:
    os.truncate(data, size)


def garble_page(data: Path, page: int, seed: int) -> None:
    """Overwrite one page with random bytes."""
    rng = random.Random(seed)
    with open(data, "r+b") as out:
        out.seek(page * PAGE)
        out.write(bytes(rng.getrandbits(8) for _ in range(PAGE)))


def use_like_the_daemon(directory: Path) -> str:
    """What the daemon's processes do with a store, with the outcome in one line."""
    try:
        store = Store(directory, CAP, expire_seconds=3600, write_wait=1.0)
    except StoreDamaged as exc:
        return f"refused: {exc}"
    except StoreError as exc:
        return f"refused (not as damaged): {exc}"
    try:
        for step in (store.stats, lambda: store.messages(limit=10 ** 6), store.outbox_peek,
                     lambda: store.append([Incoming("ingress/thing/x", b"after", 1, False, 7)]),
                     lambda: store.ack([2, 3, 4]), lambda: store.expire(now=10 ** 10),
                     lambda: store.outbox_append([("t", b"p", 1, False)]), store.stats):
            try:
                step()
            except StoreError:
                pass  # reported below through store.damage; other store errors are survived
        return f"damaged: {store.damage}" if store.damage else "ok"
    finally:
        store.close()


def in_child(work: Callable[[], Dict[str, object]]) -> Dict[str, object]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            result = work()
        except BaseException as exc:  # recorded as a failure of the case
            result = {"error": f"traceback: {type(exc).__name__}: {exc}"}
        with os.fdopen(write_end, "w") as out:
            json.dump(result, out)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as result:
        text = result.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"error": f"crash:{signal.Signals(os.WTERMSIG(status)).name}"}
    return json.loads(text)


def try_case(name: str, original: Path, work: Path, damage: Callable[[Path], None]) -> Dict[str, object]:
    case = work / name
    shutil.copytree(original, case)
    damage(case / "data.mdb")

    shutil.copytree(case, work / f"{name}.used")

    def run() -> Dict[str, object]:
        daemon = use_like_the_daemon(work / f"{name}.used")
        ok, lines = storetools.verify(case)
        recovered, report = storetools.recover(case, work / f"{name}.recovered", CAP)
        if recovered:
            again, _ = storetools.verify(work / f"{name}.recovered")
            report.append("recovered store verifies" if again else "RECOVERED STORE DOES NOT VERIFY")
        return {"daemon": daemon, "verify": "ok" if ok else lines[-1], "recover": report}

    outcome = in_child(run)
    shutil.rmtree(case, ignore_errors=True)
    shutil.rmtree(work / f"{name}.used", ignore_errors=True)
    shutil.rmtree(work / f"{name}.recovered", ignore_errors=True)
    return {"case": name, **outcome}


def cases(data_size: int, pages: List[int], seeds: int) -> List[Tuple[str, Callable[[Path], None]]]:
    found: List[Tuple[str, Callable[[Path], None]]] = [
        ("truncated to 8 KiB", lambda d: truncate(d, 8192)),
        ("truncated to half", lambda d: truncate(d, data_size // 2)),
        ("truncated by one page", lambda d: truncate(d, data_size - PAGE)),
    ]
    for page in pages:
        for seed in range(seeds):
            found.append((f"page {page} garbled (seed {seed})",
                          lambda d, page=page, seed=seed: garble_page(d, page, seed)))
    return found


def main(argv: List[str]) -> int:
    work = Path(argv[0])
    seeds = int(argv[1]) if len(argv) > 1 else 1
    original = build_store(work / "original")
    size = (original / "data.mdb").stat().st_size
    for name, damage in cases(size, list(range(size // PAGE)), seeds):
        print(json.dumps(try_case(name.replace(" ", "-"), original, work, damage)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
