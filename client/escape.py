"""Escaping for terminal output, for clients: re-exported from `flashlexd.escape` (the daemon's
log lines use it too)."""
from flashlexd.escape import printable  # noqa: F401

__all__ = ["printable"]
