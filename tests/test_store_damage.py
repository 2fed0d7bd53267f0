"""A damaged store is named, never crashed on: real LMDB files truncated or with a garbled
page refused by `run` and `check`, verified and recovered, and damaged under the running
daemon. The sweep over every page of a store is tests/chaos/test_store_damage_sweep.py."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import lmdb
import msgpack
import pytest
import yaml

from flashlexd import storecheck, storetools
from flashlexd.store import Incoming, Store, StoreDamaged, StoreError
from tests.broker import wait_for
from tests.damage import CAP, build_store, garble_page, truncate, use_like_the_daemon
from tests.test_config import make_keys, seed_bytes
from tests.tmpfs import mounted_tmpfs

REPO = Path(__file__).resolve().parent.parent


def flashlexd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlexd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_truncated_store_is_refused_by_run_and_check_with_one_line(daemon_config, tmp_path):
    data_dir = build_store(tmp_path / "store", messages=200)
    size = (data_dir / "data.mdb").stat().st_size
    for cut in (8192, size // 2):
        truncate(data_dir / "data.mdb", cut)
        run = flashlexd("run", "--config", str(daemon_config), "--data-dir", str(data_dir),
                        "--socket", str(tmp_path / "api.sock"))
        assert run.returncode == 1, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "is damaged:" in lines[0] and "truncated" in lines[0], lines
        assert lines[0].endswith("see flashlexd store recover")
        check = flashlexd("check", "--config", str(daemon_config), "--data-dir", str(data_dir),
                          "--json", "--timeout", "5")
        assert check.returncode == 1
        store_step = [s for s in json.loads(check.stdout)["steps"] if s["name"] == "store"][0]
        assert store_step["status"] == "fail" and "is damaged:" in store_step["detail"], store_step


def test_store_verify_exit_codes_and_recover_reports_losses(tmp_path):
    data_dir = build_store(tmp_path / "store", messages=600)
    ok = flashlexd("store", "verify", "--data-dir", str(data_dir))
    assert ok.returncode == 0, ok.stderr
    assert "inbox: 533 records" in ok.stdout and "every page and record reads back" in ok.stdout
    inbox_leaf = _a_page_of(data_dir, "inbox")
    garble_page(data_dir / "data.mdb", inbox_leaf, seed=1)
    bad = flashlexd("store", "verify", "--data-dir", str(data_dir))
    assert bad.returncode == 1
    assert f"database inbox, page {inbox_leaf}" in bad.stderr, bad.stderr
    recovered = flashlexd("store", "recover", "--data-dir", str(data_dir), "--to",
                          str(tmp_path / "new"))
    assert recovered.returncode == 0, recovered.stderr
    inbox_line = next(line for line in recovered.stdout.splitlines() if line.startswith("inbox:"))
    copied, lost = [int(word.strip(",")) for word in inbox_line.split()[2::2]][:2]
    assert copied + lost == 533 and 0 < lost < 100, inbox_line
    assert "outbox: copied 55, lost 0" in recovered.stdout
    assert flashlexd("store", "verify", "--data-dir", str(tmp_path / "new")).returncode == 0
    store = Store(tmp_path / "new", CAP, expire_seconds=3600)  # the daemon can use it
    try:
        assert len(store.messages(limit=1000)) == copied
        before = store.stats()["inbox_last_id"]
        (new_id,) = store.append([Incoming("t", b"after recovery", 1, False, 1)])
        assert new_id > before >= 600  # ids keep growing past every id ever given out
        assert store.expire(now=10 ** 10) == copied + 1  # the rebuilt expiry index is exact
    finally:
        store.close()
    again = flashlexd("store", "recover", "--data-dir", str(data_dir), "--to", str(tmp_path / "new"))
    assert again.returncode == 1 and "is not empty" in again.stderr


def _a_page_of(data_dir: Path, name: str, last: bool = False) -> int:
    """A leaf page of database `name`, its first (or `last`) one under a branch root (read with
    the same page reader the tools use)."""
    from flashlexd import storecheck

    meta = storecheck.check_data_file(data_dir / "data.mdb")
    with open(data_dir / "data.mdb", "rb") as data:
        reader = storecheck.TreeReader(data.fileno(), meta, strict=True)
        root = dict(reader.databases())[name][-1]
        page = os.pread(data.fileno(), meta.page_size, root * meta.page_size)
        flags = storecheck.PAGE_HEADER.unpack_from(page, 0)[2]
        if flags & storecheck.P_LEAF:
            return root
        count = (storecheck.PAGE_HEADER.unpack_from(page, 0)[3] - storecheck.PAGE_HEADER.size) // storecheck.INDEX.size
        at = storecheck.PAGE_HEADER.size + (count - 1 if last else 0) * storecheck.INDEX.size
        child = storecheck.NODE.unpack_from(page, storecheck.INDEX.unpack_from(page, at)[0])
        return child[0] | child[1] << 16


def _node_flags_at(data_dir: Path, page: Optional[int] = None, key: Optional[bytes] = None) -> int:
    """Where, in data.mdb, the flags of leaf `page`'s (default: the main tree's root) node
    `key` (default: its first) are."""
    meta = storecheck.check_data_file(data_dir / "data.mdb")
    page = meta.main_root if page is None else page
    data = (data_dir / "data.mdb").read_bytes()[page * meta.page_size:(page + 1) * meta.page_size]
    lower = storecheck.PAGE_HEADER.unpack_from(data, 0)[3]
    for index in range((lower - storecheck.PAGE_HEADER.size) // 2):
        offset = storecheck.INDEX.unpack_from(data, storecheck.PAGE_HEADER.size + 2 * index)[0]
        key_size = storecheck.NODE.unpack_from(data, offset)[3]
        start = offset + storecheck.NODE.size
        if key is None or data[start:start + key_size] == key:
            return page * meta.page_size + offset + 4  # after mn_lo, mn_hi
    raise AssertionError(f"no node {key!r} on page {page}")


FLAG_DAMAGE = {  # a flags field rotted: where it is, what it becomes, what verify says
    "an inbox record flagged as a database (the sweep's page-96-rotted-(seed-4))":
        (lambda d: _node_flags_at(d, _a_page_of(d, "inbox")), 0x7a, "not a plain record"),
    "an inbox record flagged as duplicates":
        (lambda d: _node_flags_at(d, _a_page_of(d, "inbox")), 0x04, "not a plain record"),
    "a database record flagged as duplicates":
        (lambda d: _node_flags_at(d, key=b"unconfirmed"), 0x06, "not a named database"),
    "a database record without its database flag":
        (lambda d: _node_flags_at(d, key=b"unconfirmed"), 0x00, "not a named database"),
    "a database with LMDB flags it was not made with":  # its MDB_db's md_flags, after md_pad
        (lambda d: _node_flags_at(d, key=b"inbox") + 4 + len(b"inbox") + 4, 0x8000,
         "not a plain database"),
}


def test_recover_of_a_store_whose_main_tree_is_gone_names_every_database(tmp_path):
    """"Reports per database what was copied and lost": truncated behind its main tree, the
    report named the five databases it checks record by record, not the dead letters or the
    named consumers' state (found by review)."""
    from tests.damage import truncate
    data_dir = build_store(tmp_path / "store", messages=100)
    truncate(data_dir / "data.mdb", 8192)
    recovered = flashlexd("store", "recover", "--data-dir", str(data_dir), "--to", str(tmp_path / "new"))
    assert recovered.returncode == 0, recovered.stderr
    named = {line.split(":")[0] for line in recovered.stdout.splitlines()}
    assert {"inbox", "outbox", "dead", "consumers", "cacks", "unconfirmed", "dedupe", "msgexpiry",
            "meta"} <= named, recovered.stdout


