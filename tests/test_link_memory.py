"""What a link's worker reads from the store at start (flashlexd/workers/linkmemory.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from flashlexd.store import Store, StoreDamaged
from flashlexd.workers.linkmemory import earlier_session


def test_clean_start_only_on_the_store_s_first_connection(tmp_path: Path):
    store = Store(tmp_path / "db", 10 * 2**20)
    try:
        assert earlier_session(store, "thing") == (None, True)
        store.note_session("thing", 1_700_000_000.0)
        assert earlier_session(store, "thing") == (1_700_000_000.0, False)
        assert earlier_session(store, "thing-egress") == (None, True)
    finally:
        store.close()


class _UnreadableSessions(Store):
    """A real store whose session record cannot be read (as after damage to its page)."""

    def session_seen(self, client_id: str) -> Optional[float]:
        raise StoreDamaged("the meta page does not decode")


def test_an_unreadable_store_keeps_the_broker_s_session(tmp_path: Path, caplog):
    store = _UnreadableSessions(tmp_path / "db", 10 * 2**20)
    try:
        with caplog.at_level(logging.WARNING, logger="flashlexd"):
            assert earlier_session(store, "thing") == (None, False)
        assert "the broker's is kept" in caplog.text
    finally:
        store.close()
