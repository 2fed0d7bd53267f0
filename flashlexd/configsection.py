"""Typed reads of one mapping of the config YAML, remembering its key path and the keys used.

`Section.value(name)` reads a key as its `configkeys.TABLE` entry describes it; the typed
readers below are what it uses. Every problem is a `ConfigError` naming the key's path.
"""
from __future__ import annotations

import math
import re
from typing import Any, List, Optional, Tuple, Type, TypeVar

from flashlexd.configkeys import KEYS, LEGACY_KEYS, REQUIRED, TABLE, Key
from flashlexd.configtext import ConfigError

T = TypeVar("T")
MAX_INTEGER = 2 ** 63 - 1  # what msgpack and the C APIs (sizes, counts) take
MAX_TEXT_BYTES = 65535  # an MQTT string's limit (client ids, topics); no path or name is longer
MAX_UID = 2 ** 32 - 2  # uid_t's largest; 2**32 - 1 is (uid_t)-1, no one's


class Section:
    """Typed access to one mapping of the YAML, remembering its key path and the keys used."""

    def __init__(self, data: Any, path: str, warnings: List[str]):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(data)}")
        self.data, self.path, self.warnings = data, path, warnings
        self.used: set = set()

    def value(self, name: str) -> Any:
        """Key `name` of this section, read as its `configkeys.TABLE` entry says: type, bounds,
        default (or required), each problem one line naming the key's path."""
        key = KEYS[self._key(name)]
        required = key.default is REQUIRED
        default = None if required else key.default
        if key.kind == "text":
            return self.text(name, default, required=required)
        if key.kind == "integer":
            return _at_most(key, self.integer(name, default, minimum=key.minimum,  # type: ignore[arg-type]
                                              required=required))
        if key.kind == "seconds":
            return _at_most(key, _at_least(key, self.seconds(name, default)))
        if key.kind == "boolean":
            return self.boolean(name, default)
        if key.kind == "choice":
            return self.choice(name, key.choices, default)
        if key.kind == "texts":
            return self.text_list(name)
        if key.kind == "uids":
            return self.uids(name)
        if key.kind == "rate":
            return self.rate(name, allow_zero=key.minimum == 0)
        raise AssertionError(f"{key.path}: kind {key.kind} is not read by value()")

    def fill(self, cls: Type[T], **given: Any) -> T:
        """`cls` (a config dataclass) from every key of this section whose table entry names a
        `field`, plus the fields `given` (those computed from several keys or the command line)."""
        prefix = f"{self.path}."
        values = {key.field: self.value(key.path[len(prefix):]) for key in TABLE
                  if key.field and key.path.startswith(prefix) and "." not in key.path[len(prefix):]}
        return cls(**values, **given)

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}"

    def _raw(self, key: str, required: bool) -> Any:
        self.used.add(key)
        value, path = self.data.get(key), self._key(key)
        if value is None and required:
            raise ConfigError(f"{path}: missing required key")
        if value is None and key in self.data and path not in LEGACY_KEYS and \
                getattr(KEYS.get(path), "default", None) is not None:  # `port:`: a value left out?
            self.warnings.append(f"{path}: empty, so its default is used")
        return value

    def section(self, key: str, required: bool = False) -> "Section":
        return Section(self._raw(key, required), self._key(key), self.warnings)

    def text(self, key: str, default: Optional[str] = None, required: bool = False) -> Optional[str]:
        value = self._raw(key, required and default is None)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self._key(key)}: expected a non-empty string, got {_show(value)}")
        problem = _text_problem(value)
        if problem:
            raise ConfigError(f"{self._key(key)}: {problem}: {_show(value)}")
        return value.strip()

    def integer(self, key: str, default: Optional[int] = None, minimum: Optional[int] = None,
                required: bool = False) -> int:
        value = self._raw(key, required and default is None)
        if value is None:
            return default  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._key(key)}: expected an integer, got {_show(value)}"
                              f"{_exponent_hint(value, integer=True)}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._key(key)}: must be >= {minimum}, got {value}")
        if value > MAX_INTEGER:  # the API, the links and the store carry values as 64-bit msgpack
            raise ConfigError(f"{self._key(key)}: must be <= {MAX_INTEGER}, got {value}")
        return value

    def seconds(self, key: str, default: Optional[float] = None) -> Optional[float]:
        """A positive duration: zero or negative intervals made the old SDK spin or crash."""
        value = self._raw(key, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self._key(key)}: expected a number of seconds, got {_show(value)}"
                              f"{_exponent_hint(value)}")
        if value <= 0:
            raise ConfigError(f"{self._key(key)}: must be greater than 0, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected true or false, got {_show(value)}")
        return value

    def choice(self, key: str, choices: Tuple[str, ...], default: str) -> str:
        """One of `choices`; any other value, of any type (`protocol: 4`), is refused naming
        them all: the fix is to pick one, not to write a string."""
        raw = self._raw(key, False)
        if raw is None:
            return default
        value = _choice_text(raw)
        if value not in choices:
            raise ConfigError(f"{self._key(key)}: expected one of {', '.join(choices)}, got {_show(raw)}")
        return value  # type: ignore[return-value]

    def text_list(self, key: str) -> Tuple[str, ...]:
        value = self._raw(key, False)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of strings, got {_show(value)}")
        for item in value:
            problem = _text_problem(item)
            if problem:
                raise ConfigError(f"{self._key(key)}: an item {problem}: {_show(item)}")
        return tuple(v.strip() for v in value)

    def uids(self, key: str) -> Tuple[int, ...]:
        value = self._raw(key, False) or []
        if not isinstance(value, list) or not all(isinstance(u, int) and not isinstance(u, bool)
                                                  for u in value):
            raise ConfigError(f"{self._key(key)}: expected a list of numeric uids, got {_show(value)}")
        wrong = [u for u in value if not 0 <= u <= MAX_UID]
        if wrong:  # -1 is (uid_t)-1, "no change" to chown: no peer ever has it
            raise ConfigError(f"{self._key(key)}: a uid is 0 to {MAX_UID}, got {wrong[0]}")
        return tuple(value)

    def rate(self, key: str, allow_zero: bool) -> Optional[float]:
        """A number per second (None when absent); 0 only when `allow_zero` (0: unlimited)."""
        value = self._raw(key, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self._key(key)}: expected a number per second, got {_show(value)}"
                              f"{_exponent_hint(value)}")
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0 (0: unlimited)" if allow_zero else "greater than 0"
            raise ConfigError(f"{self._key(key)}: must be {bound}, got {value}")
        return float(value)

    def warn_unknown(self) -> None:
        for key in self.data:
            if key not in self.used and self._key(str(key)) not in LEGACY_KEYS:
                self.warnings.append(f"{self._key(str(key))}: unknown key, ignored")