@pytest.mark.parametrize("damage", sorted(FLAG_DAMAGE))
def test_verify_names_flags_lmdb_trips_on_and_recover_loses_nothing(tmp_path, damage):
    """A rotted flags field leaves every page well formed and every record readable, but LMDB
    acts on the flags (a full-size chaos sweep: MDB_INCOMPATIBLE deleting such an inbox
    record, while verify said ok). What the daemon meets, verify and `run` name; recover
    copies every record (its copy gets fresh flags)."""
    data_dir = build_store(tmp_path / "store", messages=200)
    where, flags, named = FLAG_DAMAGE[damage]
    with open(data_dir / "data.mdb", "r+b") as data:
        data.seek(where(data_dir))
        data.write(flags.to_bytes(2, sys.byteorder))
    used = tmp_path / "used"
    shutil.copytree(data_dir, used)
    met = use_like_the_daemon(used)
    assert met.startswith(("damaged:", "refused:")), met
    ok, lines = storetools.verify(data_dir)
    assert not ok and named in lines[-1], lines
    with pytest.raises(storecheck.DataFileDamaged, match=named):
        storecheck.walk_pages(data_dir / "data.mdb")
    recovered, report = storetools.recover(data_dir, tmp_path / "new", CAP)
    assert recovered and report[-1].endswith("nothing was lost"), report
    assert storetools.verify(tmp_path / "new")[0]


