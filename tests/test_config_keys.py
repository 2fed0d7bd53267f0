"""The one table of config keys (flashlexd/configkeys.py): the README's table is generated from
it, and the parser reads every key by it (type, bounds, one line naming the path)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from flashlexd.config import ConfigError, load
from flashlexd.configkeys import KEYS, TABLE, readme_section, readme_table
from tests.test_config import make_keys, seed_bytes

ROOT = Path(__file__).resolve().parent.parent
READ = [key for key in TABLE if key.kind not in ("legacy",)]
WRONG_TYPE = {"integer": "abc", "seconds": "soon", "boolean": "yes", "choice": "nope", "text": 5,
              "texts": "x", "uids": ["a"], "rate": "fast", "consumers": "x"}
SET_BY_THE_SEED = {
    "flashlex.thing.name", "flashlex.thing.endpoint", "flashlex.thing.keys.rootCA",
    "flashlex.thing.keys.cert", "flashlex.thing.keys.privateKey", "flashlex.thing.keys.publicKey",
    "flashlex.thing.mqtt.ingress.topic", "flashlex.thing.mqtt.pubsub.topic",
    "flashlex.thing.mqtt.egress.topic", "flashlex.thing.mqtt.drainingFrequency",
    "flashlex.app.db.expireSeconds"}
EVERY_KEY_SET = {  # a valid value for each key that has no default in the seed
    "flashlex.app.socket.group": "flashlexd", "flashlex.app.socket.maxBufferedBytes": 16777216,
    "flashlex.thing.mqtt.clientId": "thing-in", "flashlex.thing.mqtt.egressClientId": "thing-out",
    "flashlex.thing.mqtt.keepalive": 60, "flashlex.thing.mqtt.publishRatePerSecond": 50,
    "flashlex.thing.mqtt.subscriptions": ["extra/#"], "flashlex.app.socket.allowUids": [1000],
    "flashlex.app.db.dedupe.key": "json:id",
    "flashlex.app.consumers": {"display": {"filter": "sensors/#", "maxBacklog": 10, "allowUids": [1000]}},
    "flashlex.app.dynamicMaxBacklog": 100000,
}


def config_with(tmp_path: Path, values: Dict[str, Any], name: str = "flashlexd.yml") -> Path:
    document = yaml.safe_load(seed_bytes())
    for dotted, value in values.items():
        *parents, last = dotted.split(".")
        node = document
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    make_keys(tmp_path)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_the_readme_table_is_generated_from_the_code_table():
    """Run `python -m flashlexd.configkeys README.md` after changing a key."""
    assert readme_section((ROOT / "README.md").read_text()) == readme_table()


def test_every_key_of_the_table_is_read_and_none_is_unknown(tmp_path):
    """Every key set at once (its default, or a valid value): none is warned about as unknown."""
    values = {key.path: key.default for key in READ
              if isinstance(key.default, (int, float, str)) and key.path not in SET_BY_THE_SEED}
    values.update(EVERY_KEY_SET)
    assert {key.path for key in READ} == set(values) | SET_BY_THE_SEED
    config = load(str(config_with(tmp_path, values)))
    assert not [w for w in config.warnings if "unknown key" in w], config.warnings
    assert config.api.max_buffered_bytes == 16777216 and config.api.allow_uids == (1000,)
    assert config.consumers.dynamic_max_backlog == 100000


@pytest.mark.parametrize("key", [k for k in READ if k.kind in WRONG_TYPE], ids=lambda k: k.path)
def test_a_value_of_the_wrong_type_is_one_line_naming_the_key(tmp_path, key):
    with pytest.raises(ConfigError) as info:
        load(str(config_with(tmp_path, {key.path: WRONG_TYPE[key.kind]})))
    assert str(info.value).startswith(f"{key.path}: expected "), str(info.value)
    assert "\n" not in str(info.value)


BOUNDS = [(k, k.minimum - 1, f"must be >= {k.minimum:g}") for k in READ
          if k.kind == "integer" and k.minimum is not None] + \
         [(k, k.maximum + 1, f"must be <= {k.maximum}") for k in READ if k.maximum is not None] + \
         [(k, 0, "must be greater than 0") for k in READ if k.kind == "seconds"]


@pytest.mark.parametrize("key,value,message", BOUNDS, ids=lambda v: getattr(v, "path", str(v)))
def test_a_value_out_of_bounds_is_refused_as_the_table_says(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as info:
        load(str(config_with(tmp_path, {key.path: value})))
    assert str(info.value).startswith(f"{key.path}: {message}"), str(info.value)


def test_every_entry_has_a_doc_and_a_known_kind():
    kinds = set(WRONG_TYPE) | {"legacy"}
    assert all(key.doc and key.kind in kinds for key in TABLE)
    assert len(KEYS) == len(TABLE)  # no path twice
