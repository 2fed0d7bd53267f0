"""The local API's wire format, for clients: re-exported from `flashlexd.wire`, where the
daemon reads it too (one definition, importable from a source checkout)."""
from flashlexd.wire import *  # noqa: F401,F403
from flashlexd.wire import __all__  # noqa: F401