@pytest.mark.parametrize("garbage_seed", [3])
def test_store_damaged_at_run_time_goes_read_only(tmp_path, garbage_seed):
    """A store damaged under an open Store: one log line, writes refused from then on."""
    data_dir = build_store(tmp_path / "store", messages=600)
    script = f"""
import logging, sys
from pathlib import Path
logging.basicConfig(stream=sys.stderr, format="%(message)s")
from flashlexd.store import Incoming, Store, StoreDamaged
from tests.damage import CAP, garble_page
store = Store(Path({str(data_dir)!r}), CAP, expire_seconds=3600)
garble_page(Path({str(data_dir)!r}) / "data.mdb", {_a_page_of(data_dir, "inbox")}, {garbage_seed})
outcomes = []
for _ in range(3):
    for call in (lambda: store.messages(limit=1000), store.stats,
                 lambda: store.append([Incoming("t", b"x", 1, False, 9)])):
        try:
            call()
            outcomes.append("ok")
        except StoreDamaged:
            outcomes.append("damaged")
print(outcomes, store.damage is not None)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{['damaged'] * 9} True", run.stdout
    log = run.stderr.strip().splitlines()
    assert len(log) == 1 and "is damaged:" in log[0] and "read-only" in log[0], log


def test_damage_met_by_the_running_daemon_degrades_it_without_tracebacks(daemon_config, broker,
                                                                        tmp_path):
    """A page of the live store garbled under the running daemon: `status` still answers and
    names the damage, flashlexctl says degraded, ingress stops acknowledging, the supervisor
    lives on, and the log has a line per process, no Traceback."""
    from flashlexd.client import RpcError, connect
    from tests.broker import INGRESS_TOPIC, publish, wait_for
    from tests.daemon import Daemon, NotifyListener

    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        notify.wait_for("READY=1", timeout=15)
        with connect(str(daemon.socket_path)) as fx:
            wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected"), 15, "ingress")
            publish(broker, INGRESS_TOPIC, b"before")
            wait_for(lambda: fx.messages(), 15, "the first message")
            data_dir = daemon_config.parent / "data"
            garble_page(data_dir / "data.mdb", _a_page_of(data_dir, "inbox"), seed=5)
            status = wait_for(lambda: fx.status() if fx.status()["store"].get("damaged") else None,
                              15, "status to name the damage")
            assert "is damaged:" in status["store"]["damaged"]
            publish(broker, INGRESS_TOPIC, b"after")
            ingress = wait_for(lambda: fx.status()["mqtt"]["ingress"].get("store_error"), 15,
                               "ingress to refuse storing")
            assert "is damaged" in ingress
            assert fx.status()["mqtt"]["ingress"]["stored"] == 1  # "after" was not acknowledged
            ctl = subprocess.run([str(Path(sys.executable).parent / "flashlexctl"), "--socket",
                                  str(daemon.socket_path), "status"], capture_output=True,
                                 text=True, timeout=30)
            assert ctl.returncode == 1 and "is damaged" in ctl.stdout, ctl.stdout + ctl.stderr
            for _ in range(3):  # more calls, more status ticks: no more log lines
                fx.status()
                with pytest.raises(RpcError) as refused:
                    fx.ack(["1"])
                assert refused.value.code == "store_error"
        wait_for(lambda: any(f.startswith("STATUS=") and "store damaged" in f
                             for _, f in notify.lines()), 10, "the STATUS= line to name it")
        assert daemon.proc.poll() is None, daemon.output()
        output = daemon.output()
        assert "Traceback" not in output, output
        assert output.count("is damaged") <= 4, output  # once per process that met it
    finally:
        daemon.stop()
        notify.close()


def test_damage_the_supervisor_met_in_a_call_is_in_status_though_its_figures_still_read(
        daemon_config, tmp_path):
    """`status` and the STATUS= line named the damage only when the store's figures failed to
    read: damage met elsewhere (here a dead letters' page, read by `outbox(dead=True)`) left
    the store read-only and every status healthy-looking (found by review)."""
    from flashlexd.client import RpcError, connect
    from tests.broker import open_store, wait_for
    from tests.daemon import Daemon, NotifyListener

    store = open_store(daemon_config)
    store.append([Incoming("t", b"m" * 200) for _ in range(400)])  # several leaf pages
    store.close()
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        notify.wait_for("READY=1", timeout=15)
        data_dir = daemon_config.parent / "data"
        garble_page(data_dir / "data.mdb", _a_page_of(data_dir, "inbox", last=True), seed=7)
        with connect(str(daemon.socket_path)) as fx:
            assert fx.status()["inbox"]["count"] == 400  # the figures read: the first page is whole
            with pytest.raises(RpcError) as refused:
                fx.call("messages", limit=1000)  # one read over every page
            assert refused.value.code == "store_error"
            assert "is damaged:" in fx.status()["store"].get("damaged", ""), fx.status()["store"]
        wait_for(lambda: any(f.startswith("STATUS=") and "store damaged" in f
                             for _, f in notify.lines()), 10, "the STATUS= line to name it")
    finally:
        daemon.stop()
        notify.close()


def test_recover_copies_databases_and_fields_it_does_not_know(tmp_path):
    """A store written by a later schema (an extra database, extra record fields, longer
    expiry keys, other meta entries) is verified and recovered without losing them."""
    import lmdb
    import msgpack

    data_dir = build_store(tmp_path / "store", messages=100)
    env = lmdb.open(str(data_dir), max_dbs=8, map_size=CAP * 2)
    with env.begin(write=True) as txn:
        later = env.open_db(b"later", txn=txn)  # a later schema's database (`dead` is schema 1's)
        txn.put((1).to_bytes(8, "big"), b"a later record", db=later)
        inbox = env.open_db(b"inbox", txn=txn)
        txn.put((1000).to_bytes(8, "big"), msgpack.packb(
            [1.7e9, "t", b"p", 1, False, 5, None, 3, 12.5], use_bin_type=True), db=inbox)
        expiry = env.open_db(b"expiry", txn=txn)
        txn.put(b"\0\0\0\3" + (10 ** 12).to_bytes(8, "big") + (1000).to_bytes(8, "big"), b"",
                db=expiry)
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"frame\0\0\0\3", b"a boot frame of any length", db=meta)
    env.close()
    assert flashlexd("store", "verify", "--data-dir", str(data_dir)).returncode == 0
    recovered = flashlexd("store", "recover", "--data-dir", str(data_dir), "--to", str(tmp_path / "new"))
    assert recovered.returncode == 0 and "later: copied 1, lost 0" in recovered.stdout, recovered.stdout
    assert "nothing was lost" in recovered.stdout
    env = lmdb.open(str(tmp_path / "new"), max_dbs=8, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"frame\0\0\0\3", db=env.open_db(b"meta", txn=txn, create=False)) \
            == b"a boot frame of any length"
        keys = [k for k, _ in txn.cursor(db=env.open_db(b"expiry", txn=txn, create=False))]
        assert b"\0\0\0\3" + (10 ** 12).to_bytes(8, "big") + (1000).to_bytes(8, "big") in keys
    env.close()


def test_recover_gives_out_no_id_a_consumer_is_already_past(tmp_path):
    """A consumer that acked the newest messages stands past the inbox's last record (the ids
    were given out and are gone). With the meta counter lost, recovery used to restart the ids
    at the highest one it copied: new messages got ids at or below that floor, never seen."""
    import lmdb
    from flashlexd.consumers import ConsumerSpec

    store = Store(tmp_path / "store", CAP)
    store.consumer_declare([ConsumerSpec("a"), ConsumerSpec("b", "b/#")], 0.0)
    ids = store.append([Incoming("x", b"p")] * 10)
    store.consumer_ack("a", ids, 0.0)  # a was their only consumer: they all leave
    assert store.consumer_state("a").floor == ids[-1] and not store.messages()
    store.close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=16, map_size=CAP * 2)
    with env.begin(write=True) as txn:  # what an unreadable meta entry leaves recovery to go by
        txn.delete(b"inbox_last_id", db=env.open_db(b"meta", txn=txn))
    env.close()
    ok, _ = storetools.recover(tmp_path / "store", tmp_path / "new", CAP)
    recovered = Store(tmp_path / "new", CAP)
    new = recovered.append([Incoming("x", b"q")])
    assert ok and new[0] > ids[-1]
    assert [m.id for m in recovered.consumer_messages("a")] == new
    recovered.close()


def test_a_page_walk_reports_its_progress(tmp_path):
    store = Store(tmp_path / "data", cap_bytes=64 << 20)
    for _ in range(10):
        store.append([Incoming("t", b"x" * 400) for _ in range(4000)])  # ~4,800 pages
    store.close()
    calls = []
    read = storecheck.walk_pages(tmp_path / "data" / "data.mdb", lambda *call: calls.append(call))
    assert len(calls) >= 2 and read >= calls[-1][0]
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert all(done - before >= storecheck.PROGRESS_PAGES for (before, _), (done, _) in zip(calls, calls[1:]))
    assert {pages for _, pages in calls} == {calls[0][1]} and calls[0][1] >= read


def test_recover_keeps_the_acks_the_journal_holds(tmp_path):
    """A kill (a power cut) left acks journaled, not applied; `store recover` copied data.mdb
    alone, so the acked messages came back to their apps after the switch-over."""
    from tests.test_ack_journal import inbox_ids, journaled, store_then_crash
    old = tmp_path / "store"
    old.mkdir()
    store_then_crash(old, 6, [2, 4, 5])  # acks of 2, 4 and 5 returned, then SIGKILL
    assert inbox_ids(old) == [1, 2, 3, 4, 5, 6]
    done = flashlexd("store", "recover", "--data-dir", str(old), "--to", str(tmp_path / "new"))
    assert done.returncode == 0 and "acks.journal: copied" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "new" / "acks.journal").stat().st_mode & 0o777 == 0o600
    store = journaled(tmp_path / "new")  # as the supervisor opens it
    try:
        assert [m.id for m in store.messages()] == [1, 3, 6]
    finally:
        store.close()


def test_recover_that_cannot_write_the_journal_says_so_and_leaves_no_target(
        tmp_path, monkeypatch):
    """The disk filled while the ack journal was copied: recover printed a Traceback and left
    a half-written store that the next try refused ("is not empty")."""
    from tests.test_ack_journal import store_then_crash
    old = tmp_path / "store"
    old.mkdir()
    store_then_crash(old, 3, [2])
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("acks.journal"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk)
        ok, lines = storetools.recover(old, tmp_path / "new", CAP)
    assert not ok and lines == [f"cannot recover {old} into {tmp_path / 'new'}: [Errno 28] No space"
                                " left on device"], lines
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store"]  # no new, no partial store
    ok, lines = storetools.recover(old, tmp_path / "new", CAP)  # the same command, once there is room
    assert ok and "acks.journal: copied" in " ".join(lines), lines
    (tmp_path / "a-file").write_text("")
    ok, lines = storetools.recover(old, tmp_path / "a-file", CAP)  # was NotADirectoryError's Traceback
    assert not ok and lines == [f"{tmp_path / 'a-file'}: Not a directory: recover writes a fresh"
                                " store into a new directory"], lines


def test_recover_cut_off_mid_copy_leaves_no_store_and_runs_again(tmp_path):
    """`store recover` SIGKILLed mid-copy (a power cut, Ctrl-C) left NEW a complete, valid,
    empty store: verify said clean, the rerun refused ("is not empty"), and README's `mv`
    switched the daemon onto it, every message gone (found by review). NEW now appears only
    whole; the rerun clears what the cut left and copies everything."""
    source = tmp_path / "store"
    store = Store(source, 512 << 20)
    try:
        for batch in range(120):
            store.append([Incoming("t", b"x%07d" % (batch * 500 + i)) for i in range(500)])
        stored = store.inbox_count()
    finally:
        store.close()
    new = tmp_path / "new"
    command = [sys.executable, "-m", "flashlexd", "store", "recover", "--data-dir", str(source), "--to", str(new)]
    recovering = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list(tmp_path.glob("new*/data.mdb")), 30, "the copy to begin", interval=0.002)
    finally:
        recovering.kill()
        recovering.wait(timeout=10)
    assert recovering.returncode == -signal.SIGKILL  # cut off, not finished
    assert not new.exists() or list(new.iterdir()) == [], list(new.iterdir())
    again = flashlexd("store", "recover", "--data-dir", str(source), "--to", str(new))
    assert again.returncode == 0, again.stderr
    assert f"inbox: copied {stored}, lost 0" in again.stdout, again.stdout
    assert again.stdout.startswith(f"removed {tmp_path / 'new.partial-'}"), again.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new", "store"]  # no partial left
    store = Store(new, 512 << 20)
    try:
        assert store.inbox_count() == stored == 60000
    finally:
        store.close()


def test_recover_into_an_empty_mount_point_builds_the_store_on_that_disk(tmp_path):
    """NEWDIR a new disk's empty mount point (README's "run it again on a larger disk"): the
    store, built beside NEWDIR and renamed onto it, failed after the whole copy with EBUSY
    (and with "no space" on a small parent disk; found by review). It is built inside NEWDIR
    now, its files moved up; a rerun clears a partial store a cut left there, nothing else
    makes NEWDIR count as empty, and a journal moved up without data.mdb is no store."""
    from tests.test_ack_journal import journaled, store_then_crash
    old = tmp_path / "store"
    old.mkdir()
    store_then_crash(old, 2000, [2, 4, 5])
    with mounted_tmpfs(tmp_path / "new", 64) as new:
        done = flashlexd("store", "recover", "--data-dir", str(old), "--to", str(new))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "inbox: copied 2000, lost 0" in done.stdout and "acks.journal: copied" in done.stdout
        assert sorted(path.name for path in new.iterdir()) == ["acks.journal", "data.mdb"]
        store = journaled(new)
        try:
            assert store.inbox_count() == 1997
        finally:
            store.close()
        (new / "data.mdb").unlink()  # as a cut mid-move leaves it: the journal up, data.mdb not
        assert storetools.verify(new)[1] == [f"no store in {new} (no data.mdb)"]
        with pytest.raises(StoreError, match="no store in .* a store recover into it was cut off"):
            Store(new, CAP)
        for path in new.iterdir():
            path.unlink()
        (new / ".partial-k1ll3d00").mkdir()
        (new / ".partial-k1ll3d00" / "data.mdb").write_bytes(b"half")
        (new / "stray").write_text("")
        refused = flashlexd("store", "recover", "--data-dir", str(old), "--to", str(new))
        assert refused.returncode == 1 and f"{new} is not empty" in refused.stdout + refused.stderr
        (new / "stray").unlink()
        again = flashlexd("store", "recover", "--data-dir", str(old), "--to", str(new))
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.startswith(f"removed {new / '.partial-k1ll3d00'}: left by a recover that"
                                       " was cut off"), again.stdout
        assert sorted(path.name for path in new.iterdir()) == ["acks.journal", "data.mdb"]

def test_recover_copies_a_store_over_a_cap_lowered_since(tmp_path, daemon_config):
    """The map was the config's cap: a store holding more failed with MDB_MAP_FULL's traceback,
    and the half-written target refused the next try."""
    old = tmp_path / "store"
    store = Store(old, 64 << 20)
    try:
        for start in range(0, 8000, 500):
            store.append([Incoming("t", b"x" * 2000, mid=start // 500 + 1) for _ in range(500)])
    finally:
        store.close()
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["db"].update(dataPath=str(old), capMegabytes=2)
    daemon_config.write_text(yaml.safe_dump(document, sort_keys=False))
    done = flashlexd("store", "recover", "--config", str(daemon_config), "--to", str(tmp_path / "new"))
    assert done.returncode == 0 and "nothing was lost" in done.stdout, done.stderr[-600:]
    recovered = Store(tmp_path / "new", 2 << 20)
    try:
        assert recovered.stats()["inbox_count"] == 8000
    finally:
        recovered.close()


def test_store_commands_take_the_keys_dir_of_a_migrated_device(tmp_path):
    """Found by review: on a device migrated as the README says (the SDK's DIR/keys/config.yml,
    its key files in DIR's parent, named by the unit's -k), `store verify/recover --config`
    failed on the key-file check, told the user to "add -k", then refused -k as unknown."""
    install = tmp_path / "opt" / "flashlex"
    (install / "keys").mkdir(parents=True)
    config = install / "keys" / "config.yml"
    config.write_bytes(seed_bytes())
    keys = make_keys(tmp_path / "opt")
    data_dir = tmp_path / "store"
    store = Store(data_dir, CAP)
    try:
        store.append([Incoming("ingress/t", b'{"n": %d}' % i, mid=i + 1) for i in range(10)])
    finally:
        store.close()
    hinted = flashlexd("store", "verify", "--config", str(config), "-d", str(data_dir))
    assert hinted.returncode == 2 and f"add -k {keys}" in hinted.stderr, hinted.stderr
    verify = flashlexd("store", "verify", "--config", str(config), "-k", str(keys), "-d", str(data_dir))
    assert verify.returncode == 0, verify.stderr
    recover = flashlexd("store", "recover", "--config", str(config), "--keys-dir", str(keys),
                        "-d", str(data_dir), "--to", str(tmp_path / "new"))
    assert recover.returncode == 0 and "nothing was lost" in recover.stdout, recover.stderr


# -- found by review: records that decode but are not what the daemon wrote ----------------

def _garble_dead_letter(data: Path) -> None:
    """Make the one dead letter's msgpack array undecodable (same length: the page and the
    tree stay intact, as bit rot inside a value leaves them)."""
    raw = bytearray(data.read_bytes())
    at = raw.rfind(b"\x9a\x03\xa7refused")  # [attempts=3, "refused", dead_at, *entry]
    assert at > 0
    raw[at + 10] = 0x92  # dead_at's 3-item array header now says 2: trailing bytes
    data.write_bytes(bytes(raw))


def test_verify_and_recover_see_a_dead_letter_that_does_not_decode(tmp_path: Path):
    """README: verify checks "every record (key width, fields and their types ...)", recover
    skips "records that do not decode". A dead letter that does not decode passes verify
    (exit 0), recover copies it and reports "nothing was lost", and both the old and the
    recovered store go read-only at the first dead-letter listing (ingress stops acking)."""
    data_dir = tmp_path / "store"
    store = Store(data_dir, CAP)
    try:
        store.outbox_append([("egress/t", b"p" * 50, 1, False)])
        assert store.outbox_dead_letter(1, "refused", 3)
    finally:
        store.close()
    _garble_dead_letter(data_dir / "data.mdb")
    store = Store(data_dir, CAP, check_pages=True)  # `run` opens it without complaint
    try:
        with pytest.raises(StoreDamaged):
            store.dead_letters()
        assert store.damage is not None  # read-only now
    finally:
        store.close()
    verify = flashlexd("store", "verify", "--data-dir", str(data_dir))
    ok, lines = storetools.recover(data_dir, tmp_path / "new", CAP)
    recovered = Store(tmp_path / "new", CAP, check_pages=True)
    try:
        recovered.dead_letters()
        recovered_ok = True
    except StoreDamaged:
        recovered_ok = False
    finally:
        recovered.close()
    assert verify.returncode == 1, f"verify passed a store the daemon finds damaged: {verify.stdout}"
    assert recovered_ok, f"the recovered store is damaged the same way: {lines}"


def test_an_inbox_record_with_a_garbled_stamp_is_damage_not_a_traceback(tmp_path: Path):
    """A garbled boottime field (bit rot inside a value): `messages` raised a bare TypeError
    (the API logs a traceback for each call, the store is not marked damaged, an app can never
    read past that message) and `store verify` said every record reads back."""
    data_dir = tmp_path / "store"
    store = Store(data_dir, CAP)
    try:
        store.append([Incoming("t", b"a", mid=1)])
    finally:
        store.close()
    env = lmdb.open(str(data_dir), max_dbs=16, map_size=2 * CAP)
    with env.begin(write=True) as txn:
        txn.put((2).to_bytes(8, "big"), msgpack.packb([1.7e9, "t", b"p", 1, False, 5, None, 1, "y"],
                                                      use_bin_type=True),
                db=env.open_db(b"inbox", txn=txn))
        txn.put(b"inbox_last_id", (2).to_bytes(8, "big"), db=env.open_db(b"meta", txn=txn))
    env.close()
    ok, lines = storetools.verify(data_dir)
    store = Store(data_dir, CAP)
    try:
        try:
            store.messages()
            outcome = "read"
        except StoreDamaged:
            outcome = "damaged"
        except TypeError as exc:  # what it was
            outcome = f"traceback: {type(exc).__name__}: {exc}"
    finally:
        store.close()
    assert outcome == "damaged", outcome
    assert not ok, lines


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root, as `recover` run under sudo has")
def test_recover_run_as_root_leaves_the_new_store_to_the_owner_of_the_old(tmp_path: Path):
    """`sudo flashlexd store recover` wrote the new store as root's (dir 0700, files 0600): once
    moved into place as the README says, a service running as its own user could not open it
    (outside /var/lib nothing re-owns it; found by review)."""
    data_dir = build_store(tmp_path / "store", messages=50)
    for path in (data_dir, *data_dir.iterdir()):
        os.chown(path, 1000, 1000)
    new = tmp_path / "new"
    recovered = flashlexd("store", "recover", "--data-dir", str(data_dir), "--to", str(new))
    assert recovered.returncode == 0, recovered.stderr
    owners = {path.name: (path.stat().st_uid, path.stat().st_gid) for path in (new, *new.iterdir())}
    assert "data.mdb" in owners and set(owners.values()) == {(1000, 1000)}, owners


@pytest.mark.parametrize("bad", [b"bad", b"\0" * 25], ids=["short", "longer than a mark"])
def test_verify_and_recover_see_a_dup_mark_that_does_not_decode(tmp_path: Path, bad: bytes):
    """A garbled `unconfirmed` mark (or consumer record, or dedupe stamp) passed `verify`
    ("every page and record reads back", exit 0), and `recover` copied it as it was, while the
    daemon calls it damage and turns the store read-only at the first redelivery of that
    content (found by review)."""
    from flashlexd.store import dup_marks
    data_dir = build_store(tmp_path / "store", messages=50)
    message = Incoming("t", b"x", 1, False, 1)
    env = lmdb.open(str(data_dir), max_dbs=16, map_size=CAP * 2)
    with env.begin(write=True) as txn:
        txn.put(dup_marks([message])[0], bad, db=env.open_db(b"unconfirmed", txn=txn))
    env.close()
    store = Store(data_dir, CAP, expire_seconds=3600)
    try:  # what the daemon makes of it
        with pytest.raises(StoreDamaged):
            store.append([Incoming("t", b"x", 1, False, 2, dup=True)])
    finally:
        store.close()
    verify = flashlexd("store", "verify", "--data-dir", str(data_dir))
    assert verify.returncode == 1 and "database unconfirmed, record" in verify.stderr, verify.stdout
    recovered = flashlexd("store", "recover", "--data-dir", str(data_dir), "--to", str(tmp_path / "new"))
    assert recovered.returncode == 0 and "unconfirmed: copied " in recovered.stdout
    assert "(1 did not decode)" in next(line for line in recovered.stdout.splitlines()
                                        if line.startswith("unconfirmed:"))
    assert flashlexd("store", "verify", "--data-dir", str(tmp_path / "new")).returncode == 0


def test_recover_onto_a_disk_that_fills_says_so_and_claims_no_copies(tmp_path):
    """`store recover --to` a disk that filled said "Input/output error" (LMDB's word for a
    write cut short), which reads like the failing SD card recover is run for, after listing
    every database as "copied" into a store that was never written (found by review). Now it
    names the full disk as the daemon does, claims no copies, and leaves the target empty."""
    source = tmp_path / "store"
    rng = random.Random(1)
    store = Store(source, CAP)
    try:
        for batch in range(20):
            store.append([Incoming("t/a", rng.randbytes(900), 1, False, batch * 50 + i + 1) for i in range(50)])
    finally:
        store.close()
    with mounted_tmpfs(tmp_path / "small", 1) as small:  # ~1 MB: the ~1.2 MB of messages do not fit
        done = flashlexd("store", "recover", "--data-dir", str(source), "--to", str(small / "new"))
        left = list((small / "new").iterdir()) if (small / "new").exists() else []
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "no space left on device" in done.stderr, done.stderr
    assert "copied" not in done.stdout, done.stdout
    assert left == []  # the same command can be run again elsewhere


def _store_of_the_next_schema(data_dir: Path) -> None:
    """A store as the next schema may write it: a DUP mark holding more packet ids than this
    one reads."""
    import struct
    from flashlexd.redelivery import MARK, MIDS_MAX
    from flashlexd.storebase import SCHEMA_VERSION
    store = Store(data_dir, CAP)
    store.append([Incoming("cmd/light", b"on", mid=100 + i) for i in range(3)], links=[9] * 3, ids_kept=True)
    store.close()
    env = lmdb.open(str(data_dir), max_dbs=16)
    with env.begin(write=True) as txn:
        meta, marks = env.open_db(b"meta", txn=txn), env.open_db(b"unconfirmed", txn=txn)
        txn.put(b"schema", struct.pack(">Q", SCHEMA_VERSION + 1), db=meta)
        digest, _ = next(iter(txn.cursor(db=marks)))
        count = MIDS_MAX + 1
        txn.put(digest, MARK.pack(count, 1, 9, count) + struct.pack(f">{count}H", *range(count)), db=marks)
    env.close()


@pytest.mark.parametrize("command", ["verify", "recover"])
def test_a_store_of_a_newer_schema_is_refused_by_verify_and_recover_not_called_damaged(tmp_path, command):
    """Found by review: after a rollback, `store verify` called a sound store of the newer
    release damaged (a DUP mark of more packet ids than this release reads) and `store
    recover` dropped such records as not decoding. Both now refuse it in one line."""
    from flashlexd import __version__ as flashlexd_version
    from flashlexd.storebase import SCHEMA_VERSION
    _store_of_the_next_schema(tmp_path / "data")
    extra = ["--to", str(tmp_path / "new")] if command == "recover" else []
    result = flashlexd("store", command, "--data-dir", str(tmp_path / "data"), *extra)
    assert result.returncode == 1
    assert (result.stdout + result.stderr).strip().splitlines()[-1] == (
        f"store in {tmp_path / 'data'} has schema {SCHEMA_VERSION + 1}; this flashlexd ({flashlexd_version}) reads up to"
        f" {SCHEMA_VERSION}: use the flashlexd that wrote it (upgrade flashlexd)"), result.stdout + result.stderr


def test_a_start_on_a_store_of_a_newer_schema_is_exit_2(daemon_config, tmp_path):
    """After a rollback the start was refused in one line, exit 1: the unit tried again every
    2 s for good, which no restart mends (review "upgrade"). Exit 2 is not restarted."""
    _store_of_the_next_schema(tmp_path / "data")
    run = flashlexd("run", "--config", str(daemon_config), "--data-dir", str(tmp_path / "data"),
                    "--socket", str(tmp_path / "api.sock"))
    assert run.returncode == 2, run.stderr
    assert "has schema" in run.stderr and "upgrade flashlexd" in run.stderr and run.stderr.count("\n") == 1, run.stderr


def test_recover_follows_no_symlink_the_data_dirs_owner_planted(tmp_path):
    """Recover runs as root and gives what it writes to the data dir's owner (the service
    user), who could plant `acks.journal -> /etc/shadow` or `data.mdb -> another thing's
    store`: both were copied (review "security", 3 of 3)."""
    secret = tmp_path / "root-only"
    secret.write_text("the root password hash")
    secret.chmod(0o600)
    data_dir = build_store(tmp_path / "store", messages=20)
    (data_dir / "acks.journal").unlink(missing_ok=True)
    (data_dir / "acks.journal").symlink_to(secret)
    recovered = flashlexd("store", "recover", "--data-dir", str(data_dir), "--to", str(tmp_path / "new"))
    assert recovered.returncode == 0, recovered.stderr
    assert "acks.journal: cannot read it (it is a symlink, not followed)" in recovered.stdout, recovered.stdout
    assert not (tmp_path / "new" / "acks.journal").exists()
    other = build_store(tmp_path / "other", messages=5)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "data.mdb").symlink_to(other / "data.mdb")
    refused = flashlexd("store", "recover", "--data-dir", str(planted), "--to", str(tmp_path / "stolen"))
    assert refused.returncode == 1 and "data.mdb is a symlink: refused" in refused.stderr + refused.stdout, refused
    assert not (tmp_path / "stolen").exists()


def test_an_ack_journal_planted_as_a_symlink_is_set_aside_not_read(tmp_path, caplog):
    """Its writer opens it O_NOFOLLOW, but the start read a planted `acks.journal -> FILE`
    through the link, then ran with direct commits and an ERROR at every start (left alone
    by session 43). Now the link is set aside like an unreadable journal, and a fresh one made."""
    data_dir = build_store(tmp_path / "store", messages=5)
    (data_dir / "acks.journal").unlink(missing_ok=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"\x00" * 4096)
    (data_dir / "acks.journal").symlink_to(elsewhere)
    store = Store(data_dir, CAP)
    try:
        store.open_ack_journal()
        assert not (data_dir / "acks.journal").is_symlink()
        assert [p for p in data_dir.iterdir() if p.name.startswith("acks.journal.damaged-")]
        assert "(it is a symlink, not followed)" in caplog.text, caplog.text
        assert elsewhere.read_bytes() == b"\x00" * 4096
    finally:
        store.close()


def test_a_space_reserve_planted_as_a_symlink_is_neither_grown_nor_truncated(tmp_path, caplog):
    """On a full disk the reserve is truncated a chunk at a time: through a planted
    `space.reserve -> FILE`, a daemon run as root truncated FILE (session 43 left it alone)."""
    from flashlexd.spacereserve import CHUNK_BYTES, FILE_NAME, SpaceReserve
    target = tmp_path / "not-the-reserve"
    target.write_bytes(b"x" * 2 * CHUNK_BYTES)
    (tmp_path / FILE_NAME).symlink_to(target)
    reserve = SpaceReserve(tmp_path)
    assert reserve.release() == 0
    reserve.top_up()
    reserve.release()
    assert target.read_bytes() == b"x" * 2 * CHUNK_BYTES
    assert caplog.text.count("is not a regular file (a symlink?): not used") == 1, caplog.text


def test_a_space_reserve_that_cannot_be_made_is_said_once(tmp_path, caplog):
    """Review "diskfull": on a disk out of inodes the reserve was never made and nothing said
    so, while the README counts on it for acks on a full disk."""
    from flashlexd.spacereserve import SpaceReserve
    with mounted_tmpfs(tmp_path / "disk", 8, options="nr_inodes=2") as disk:
        (disk / "the last inode").touch()
        reserve = SpaceReserve(disk)
        reserve.top_up()
        reserve.top_up()
    assert caplog.text.count("cannot be made (No space left on device)") == 1, caplog.text
