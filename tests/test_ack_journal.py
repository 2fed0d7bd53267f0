"""The ack journal (flashlexd/ackjournal.py, storeacks.py): an ack is one small synced record,
applied to the inbox in batches; a crash between the two loses no ack, a torn last record is
ignored, reads never show an acked message, and a damaged journal does not stop the store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import pytest

from flashlexd import ackjournal
from flashlexd.client import connect
from flashlexd.consumers import ConsumerSpec
from flashlexd.store import Incoming, Store
from flashlexd.storeacks import APPLY_IDS, NEAR_CAP, NEAR_CAP_LOOK
from tests.broker import INGRESS_TOPIC, publish, wait_for
from tests.daemon import Daemon, NotifyListener

CAP = 64 * 1024 * 1024


def inbox_ids(path: Path) -> List[int]:
    """The inbox as LMDB has it (not as the store's reads show it), read by another process
    (one process must not open the same environment twice)."""
    code = textwrap.dedent("""
        import lmdb, sys
        env = lmdb.open(sys.argv[1], max_dbs=16, readonly=True, lock=False)
        with env.begin() as txn:
            db = env.open_db(b"inbox", txn=txn, create=False)
            print(*[int.from_bytes(bytes(k), "big") for k in txn.cursor(db=db).iternext(values=False)])
    """)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return [int(word) for word in done.stdout.split()]


def journaled(path: Path, cap: int = CAP) -> Store:
    store = Store(path, cap)
    store.open_ack_journal()
    return store


def store_then_crash(path: Path, count: int, acks: List[int]) -> None:
    """In a child process: store `count` messages, ack `acks` one call each, then die without
    closing (no apply at close), as a SIGKILL would leave it."""
    code = textwrap.dedent(f"""
        import os, sys
        from flashlexd.store import Incoming, Store
        store = Store(sys.argv[1], {CAP})
        store.open_ack_journal()
        store.append([Incoming("t/a", b"m%d" % n, mid=n + 1) for n in range({count})])
        for pk in {acks!r}:
            assert store.ack([pk]) == 1
        os.kill(os.getpid(), 9)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_acks_killed_before_their_apply_are_applied_at_the_next_open(tmp_path: Path):
    store_then_crash(tmp_path, 6, [2, 4, 5])
    assert inbox_ids(tmp_path) == [1, 2, 3, 4, 5, 6]  # journaled, not applied
    assert os.stat(tmp_path / ackjournal.FILE_NAME).st_mode & 0o777 == 0o600
    store = journaled(tmp_path)
    try:
        assert inbox_ids(tmp_path) == [1, 3, 6]  # applied before anything is served
        assert [m.id for m in store.messages()] == [1, 3, 6]
        assert store.stats()["acked"] == 3 and store.stats()["inbox_count"] == 3
        assert store.ack([3]) == 1 and store.ack([2]) == 0  # the old records are not replayed again
    finally:
        store.close()
    store = journaled(tmp_path)
    try:
        assert [m.id for m in store.messages()] == [1, 6] and store.stats()["acked"] == 4
    finally:
        store.close()


def test_a_torn_last_record_is_ignored_and_earlier_ones_are_kept(tmp_path: Path):
    store_then_crash(tmp_path, 4, [1, 2])
    journal = tmp_path / ackjournal.FILE_NAME
    data = bytearray(journal.read_bytes())
    records = ackjournal.scan(bytes(data))
    assert [r.ids for r in records] == [[1], [2]]
    torn = ackjournal.encode(records[-1].seq + 1, [3])
    at = -(-records[-1].end // ackjournal.SECTOR) * ackjournal.SECTOR
    data[at:at + len(torn) - 3] = torn[:-3]  # the CRC's last bytes never reached the disk
    journal.write_bytes(bytes(data))
    store = journaled(tmp_path)
    try:
        assert [m.id for m in store.messages()] == [3, 4]
        assert store.ack([4]) == 1  # written after the torn one: a new seq, applied at close
    finally:
        store.close()
    assert inbox_ids(tmp_path) == [3]


def test_reads_hide_acks_not_applied_yet(tmp_path: Path):
    store = journaled(tmp_path)
    try:
        store.consumer_declare([ConsumerSpec("audit", "#")], now=1.0)
        store.append([Incoming("t/a", b"m%d" % n, mid=n + 1) for n in range(5)])
        assert store.ack([1]) == 1 and store.ack([3, 1]) == 1
        assert inbox_ids(tmp_path) == [1, 2, 3, 4, 5]
        assert [m.id for m in store.messages()] == [2, 4, 5]
        assert [m.id for m in store.messages_page(limit=10, topic="t/#", budget=2).found] == [2]
        assert [m.id for m in store.consumer_messages("audit")] == [2, 4, 5]
        # 1 is gone for every consumer; 2 is done for all (removed)
        assert store.consumer_ack("audit", [1, 2], now=2.0) == 1
        stats = store.stats()
        assert (stats["inbox_count"], stats["acked"], store.inbox_count()) == (2, 3, 2)
        assert [c["backlog"] for c in store.consumers_report()] == [2]
        assert store.purge() == 2  # the waiting acks count as acked, not purged
        assert store.stats()["acked"] == 3 and store.stats()["purged"] == 2
    finally:
        store.close()


def test_reads_step_over_runs_of_waiting_acks_and_miss_nothing(tmp_path: Path):
    store = journaled(tmp_path)
    try:
        store.append([Incoming("t/a", b"m%d" % n, mid=n + 1) for n in range(60)])
        assert store.ack(range(5, 11)) == 6 and store.apply_acks()  # a gap: ids 5-10 are gone
        assert store.ack(list(range(1, 21)) + [25, 26, 27] + list(range(40, 61))) == 38
        assert inbox_ids(tmp_path)[:3] == [1, 2, 3]  # waiting: still in the inbox
        expected = [21, 22, 23, 24] + list(range(28, 40))
        assert [m.id for m in store.messages()] == expected
        assert [m.id for m in store.messages(limit=3)] == expected[:3]
        assert [m.id for m in store.messages(after=2)] == expected
        assert [m.id for m in store.messages(after=39)] == []  # the run reaches the end
        found, after = [], None
        for _ in range(60):  # pages of a 4-record budget, each going on from the last one's cursor
            page = store.messages_page(limit=100, topic="t/#", after=after, budget=4)
            found += [m.id for m in page.found]
            if page.cursor is None:
                break
            after = page.cursor
        assert found == expected
    finally:
        store.close()


def test_acks_are_applied_in_one_commit_per_batch(tmp_path: Path):
    store = journaled(tmp_path)
    try:
        ids = store.append([Incoming("t/a", b"m%d" % n, mid=n % 60000 + 1) for n in range(APPLY_IDS + 2)])
        txn_before = store._env.info()["last_txnid"]
        for pk in ids[:APPLY_IDS - 1]:
            assert store.ack([pk]) == 1
        assert store._env.info()["last_txnid"] == txn_before  # not one LMDB commit so far
        assert len(inbox_ids(tmp_path)) == APPLY_IDS + 2
        assert store.ack([ids[APPLY_IDS - 1]]) == 1
        assert store._env.info()["last_txnid"] == txn_before + 1
        assert inbox_ids(tmp_path) == ids[APPLY_IDS:]
    finally:
        store.close()


def test_acks_made_below_the_cap_are_applied_once_ingest_fills_the_store(tmp_path: Path):
    """Acks made below NEAR_CAP waited up to APPLY_SECONDS, their records holding the room:
    ingest filling the store meanwhile was refused for a minute under `reject`, and under
    `dropOldest` unacked messages were dropped while acked ones stayed (found by review).
    The supervisor's loop applies them once the store is near its cap."""
    store = journaled(tmp_path, cap=1024 * 1024)
    try:
        ids = store.append([Incoming("t/a", b"x" * 2000, mid=n + 1) for n in range(100)])
        assert store.ack(ids) == 100
        waiting = inbox_ids(tmp_path)
        store.apply_acks_if_due(time.monotonic())
        assert inbox_ids(tmp_path) == waiting == ids  # below the cap: they wait, as before
        more = []
        while store.stats()["used_bytes"] < NEAR_CAP * store.cap_bytes:  # as the ingress fills it
            more += store.append([Incoming("t/b", b"y" * 2000, mid=n + 1) for n in range(20)])
        wait_for(lambda: store.apply_acks_if_due(time.monotonic()) or inbox_ids(tmp_path) == more,
                 2 * NEAR_CAP_LOOK + 1, "the waiting acks applied")
    finally:
        store.close()


def test_an_unreadable_journal_is_set_aside_and_the_store_opens(tmp_path: Path, caplog):
    Store(tmp_path, CAP).close()
    journal = tmp_path / ackjournal.FILE_NAME
    journal.mkdir()  # reading it fails (EISDIR): as an unreadable file would
    store = journaled(tmp_path)
    try:
        assert "unreadable" in caplog.text and "may be delivered again" in caplog.text
        assert list(tmp_path.glob(ackjournal.FILE_NAME + ".damaged-*"))
        store.append([Incoming("t/a", b"m", mid=1)])
        assert store.ack([1]) == 1 and store.messages() == []
    finally:
        store.close()


def started(daemon_config: Path, tmp_path: Path, run: int) -> Daemon:
    notify = NotifyListener(tmp_path / f"notify{run}.sock")
    try:
        daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)}).start()
        notify.wait_for("READY=1", timeout=15)
    finally:
        notify.close()
    return daemon


