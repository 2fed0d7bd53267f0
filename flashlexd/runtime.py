"""The settings every part of the running supervisor reads, as one immutable value.

The supervisor builds a `Runtime` from the validated config at start and builds a new one on
SIGHUP; it swaps the reference and nothing else: the API methods, the API server and the worker
state machines read their settings through it on every use, so a reload cannot leave one of them
stale and nobody patches another object's fields.

Not in here, because they cannot change without a restart: the API socket's path, group and
allowed uids (the socket is bound once). What the workers run is the config text they are
started with; `worker_settings` says which parts restart which worker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

from flashlexd import fds
from flashlexd.config import Config
from flashlexd.configconsumers import ConsumerSettings
from flashlexd.ipc.protocol import REQUEST_OVERHEAD, Limits
from flashlexd.quotas import TOPIC_SLASHES, is_aws_endpoint
from flashlexd.restart import RestartLimits


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiRules:
    """What the API methods enforce and default to."""
    egress_topic: str
    offline_publish_queueing: int
    max_payload_bytes: int  # inbound (flashlex.app.db.maxPayloadBytes): sizes responses
    max_topic_bytes: int    # outbound: what `publish` accepts
    max_publish_bytes: int
    max_topic_slashes: Optional[int] = None  # AWS IoT Core's limit, on its endpoints only
    consumers: ConsumerSettings = ConsumerSettings()  # flashlex.app.consumers and friends
    write_window: float = 0.0  # seconds an `ack`/`publish` waits to share a commit (apiCommitMs)

    @property
    def response_budget(self) -> int:
        return REQUEST_OVERHEAD + self.max_payload_bytes

    @classmethod
    def from_config(cls, config: Config) -> "ApiRules":
        mqtt = config.thing.mqtt
        return cls(mqtt.egress_topic, mqtt.offline_publish_queueing, config.store.max_payload_bytes,
                   mqtt.max_topic_bytes, mqtt.max_payload_bytes,
                   TOPIC_SLASHES if is_aws_endpoint(config.thing.endpoint) else None,
                   config.consumers, config.store.api_commit_ms / 1000)


def api_limits(config: Config) -> Limits:
    """The API server's bounds. Requests carry outbound payloads, responses inbound ones: frames
    fit the larger. The connection cap stays `fds.RESERVED_FDS` below the open files limit."""
    api = config.api
    cap = fds.connection_cap(api.max_connections)
    if cap < api.max_connections:
        log.warning("API: at most %d connections (flashlex.app.socket.maxConnections is %d, but"
                    " the open files limit leaves room for %d; raise LimitNOFILE=)",
                    cap, api.max_connections, cap)
    largest = max(config.store.max_payload_bytes, config.thing.mqtt.max_payload_bytes)
    return Limits.for_payload(largest, max_connections=cap, idle_timeout=api.idle_timeout,
                              max_buffered=api.max_buffered_bytes, frame_timeout=api.frame_timeout)


@dataclass(frozen=True)
class Runtime:
    config: Config
    restart: RestartLimits
    api_limits: Limits
    rules: ApiRules

    @classmethod
    def from_config(cls, config: Config) -> "Runtime":
        return cls(config, RestartLimits.from_config(config.supervision), api_limits(config),
                   ApiRules.from_config(config))

    def socket_changed(self, other: "Runtime") -> bool:
        """The settings of the bound socket differ: they take effect at the next restart."""
        return _socket(self.config) != _socket(other.config)


def _socket(config: Config) -> Tuple[object, ...]:
    return (config.api.socket_path, config.api.socket_group, config.api.allow_uids)


def worker_settings(config: Config, name: str) -> tuple:
    """The parts of the config a worker depends on: a reload restarts it when they change."""
    shared = (config.store, config.supervision, config.log_level)
    return shared if name == "expiry" else shared + (config.thing, config.key_stamp)
