"""The FlashLex SDK 1.4's store, `subscription.json` (pickleDB) in its data dir. flashlexd does
not read it (README: "Migrating from the FlashLex SDK 1.4", step 1: drain it first). Pointed at
the old data dir, flashlexd starts with an empty inbox beside it: one line says the old file is
still there, so its messages are not taken for lost, nor the migration's first step skipped."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

OLD_STORE = "subscription.json"
EMPTY = 2  # bytes: pickleDB's empty store is "{}"


def old_store_note(data_dir: Path) -> Optional[str]:
    """One line when the data dir holds the old SDK's store with something in it, else None."""
    path = data_dir / OLD_STORE
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if size <= EMPTY:
        return None
    return (f"{path} ({size} bytes) is the FlashLex SDK's store: flashlexd does not read it;"
            " drain it with the old SDK if it holds messages you still need (README: Migrating"
            " from the FlashLex SDK 1.4)")