def test_an_ack_that_returned_survives_a_sigkill_of_the_supervisor(daemon_config, broker, tmp_path):
    daemon = started(daemon_config, tmp_path, 1)
    try:
        with connect(str(daemon.socket_path)) as fx:
            wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 15, "ingress connected")
            for n in range(4):
                publish(broker, INGRESS_TOPIC, b'{"n": %d}' % n)
            found = wait_for(lambda: (lambda m: m if len(m) == 4 else None)(fx.messages()), 15, "4 messages")
            for message in found[:3]:
                assert fx.ack([message.pk]) == 1
            assert [m.pk for m in fx.messages()] == [found[3].pk]
            status = fx.status()
            assert status["inbox"]["count"] == 1 and status["counters"]["acked"] == 3
            assert status["store"]["acks_waiting"] == 3
        data_dir = next(tmp_path.rglob(ackjournal.FILE_NAME)).parent
        assert len(inbox_ids(data_dir)) == 4  # the acks are in the journal only
        flags = journal_flags(daemon.pid)  # synced writes, not left in the page cache
        assert flags & os.O_DSYNC or flags is None
        workers = daemon.children(fork_server=True)
        os.kill(daemon.pid, signal.SIGKILL)  # the supervisor alone: its workers see the link close
        daemon.proc.wait(timeout=10)
        wait_for(lambda: not any(_alive(pid) for pid in workers.values()), 15, "workers gone")
    finally:
        daemon.stop()
    daemon = started(daemon_config, tmp_path, 2)
    try:
        with connect(str(daemon.socket_path)) as fx:
            assert [m.pk for m in wait_for(lambda: fx.messages() or None, 15, "the store")] == [found[3].pk]
            assert fx.status()["counters"]["acked"] == 3
    finally:
        daemon.stop()


def journal_flags(pid: int):
    """The open flags of `pid`'s journal descriptor (None: buffered, fdatasync'ed per ack)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(ackjournal.FILE_NAME):
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            return flags if flags & os.O_DIRECT else None
    pytest.fail("the supervisor has no ack journal open")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_ack_into_a_data_dir_removed_meanwhile_is_not_confirmed(tmp_path: Path):
    """The journal goes with the data dir: an ack written to the unlinked file is lost at the
    next start, so it must fail (the supervisor then stops: see test_supervisor.py)."""
    import shutil
    from flashlexd.store import Incoming, StoreError
    store = journaled(tmp_path / "data")
    try:
        store.append([Incoming("t/a", b"m%d" % n, mid=n + 1) for n in range(3)])
        assert store.ack([1]) == 1
        shutil.rmtree(tmp_path / "data")
        with pytest.raises(StoreError) as info:
            store.ack([2])
        assert "was removed while in use" in str(info.value) and "ack not confirmed" in str(info.value)
        with pytest.raises(StoreError):
            store.append([Incoming("t/a", b"late", mid=9)])
    finally:
        store.close()
