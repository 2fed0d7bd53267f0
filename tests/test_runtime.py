"""What a reload does with each key, as the config table's "on reload" column says: a key that
applies at once changes the `Runtime` the API reads; one that restarts workers changes those
workers' settings (and no other's); one that waits for the next start changes only the socket.
Driven by `configkeys.TABLE`, so a new key is checked as soon as it has an entry."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flashlexd.config import load
from flashlexd.configkeys import (AT_ONCE, AT_ONCE_AND_WORKERS, LINKS, LINKS_AND_API, NEXT_START,
                                  REFUSED, TABLE, WORKERS, Key)
from flashlexd.runtime import ApiRules, Runtime, worker_settings
from tests.test_config_keys import config_with

CHANGED = {  # a valid value other than the seed's or the default, where a rule is needed
    "flashlex.app.socket.maxConnections": 100, "flashlex.app.socket.maxBufferedBytes": 16777216,
    "flashlex.app.db.maxPayloadBytes": 1000, "flashlex.app.db.dataPath": "/tmp/elsewhere",
    "flashlex.app.db.expireSeconds": 120, "flashlex.app.logLevel": "debug",
    "flashlex.app.db.whenFull": "dropOldest", "flashlex.app.socket.group": "other",
    "flashlex.app.socket.path": "/tmp/other.sock", "flashlex.app.socket.allowUids": [1000],
    "flashlex.thing.mqtt.maxTopicBytes": 128, "flashlex.thing.mqtt.maxPayloadBytes": 1000,
    "flashlex.thing.mqtt.egress.topic": "other/out", "flashlex.thing.mqtt.ingress.topic": "other/in",
    "flashlex.thing.mqtt.pubsub.topic": "other/pubsub", "flashlex.thing.mqtt.subscriptions": ["x/#"],
    "flashlex.thing.mqtt.clientId": "other-in", "flashlex.thing.mqtt.egressClientId": "other-out",
    "flashlex.thing.mqtt.keepalive": 60, "flashlex.thing.mqtt.drainingFrequency": 3,
    "flashlex.thing.mqtt.publishRatePerSecond": 50, "flashlex.thing.mqtt.useWebsocket": True,
    "flashlex.thing.name": "other-thing", "flashlex.thing.endpoint": "other.example.com",
    "flashlex.app.db.dedupe.key": "json:id", "flashlex.thing.mqtt.protocol": "3.1.1",
    "flashlex.app.consumers": {"display": {"filter": "sensors/#"}}, "flashlex.app.allowDynamicConsumers": False,
    "flashlex.app.thread": "other",  # the seed's `subscribe` subscribed the ingress topic alone
    "flashlex.app.dynamicMaxBacklog": 1000,
}
COMPANIONS = {  # keys that mean something only beside another: set in the old and new config
    "flashlex.app.db.dedupe.windowSeconds": {"flashlex.app.db.dedupe.key": "json:id"},
}
CHECKED = [key for key in TABLE if key.reload and ".keys." not in key.path]  # key files: credentials


def changed_value(key: Key) -> Any:
    if key.path in CHANGED:
        return CHANGED[key.path]
    assert isinstance(key.default, (int, float)) and not isinstance(key.default, bool), key.path
    return key.default + 1


@pytest.mark.parametrize("key", CHECKED, ids=lambda k: k.path)
def test_a_reload_applies_each_key_as_the_table_says(tmp_path: Path, key: Key) -> None:
    companions = COMPANIONS.get(key.path, {})
    old = load(str(config_with(tmp_path, dict(companions), "old.yml")))
    new = load(str(config_with(tmp_path, dict(companions, **{key.path: changed_value(key)}), "new.yml")))
    if key.reload == REFUSED:  # the supervisor refuses the reload (Supervisor._usable)
        assert new.store.data_dir != old.store.data_dir
        return
    before, after = Runtime.from_config(old), Runtime.from_config(new)
    api_changed = (before.api_limits, before.rules) != (after.api_limits, after.rules)
    restarted = {name for name in ("ingress", "egress", "expiry")
                 if worker_settings(old, name) != worker_settings(new, name)}
    expected = {WORKERS: (False, {"ingress", "egress", "expiry"}),
                AT_ONCE_AND_WORKERS: (True, {"ingress", "egress", "expiry"}),
                LINKS: (False, {"ingress", "egress"}), LINKS_AND_API: (True, {"ingress", "egress"}),
                AT_ONCE: (True, set()), NEXT_START: (False, set())}[key.reload]
    assert (api_changed, restarted) == expected
    assert after.socket_changed(before) == (key.reload == NEXT_START)


def test_restart_limits_follow_the_supervisor_keys(tmp_path: Path) -> None:
    new = load(str(config_with(tmp_path, {"flashlex.app.supervisor.crashLoopRestarts": 9,
                                          "flashlex.app.supervisor.restartBackoffMaxSeconds": 4})))
    limits = Runtime.from_config(new).restart
    assert (limits.limit, limits.max_delay) == (9, 4.0)


def test_publish_refuses_aws_iot_cores_topic_levels_on_its_endpoints_only(tmp_path: Path) -> None:
    aws = load(str(config_with(tmp_path, {"flashlex.thing.endpoint": "abc-ats.iot.us-east-1.amazonaws.com"},
                               "aws.yml")))
    other = load(str(config_with(tmp_path, {"flashlex.thing.endpoint": "broker.example.com"}, "other.yml")))
    assert ApiRules.from_config(aws).max_topic_slashes == 7
    assert ApiRules.from_config(other).max_topic_slashes is None
