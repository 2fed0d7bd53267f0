"""What a link's worker reads from the store at start (flashlexd/workers/linkmemory.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from flashlexd.store import Store, StoreDamaged
from flashlexd.workers.linkmemory import earlier_session


def test_the_earlier_session_is_when_the_store_last_saw_the_link_up(tmp_path: Path):
    store = Store(tmp_path / "db", 10 * 2**20)
    try:
        assert earlier_session(store, "thing") is None
        store.note_session("thing", 1_700_000_000.0)
        assert earlier_session(store, "thing") == 1_700_000_000.0
        assert earlier_session(store, "thing-egress") is None
    finally:
        store.close()


class _UnreadableSessions(Store):
    """A real store whose session record cannot be read (as after damage to its page)."""

    def session_seen(self, client_id: str) -> Optional[float]:
        raise StoreDamaged("the meta page does not decode")


def test_an_unreadable_store_says_a_lost_session_goes_unsaid(tmp_path: Path, caplog):
    store = _UnreadableSessions(tmp_path / "db", 10 * 2**20)
    try:
        with caplog.at_level(logging.WARNING, logger="flashlexd"):
            assert earlier_session(store, "thing") is None
        assert "a session the broker lost goes unsaid" in caplog.text
    finally:
        store.close()
