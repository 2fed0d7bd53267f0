"""Damaged LMDB stores for tests, and a runner that tries each damage in a forked child.

Run as `python -m tests.damage OUT_DIR [SEEDS [PATTERNS [MESSAGES]]]` (the tests do, in a subprocess, so that a SIGBUS or
SIGSEGV kills a child of this runner, is recorded as `crash:SIGBUS`, and fails the test instead
of killing pytest). It builds one real store with inbox, expiry, outbox, recent and meta
records, then for each case makes a damaged copy and, in a forked child, uses it the way the
daemon does (open with the pre-open check, stats, read every message and outbox entry, append,
ack, expire) and then runs `store verify` and `store recover` on it. One JSON line per case:
{"case", "start", "daemon", "verify", "recover"} (or "error" / "start_error" / "tools_error"),
where start is `refused: <line>` or `ok` (`run`'s first open, every page read) and daemon, the
damage met in use as if it appeared after the start, is `refused: <line>`, `damaged: <line>`
(the store went read-only), `ok` (the damage was in a page nothing read) or `crash:<signal>` /
`traceback: <error>` (failures).
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

from flashlexd import storecheck, storetools
from flashlexd.store import Incoming, Store, StoreDamaged, StoreError

CAP = 64 * 1024 * 1024
PAGE = 4096


def build_store(directory: Path, messages: int = 600, outbox: int = 60) -> Path:
    """A real store: `messages` inbox messages (some acked, so there are free pages), expiry
    ranges, DUP marks and outbox entries."""
    rng = random.Random(0)  # the same pages every run
    store = Store(directory, CAP, expire_seconds=3600)
    try:
        for batch in range(0, messages, 50):
            store.append([Incoming(f"ingress/thing/{i % 7}", rng.randbytes(64 + i % 300), 1, False,
                                   i % 65535 + 1) for i in range(batch, batch + 50)], now=1.7e9)
        store.ack(range(1, messages, 9))
        store.outbox_append([("egress/thing", rng.randbytes(200), 1, False) for _ in range(outbox)],
                            now=1.7e9)
        store.outbox_remove(range(1, 6))
    finally:
        store.close()
    data = directory / "data.mdb"
    os.truncate(data, storecheck.check_data_file(data).bytes_in_use)  # without the sparse tail
    return directory


def truncate(data: Path, size: int) -> None:
    os.truncate(data, size)


def garble_page(data: Path, page: int, seed: int) -> None:
    """Overwrite one page with random bytes."""
    _garble(data, page * PAGE, PAGE, seed)


def garble_body(data: Path, page: int, seed: int) -> None:
    """Random bytes over one page but its 16-byte header: LMDB's page checks pass and it
    reads the garbage as the page's nodes."""
    _garble(data, page * PAGE + 16, PAGE - 16, seed)


def rot_bytes(data: Path, page: int, seed: int) -> None:
    """Eight random bytes at random places of one page (bit rot)."""
    rng = random.Random(seed)
    with open(data, "r+b") as out:
        for _ in range(8):
            out.seek(page * PAGE + rng.randrange(PAGE))
            out.write(bytes([rng.getrandbits(8)]))


def _garble(data: Path, offset: int, length: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(data, "r+b") as out:
        out.seek(offset)
        out.write(bytes(rng.getrandbits(8) for _ in range(length)))


PATTERNS = {"garbled": garble_page, "body-garbled": garble_body, "rotted": rot_bytes}


def start_like_run(directory: Path) -> str:
    """What `flashlexd run` does first: open the store after reading every page."""
    try:
        Store(directory, CAP, check_pages=True).close()
    except StoreDamaged as exc:
        return f"refused: {exc}"
    return "ok"


def use_like_the_daemon(directory: Path) -> str:
    """Damage met in use (as if it appeared after the start): what the daemon's processes do
    with a store, opened as the workers open it, with the outcome in one line."""
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

    def start() -> Dict[str, object]:
        return {"start": start_like_run(case)}

    def daemon() -> Dict[str, object]:
        return {"daemon": use_like_the_daemon(work / f"{name}.used")}

    def tools() -> Dict[str, object]:
        ok, lines = storetools.verify(case)
        recovered, report = storetools.recover(case, work / f"{name}.recovered", CAP)
        if recovered:
            again, _ = storetools.verify(work / f"{name}.recovered")
            report.append("recovered store verifies" if again else "RECOVERED STORE DOES NOT VERIFY")
        return {"verify": "ok" if ok else lines[-1], "recover": report}

    tools_outcome = in_child(tools)
    if "error" in tools_outcome:  # verify or recover crashed: always a failure of the case
        tools_outcome = {"tools_error": tools_outcome["error"]}
    started = in_child(start)
    if "error" in started:  # opening like `run` crashed: always a failure of the case
        started = {"start_error": started["error"]}
    outcome = {**started, **in_child(daemon), **tools_outcome}
    shutil.rmtree(case, ignore_errors=True)
    shutil.rmtree(work / f"{name}.used", ignore_errors=True)
    shutil.rmtree(work / f"{name}.recovered", ignore_errors=True)
    return {"case": name, **outcome}


def cases(data_size: int, pages: List[int], seeds: int, patterns: List[str]
          ) -> List[Tuple[str, Callable[[Path], None]]]:
    found: List[Tuple[str, Callable[[Path], None]]] = [
        ("truncated to 8 KiB", lambda d: truncate(d, 8192)),
        ("truncated to half", lambda d: truncate(d, data_size // 2)),
        ("truncated by one page", lambda d: truncate(d, data_size - PAGE)),
    ] if "garbled" in patterns else []
    for pattern in patterns:
        for page in pages:
            for seed in range(seeds):
                found.append((f"page {page} {pattern} (seed {seed})",
                              lambda d, f=PATTERNS[pattern], p=page, s=seed: f(d, p, s)))
    return found


def main(argv: List[str]) -> int:
    """OUT_DIR [SEEDS [PATTERN,... [MESSAGES]]]"""
    work = Path(argv[0])
    seeds = int(argv[1]) if len(argv) > 1 else 1
    patterns = argv[2].split(",") if len(argv) > 2 else ["garbled"]
    messages = int(argv[3]) if len(argv) > 3 else 600
    original = build_store(work / "original", messages=messages, outbox=messages // 10)
    size = (original / "data.mdb").stat().st_size
    for name, damage in cases(size, list(range(size // PAGE)), seeds, patterns):
        print(json.dumps(try_case(name.replace(" ", "-"), original, work, damage)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
