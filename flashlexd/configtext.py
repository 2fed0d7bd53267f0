"""The config file as text and as YAML, read defensively: a size limit and no anchors.

The FlashLex format is a few KB of plain mappings. Anything over MAX_CONFIG_BYTES is a mistake
or an attack, and so is a YAML anchor or alias: refused while the document is composed, before
an alias bomb can expand.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Dict, Tuple

import yaml

MAX_CONFIG_BYTES = 1024 * 1024  # the SDK's configs are ~2 KB; more is a mistake or an attack


class ConfigError(ValueError):
    """A config problem, worded as one line that starts with the key path."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases as they are composed, before anything is
    expanded: the FlashLex format has none, and a 1.6 KB "billion laughs" of nested aliases
    otherwise grows to gigabytes (MemoryError after ~40 s)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML {kind}{event.anchor[:40]}"
                              f" is not allowed (FlashLex configs use no anchors or aliases)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A key given twice is refused: YAML keeps the last one without a word, and a second
        `app:` block appended to a config replaced the whole first one (its data dir: the
        daemon opened a new, empty store)."""
        first: Dict[Tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if key in first:
                    raise ConfigError(f"line {line}: key {key_node.value[:40]!r} is given twice (first"
                                      f" at line {first[key]}); YAML would keep only the last")
                first[key] = line
        return super().construct_mapping(node, deep)


def read_config_text(path: str) -> str:
    """The file's text, never reading more than the limit (a 20 MiB file is not read whole)."""
    try:
        # O_NONBLOCK: a FIFO (or a device) in the file's place must not block the open, which
        # would freeze the supervisor's loop at a reload; only a regular file is a config
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{path}: not a regular file")
            data = file.read(MAX_CONFIG_BYTES + 1)
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        if exc.start < MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {exc.start})") from None
        text = data.decode("utf-8", "replace")  # cut inside a character: over the limit anyway
    return text


def parse_yaml(text: str, path: str) -> Any:
    """The YAML document in `text` (from `path`), or ConfigError in one line."""
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is over the limit of {MAX_CONFIG_BYTES} bytes (1 MiB)")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
