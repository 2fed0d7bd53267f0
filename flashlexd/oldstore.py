"""The FlashLex SDK 1.4's store: a pickleDB JSON file in its data dir (`subscription.json`, or
what `flashlex.app.db.subscriptionData` named). flashlexd does not read it (README: "Migrating
from the FlashLex SDK 1.4", step 1: drain it first). Pointed at the old data dir, flashlexd
starts with an empty inbox beside it: one line says the old file is still there, so its
messages are not taken for lost, nor the migration's first step skipped. Any JSON file there
counts: flashlexd writes none, and the config's name for it may have changed since."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

EMPTY = 2  # bytes: pickleDB's empty store is "{}"


def old_store_note(data_dir: Path) -> Optional[str]:
    """One line when the data dir holds a JSON store with something in it, else None."""
    try:
        found = sorted((path, path.stat().st_size) for path in data_dir.glob("*.json") if path.is_file())
    except OSError:
        return None
    kept = [(path, size) for path, size in found if size > EMPTY]
    if not kept:
        return None
    path, size = kept[0]
    more = f" (and {len(kept) - 1} more JSON files)" if len(kept) > 1 else ""
    return (f"{path} ({size} bytes){more} is the FlashLex SDK's store: flashlexd does not read it;"
            " drain it with the old SDK if it holds messages you still need (README: Migrating"
            " from the FlashLex SDK 1.4)")
