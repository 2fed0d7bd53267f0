"""flashlex.app.consumers and its companions: read into ConsumerSpecs, each mistake one line
naming the key."""
from __future__ import annotations

import pytest

from flashlexd.config import ConfigError, load
from flashlexd.consumers import ConsumerSpec
from tests.test_config_keys import config_with


def test_declared_consumers_are_read(tmp_path):
    config = load(str(config_with(tmp_path, {
        "flashlex.app.consumers": {"display": {"filter": "sensors/+/t", "maxBacklog": 50,
                                               "allowUids": [1000, 1001]}, "logger": None},
        "flashlex.app.allowDynamicConsumers": False, "flashlex.app.consumerIdleDays": 2})))
    settings = config.consumers
    assert settings.declared == (ConsumerSpec("display", "sensors/+/t", 50, frozenset({1000, 1001})),
                                 ConsumerSpec("logger"))
    assert settings.allow_dynamic is False and settings.idle_seconds == 2 * 86400
    assert settings.spec("logger") == ConsumerSpec("logger") and settings.spec("x") is None


def test_defaults_without_the_section(tmp_path):
    settings = load(str(config_with(tmp_path, {}))).consumers
    assert settings.declared == () and settings.allow_dynamic and settings.idle_seconds == 7 * 86400


@pytest.mark.parametrize("consumers,message", [
    ({"Display": {}}, "flashlex.app.consumers: 'Display' is not a consumer name"),
    ({1: {}}, "flashlex.app.consumers: 1 is a YAML number, not a consumer name: quote the name as"
              " written (e.g. '1')"),
    ({"d": {"filter": "a/#/b"}}, "flashlex.app.consumers.d.filter: expected an MQTT topic filter"),
    ({"d": {"maxBacklog": 0}}, "flashlex.app.consumers.d.maxBacklog: must be >= 1"),
    ({"d": {"allowUids": "root"}}, "flashlex.app.consumers.d.allowUids: expected a list"),
    ({"d": []}, "flashlex.app.consumers.d: expected a mapping"),
    ({f"c{i}": None for i in range(65)}, "flashlex.app.consumers: 65 consumers declared, at most 64"),
])
def test_a_mistake_is_one_line_naming_the_key(tmp_path, consumers, message):
    with pytest.raises(ConfigError) as info:
        load(str(config_with(tmp_path, {"flashlex.app.consumers": consumers})))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_an_unknown_consumer_key_is_warned_about(tmp_path):
    config = load(str(config_with(tmp_path, {"flashlex.app.consumers": {"d": {"fliter": "x"}}})))
    assert "flashlex.app.consumers.d.fliter: unknown key, ignored" in config.warnings
