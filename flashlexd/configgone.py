"""The keys a reload finds gone from the config file: each one then takes its default.

A file saved half-written (an editor, a copy cut short) that is still valid YAML loaded as a
config of its own: a `port` cut off fell back to 8883 and both links went down, the reload
saying nothing (found by review). A reload applies it all the same (removing a key is a way to
ask for its default), but names each key that went, with the value that now applies.
"""
from __future__ import annotations

from typing import AbstractSet, Any, Iterator, List

from flashlexd.configkeys import ALIASES, KEYS, LEGACY_KEYS
from flashlexd.configtext import ConfigError, parse_yaml


def keys_gone(running_text: str, new_text: str, path: str, overridden: AbstractSet[str] = frozenset()) -> List[str]:
    """One line per config key set in `running_text` and not in `new_text` (both YAML), but
    for those a command-line option sets (`overridden`) or the new text sets by another name
    (ALIASES): their value did not go (found by re-read)."""
    try:
        before, after = set(_key_paths(parse_yaml(running_text, path))), set(_key_paths(parse_yaml(new_text, path)))
    except ConfigError:  # the new text loaded before this is called; the running one did at its load
        return []
    gone = before - after - LEGACY_KEYS - overridden
    return [f"{key}: gone from {path} since the running config, so its default{_shown(key)} applies"
            " now (was the file saved whole?)" for key in sorted(gone) if ALIASES.get(key) not in after]


def _key_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """The dotted paths in `node` that name config keys (an app's own sections are not ours)."""
    if not isinstance(node, dict):
        return
    for name, value in node.items():
        path = f"{prefix}{name}"
        if path in KEYS:
            yield path
        elif isinstance(value, dict):
            yield from _key_paths(value, path + ".")


def _shown(key: str) -> str:
    """" (8883)": the default as the README's table shows it, when it shows one."""
    text = KEYS[key].default_text
    return f" ({text})" if text else ""
