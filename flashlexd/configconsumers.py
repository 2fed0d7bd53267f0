"""flashlex.app.consumers, allowDynamicConsumers, consumerIdleDays and dynamicMaxBacklog: the named consumers the
config declares (flashlexd/consumers.py), read into one frozen value."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from flashlexd.configsection import Section, _show
from flashlexd.configtext import ConfigError
from flashlexd.consumers import MAX_CONSUMERS, ConsumerSpec
from flashlexd.wire import CONSUMER_NAME_RULE, valid_consumer_name
from flashlexd.topics import valid_filter

_DAY = 86400.0


@dataclass(frozen=True)
class ConsumerSettings:
    declared: Tuple[ConsumerSpec, ...] = ()
    allow_dynamic: bool = True
    idle_seconds: float = 7 * _DAY
    dynamic_max_backlog: Optional[int] = None

    def spec(self, name: str) -> Optional[ConsumerSpec]:
        return next((spec for spec in self.declared if spec.name == name), None)


def consumer_settings(app: Section) -> ConsumerSettings:
    section = app.section("consumers")
    if len(section.data) > MAX_CONSUMERS:
        raise ConfigError(f"{section.path}: {len(section.data)} consumers declared, at most {MAX_CONSUMERS}")
    declared = tuple(_consumer(section, name) for name in section.data)
    return ConsumerSettings(declared, app.value("allowDynamicConsumers"),
                            app.value("consumerIdleDays") * _DAY, app.value("dynamicMaxBacklog"))


def _consumer(consumers: Section, name: object) -> ConsumerSpec:
    if isinstance(name, int) and not isinstance(name, bool):  # `1:`; `010:` is 8 to YAML
        raise ConfigError(f"{consumers.path}: {name} is a YAML number, not a consumer name: quote"
                          f" the name as written (e.g. '1')")
    if not valid_consumer_name(name):
        raise ConfigError(f"{consumers.path}: {_show(name)} is not {CONSUMER_NAME_RULE}")
    section = consumers.section(str(name))
    topic_filter = section.text("filter", "#")
    if not valid_filter(topic_filter):  # type: ignore[arg-type]
        raise ConfigError(f"{section.path}.filter: expected an MQTT topic filter, got {_show(topic_filter)}")
    spec = ConsumerSpec(str(name), topic_filter, section.integer("maxBacklog", None, minimum=1),  # type: ignore[arg-type]
                        frozenset(section.uids("allowUids")))
    section.warn_unknown()
    return spec