def _at_least(key: Key, value: Any) -> Any:
    """`value`, unless it is under the key's minimum (a duration so short it only burns CPU,
    or makes a healthy worker look hung)."""
    if key.minimum is not None and value is not None and value < key.minimum:
        raise ConfigError(f"{key.path}: must be >= {key.minimum:g}{key.minimum_why}, got {value:g}")
    return value


def _at_most(key: Key, value: Any) -> Any:
    """`value`, unless it passes the key's maximum (a limit of the protocol, the store, the unit)."""
    if key.maximum is not None and value is not None and value > key.maximum:
        shown = f"{value:g}" if isinstance(value, float) else value  # seconds: 86400, not 86400.0
        raise ConfigError(f"{key.path}: must be <= {key.maximum}{key.maximum_why}, got {shown}")
    return value


def _choice_text(raw: Any) -> Optional[str]:
    """A choice as written: a string stripped, an integer as its digits (`protocol: 5` is a
    YAML number); None for anything else."""
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return None


def _text_problem(value: str) -> Optional[str]:
    """Why a text value cannot be used, or None. No path, topic or name holds a NUL (os calls
    raise ValueError on it); one with a lone surrogate (a YAML "\\ud800") has no UTF-8, and one
    over MAX_TEXT_BYTES fits in no MQTT string: the workers died on them in a loop of tracebacks."""
    if "\0" in value:
        return "contains U+0000 (NUL)"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (a lone surrogate)"
    return f"is {size} bytes, over {MAX_TEXT_BYTES}" if size > MAX_TEXT_BYTES else None


def _exponent_hint(value: Any, integer: bool = False) -> str:
    """YAML 1.1 (PyYAML) reads `1e6` and `2.5e3` as text: a float's exponent needs a dot and a
    sign (`1.0e+6`). Said, since the value looks like a number to whoever wrote it; an integer
    key takes no float at all: the number in full."""
    if not (isinstance(value, str) and _EXPONENT.fullmatch(value.strip())):
        return ""
    if integer:
        return " (YAML reads an exponent as text: write the number in full)"
    return " (YAML reads an exponent without a dot and a sign as text: write 1.0e+6, or the number in full)"


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
