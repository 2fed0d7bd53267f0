"""`Store.stats` reads its figures once per snapshot (flashlexd/store.py): these tests hold it to
showing every change at once, a commit by another process, an ack waiting in the journal, a
clock that moved, and to not reading the databases again while nothing changed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flashlexd.clock import Reading
from flashlexd.store import Incoming, Store

CAP = 64 * 1024 * 1024

APPEND_ELSEWHERE = """
import sys
from pathlib import Path
from flashlexd.store import Incoming, Store
store = Store(Path(sys.argv[1]), int(sys.argv[2]))
store.append([Incoming("other/process", b"x" * 3000) for _ in range(int(sys.argv[3]))])
store.outbox_append([("up", b"y", 1, False)])
store.close()
"""


class StoppedClock:
    """A clock that moves only when told (both clocks together: real time passing)."""
    boot_id = b"boot-figures"

    def __init__(self) -> None:
        self.wall, self.boottime = 1_796_000_000.0, 50.0

    def now(self) -> Reading:
        return Reading(self.wall, self.boottime)


def append_in_another_process(path: Path, count: int) -> None:
    subprocess.run([sys.executable, "-c", APPEND_ELSEWHERE, str(path), str(CAP), str(count)],
                   check=True, timeout=60)


@pytest.fixture
def store(tmp_path: Path):
    opened = Store(tmp_path / "store", CAP)
    yield opened
    opened.close()


def test_a_commit_by_another_process_shows_in_the_next_figures(store: Store):
    before = store.stats()
    assert (before["inbox_count"], before["outbox_count"], before["inbox_oldest"]) == (0, 0, None)
    append_in_another_process(store.path, 40)
    after = store.stats()
    assert (after["inbox_count"], after["received"], after["inbox_last_id"]) == (40, 40, 40)
    assert after["outbox_count"] == after["queued"] == 1
    assert after["used_bytes"] > before["used_bytes"]
    assert after["inbox_oldest"] is not None and after["outbox_oldest"] is not None


def test_an_ack_waiting_in_the_journal_shows_at_once(store: Store):
    store.open_ack_journal()  # the supervisor's handle: an ack is a journal record, no commit
    ids = store.append([Incoming("t", b"%d" % i) for i in range(5)])
    oldest = store.stats()["inbox_oldest"]
    assert store.ack(ids[:2]) == 2
    figures = store.stats()
    assert (figures["inbox_count"], figures["acked"], figures["acks_waiting"]) == (3, 2, 2)
    assert figures["inbox_oldest"] >= oldest
    assert store.ack(ids[2:]) == 3
    figures = store.stats()
    assert (figures["inbox_count"], figures["acked"], figures["inbox_oldest"]) == (0, 5, None)


def test_ages_move_between_commits(tmp_path: Path):
    clock = StoppedClock()
    store = Store(tmp_path / "store", CAP, clock=clock)  # type: ignore[arg-type]
    try:
        store.append([Incoming("t", b"a")])
        store.outbox_append([("up", b"b", 1, False)])
        first = store.stats()
        clock.wall += 7
        clock.boottime += 7
        later = store.stats()
        assert later["inbox_oldest_age"] == pytest.approx(first["inbox_oldest_age"] + 7)
        assert later["outbox_oldest_age"] == pytest.approx(first["outbox_oldest_age"] + 7)
        assert later["inbox_oldest"] == first["inbox_oldest"]  # an arrival time does not move
    finally:
        store.close()


def test_the_databases_are_read_once_per_snapshot(store: Store, monkeypatch: pytest.MonkeyPatch):
    reads = []
    read_figures = Store._read_figures
    monkeypatch.setattr(Store, "_read_figures",
                        lambda self, txn: reads.append(1) or read_figures(self, txn))
    store.append([Incoming("t", b"a")])
    for _ in range(3):
        assert store.stats()["inbox_count"] == 1
    assert len(reads) == 1, "figures read again with no commit in between"
    store.append([Incoming("t", b"b")])
    assert store.stats()["inbox_count"] == 2 and len(reads) == 2


def test_the_consumers_report_follows_commits_and_journaled_acks(store: Store):
    from flashlexd.consumers import ConsumerSpec
    store.open_ack_journal()
    store.consumer_declare([ConsumerSpec("all")], 0.0)
    ids = store.append([Incoming("t", b"a"), Incoming("t", b"b")])
    assert [c["backlog"] for c in store.consumers_report()] == [2]
    store.append([Incoming("t", b"c")])
    assert [c["backlog"] for c in store.consumers_report()] == [3]
    assert store.ack(ids[:1]) == 1  # unnamed: gone for everyone, waiting in the journal
    [entry] = store.consumers_report()
    assert entry["backlog"] == 2 and entry["oldest_age"] is not None
