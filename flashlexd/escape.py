"""Text from others made safe to print: one function shared by the daemon's logs and flashlexctl.

Topics, client ids, payload previews and error messages come from the broker or from local
applications. Printed raw, an ESC sequence rewrites the administrator's terminal, a BEL rings,
and a newline followed by `<0>` forges a journal line at emergency priority. `printable`
shows every such character as an escape instead: stdlib only, so `flashlexd.client` stays light.
"""
from __future__ import annotations

# C0 controls, DEL and the C1 controls (U+0080-U+009F, which some terminals obey as ESC [ ...)
# as \xNN; the backslash doubled, so that "\x1b" printed always means the escape character.
_TABLE = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_TABLE[ord("\\")] = "\\\\"


def printable(text: str) -> str:
    """`text` with control characters as \\xNN, a backslash as \\\\, and any other character
    that is not printable (line and paragraph separators, bidirectional overrides, zero-width
    characters, lone surrogates) as \\uNNNN; plain text comes back unchanged (and fast)."""
    if text.isprintable() and "\\" not in text:
        return text
    escaped = text.translate(_TABLE)
    if escaped.isprintable():
        return escaped
    return "".join(c if c.isprintable() else
                   (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}") for c in escaped)
