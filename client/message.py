"""What the API returns, as small frozen records: re-exported from `flashlexd.records`, where the
daemon's store builds them too (one definition)."""
from flashlexd.records import Message, OutboxEntry

__all__ = ["Message", "OutboxEntry"]
