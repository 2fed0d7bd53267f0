"""The FlashLex YAML config, read unchanged, as frozen typed objects.

The file format is the FlashLex SDK 1.4 one (`flashlex.app`, `flashlex.thing`, `flashlex.dist`).
Every problem is a `ConfigError` whose message names the key path, so `flashlexd` can print one
line and exit 2 instead of dying later on a bad value (the old SDK divided by
`drainingFrequency` and spin-looped on `expireSeconds <= 0`).
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, List, Optional, Tuple

from flashlexd.configconsumers import ConsumerSettings, consumer_settings
from flashlexd.configkeys import DEFAULT_DATA_DIR, KEYS, LOG_LEVELS
from flashlexd.configsection import Section, _show
from flashlexd.configtext import ConfigError, parse_yaml, read_config_text
from flashlexd.dedupe import DedupeKey
from flashlexd.mqttv5 import MQTT_STRING_BYTES
from flashlexd.quotas import (TOPIC_SLASHES, aws_keepalive, aws_transport, client_id_problem, is_aws_endpoint,
                              quota_warnings)
from flashlexd.topics import publish_topic_problem, valid_filter
from flashlexd.wire import DEFAULT_SOCKET, REQUEST_OVERHEAD

__all__ = ["Api", "ReconnectPolicy", "Config", "ConfigError", "DEFAULT_DATA_DIR", "DEFAULT_SOCKET", "Keys",
           "LOG_LEVELS", "Mqtt", "StoreSettings", "Supervision", "Thing", "load", "loads", "parse"]


@dataclass(frozen=True)
class Keys:
    root_ca: Path
    cert: Path
    private_key: Path


@dataclass(frozen=True)
class ReconnectPolicy:
    base_seconds: float
    max_seconds: float
    stable_seconds: float


@dataclass(frozen=True)
class Mqtt:
    port: int
    use_websocket: bool
    ingress_topic: str
    pubsub_topic: Optional[str]
    egress_topic: str
    subscriptions: Tuple[str, ...]
    keepalive: int
    client_id: str
    egress_client_id: str
    backoff: ReconnectPolicy
    offline_publish_queueing: int
    connect_timeout: float
    operation_timeout: float
    max_inflight: int
    publish_rate: float        # publishes per second, 0 = unlimited
    publish_bytes_rate: int    # payload + topic bytes per second, 0 = unlimited
    backlog_rate: Optional[float]  # `drainingFrequency`: the rate of a backlog queued while offline
    poison_attempts: int
    max_topic_bytes: int     # outbound: `publish` refuses longer topics (AWS IoT's limit)
    max_payload_bytes: int   # outbound: `publish` refuses larger payloads (inbound: StoreSettings')
    protocol: str = "auto"     # "5", "3.1.1" or "auto" (5, falling back to 3.1.1)
    session_expiry: int = 3600  # MQTT 5 Session Expiry Interval, seconds
    # the FlashLex SDK's `app.thread: subscribe` (the seed config's) subscribed to the ingress
    # topic alone; the pubsub topic was its `basicPubsub` demo's
    subscribes_pubsub: bool = True

    def ingress_topics(self) -> Tuple[str, ...]:
        """Every topic filter the ingress worker subscribes to, without repeats, in order."""
        topics = [self.ingress_topic, self.pubsub_topic if self.subscribes_pubsub else None, *self.subscriptions]
        return tuple(dict.fromkeys(t for t in topics if t))


@dataclass(frozen=True)
class Thing:
    name: str
    endpoint: str
    keys: Keys
    mqtt: Mqtt

    @property
    def broker_identity(self) -> str:
        """Which broker a session, its DUP marks and a protocol fallback are of: the endpoint's
        host lower-cased, without a trailing dot, an AWS IoT endpoint's `-ats` label suffix
        folded (`abc-ats.iot.REGION.amazonaws.com`, the ATS endpoint, and `abc.iot.REGION...`,
        the legacy one, reach one account's broker). Not the port: the listeners of one broker
        share its sessions (8883 and 443, or `useWebsocket`, reach the same one), and taking a
        port change for a move dropped the marks of a session that was resumed (a message
        resent DUP then stored twice). Names are not resolved: one broker reached under two
        host names counts as a move (its marks dropped: a duplicate at worst, never a loss)."""
        host = self.endpoint.lower().rstrip(".")
        return _AWS_ATS.sub(r"\1\2", host)


_AWS_ATS = re.compile(r"^([^.]+)-ats(\.iot\.[^.]+\.amazonaws\.com(?:\.cn)?)$")


@dataclass(frozen=True)
class StoreSettings:
    """flashlex.app.db: how the store is opened (not the store itself: `store.Store`)."""
    data_dir: Path
    cap_bytes: int
    when_full: str
    expire_seconds: Optional[float]
    sweep_seconds: float
    max_payload_bytes: int
    ingest_commit_ms: int = 0  # flashlex.app.db.ingestCommitMs (the table holds the default)
    ingest_commit_batch: int = 8  # flashlex.app.db.ingestCommitBatch
    api_commit_ms: int = 0     # flashlex.app.db.apiCommitMs
    dedupe: Optional[DedupeKey] = None  # flashlex.app.db.dedupe: off unless configured


@dataclass(frozen=True)
class Api:
    socket_path: str
    socket_group: Optional[str]
    allow_uids: Tuple[int, ...]
    max_connections: int
    idle_timeout: float
    max_buffered_bytes: Optional[int]  # None: the default sized from maxPayloadBytes
    frame_timeout: float


@dataclass(frozen=True)
class Supervision:
    heartbeat_seconds: float
    heartbeat_timeout: float
    stop_timeout: float
    backoff_max_seconds: float
    crash_loop_restarts: int
    crash_loop_window: float


@dataclass(frozen=True)
class Config:
    path: Path
    thing: Thing
    store: StoreSettings
    api: Api
    supervision: Supervision
    log_level: str
    consumers: ConsumerSettings = ConsumerSettings()
    warnings: Tuple[str, ...] = field(default=(), compare=False)
    text: str = field(default="", compare=False, repr=False)
    # the key files' contents as the supervisor checked them (credentials.stamp): a reload that
    # finds them rotated in place restarts the links, which read them at their start
    key_stamp: str = field(default="", compare=False, repr=False)


def load(path: str, data_dir: Optional[str] = None, keys_dir: Optional[str] = None,
         socket_path: Optional[str] = None, log_level: Optional[str] = None) -> Config:
    """Read and validate the config file; command-line overrides win over the file."""
    config_path = Path(path)
    text = read_config_text(path)
    return loads(text, config_path, data_dir=data_dir, keys_dir=keys_dir,
                 socket_path=socket_path, log_level=log_level)


def loads(text: str, config_path: Path, data_dir: Optional[str] = None,
          keys_dir: Optional[str] = None, socket_path: Optional[str] = None,
          log_level: Optional[str] = None, validated: bool = False) -> Config:
    """Validate config text read earlier: workers get the text the supervisor validated, so a
    file edited without a reload never reaches a restarted worker. `validated`: that text, whose
    key files are not looked at again (see `_keys`)."""
    document = parse_yaml(text, str(config_path))
    return parse(document, config_path, text, data_dir=data_dir, keys_dir=keys_dir,
                 socket_path=socket_path, log_level=log_level, validated=validated)


def parse(document: Any, config_path: Path, text: str = "", data_dir: Optional[str] = None,
          keys_dir: Optional[str] = None, socket_path: Optional[str] = None,
          log_level: Optional[str] = None, validated: bool = False) -> Config:
    warnings: List[str] = []
    if not isinstance(document, dict) or "flashlex" not in document:
        raise ConfigError("flashlex: missing required key (is this a FlashLex config file?)")
    for key in document:  # an app's own sections (the old SDK ignored them); `flashlex` is strict
        if key != "flashlex":
            warnings.append(f"{key}: unknown top-level section, ignored")
    root = Section(document["flashlex"], "flashlex", warnings)
    for key in root.data:
        if key not in ("app", "thing", "dist"):
            raise ConfigError(f"flashlex.{key}: unknown section (expected app, thing, dist)")
    app = root.section("app")
    thing_section = root.section("thing", required=True)
    root.section("dist")  # build metadata of the old SDK: accepted, not used

    if keys_dir and os.path.isfile(keys_dir):  # else each key file "missing" under it, as a dir
        raise ConfigError(f"--keys-dir: {keys_dir} is a file, not the directory of the key files")
    keys_base = Path(keys_dir) if keys_dir else config_path.resolve().parent
    thing = _thing(thing_section, keys_base, warnings, "--keys-dir" if keys_dir else
                   "the config file's directory (or use --keys-dir)",
                   None if keys_dir else legacy_keys_dir(config_path), validated)
    if app.data.get("thread") == "subscribe":
        thing = replace(thing, mqtt=replace(thing.mqtt, subscribes_pubsub=False))
    # on the filters the ingress subscribes: `thread: subscribe` leaves the pubsub topic out
    warnings.extend(quota_warnings(thing.endpoint, "flashlex.thing.mqtt", thing.mqtt, thing.name))
    store = _store(app.section("db"), data_dir, warnings)
    api = _api(app.section("socket"), socket_path, store.max_payload_bytes, thing.mqtt.max_payload_bytes)
    supervision = _supervision(app.section("supervisor"))
    consumers = consumer_settings(app)
    file_level = app.value("logLevel")  # checked even when overridden
    level = log_level or file_level
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {_show(level)}")
    app.warn_unknown()
    return Config(path=config_path, text=text, thing=thing, store=store, api=api, supervision=supervision,
                  log_level=level, consumers=consumers,
                  warnings=tuple(warnings))


def trusted_files(config: Config) -> List[Tuple[Path, str]]:
    """The files whoever can change controls the daemon, named as their keys are."""
    keys = config.thing.keys
    return [(config.path, "config"), (keys.root_ca, "rootCA"), (keys.cert, "cert"), (keys.private_key, "privateKey")]


def legacy_keys_dir(config_path: Path) -> Optional[Path]:
    """Where the FlashLex SDK looked for key files without -k, for its unit form
    `DIR/app.py --config DIR/keys/config.yml`: the parent of DIR (app.py's directory's parent).
    flashlexd does not search there on its own (a directory such as /opt or /home/pi may hold
    another thing's keys); a missing key file found there is named with the -k to add."""
    keys = config_path.resolve().parent
    return keys.parent.parent if keys.name == "keys" else None


def _thing(section: Section, keys_base: Path, warnings: List[str], keys_base_name: str,
           legacy_base: Optional[Path], validated: bool) -> Thing:
    name = section.value("name")
    endpoint = _endpoint(section)
    keys = _keys(section.section("keys", required=True), keys_base, keys_base_name, warnings,
                 legacy_base, validated)
    mqtt_path = f"{section.path}.mqtt"
    mqtt = _mqtt(section.section("mqtt", required=True), name, endpoint)  # type: ignore[arg-type]
    mqtt = aws_transport(endpoint, mqtt_path, mqtt, warnings)
    mqtt = aws_keepalive(endpoint, mqtt_path, mqtt, warnings)
    section.warn_unknown()
    return Thing(name=name, endpoint=endpoint, keys=keys, mqtt=mqtt)  # type: ignore[arg-type]


# a DNS label (RFC 1123), `_` included: /etc/hosts and container DNS resolve such names
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _endpoint(section: Section) -> str:
    """The broker's host, as paho resolves it: a URL, a port or a path in it failed only later,
    at DNS in `check` and in an endless reconnect loop in `run`."""
    endpoint = section.value("endpoint")
    if not _is_host(endpoint):
        raise ConfigError(f"{section.path}.endpoint: {_endpoint_hint(endpoint, section.path)}")
    return endpoint


def _is_host(text: str) -> bool:
    """An IPv4/IPv6 literal, or a host name (an internationalised one as its IDNA form has it)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    try:
        name = text.encode("idna").decode("ascii").rstrip(".")  # one root dot is allowed
    except UnicodeError:  # an empty or over-long label
        return False
    labels = name.split(".")
    return (len(name) <= 253 and not labels[-1].isdigit()  # "10.0.0.300" is no name
            and all(_LABEL.fullmatch(label) for label in labels))


def _endpoint_hint(endpoint: str, thing_path: str) -> str:
    """The error for an endpoint that is not a host alone, naming the host in it (and its port,
    for mqtt.port) when there is one to find."""
    scheme, _, rest = endpoint.rpartition("://")
    if "@" in rest:  # user:password@host: never echoed, whatever the password holds (":", "/",
        # "@", digits); an "@" in a path, which no MQTT endpoint has, is taken for one too
        rest = rest.rsplit("@", 1)[1]
        endpoint = f"{scheme}://***@{rest}" if scheme else f"***@{rest}"
    place = rest.split("/", 1)[0]  # no scheme, no path
    got = f"expected a host name or an IP address alone, got {_show(endpoint)}"
    if place.startswith("["):  # [IPv6]:port
        host, _, port = place[1:].partition("]")
    elif place.count(":") == 1:
        host, _, port = place.partition(":")
    else:
        host, port = place, ""
    if not _is_host(host):
        return got
    port = port.lstrip(":")
    then = f" and set {thing_path}.mqtt.port: {port}" if port.isdigit() else ""
    return f"{got}: write {host}{then}"


def _keys(section: Section, base: Path, base_name: str, warnings: List[str],
          legacy_base: Optional[Path], validated: bool) -> Keys:
    """The key files' paths, each checked unless `validated`: a worker parses the text the
    supervisor checked, and a key file missing for a moment (a rotation half done) as it
    started failed it for good, the whole daemon down after five (review "reload"); the TLS
    context's build, which keeps the credentials loaded before, is where that is dealt with."""
    def key_file(key: str) -> Path:
        name = section.value(key)
        if "-----BEGIN" in name or "\n" in name:  # type: ignore[operator]
            raise ConfigError(f"{section.path}.{key}: expected a file name, got what looks like the"
                              " PEM text itself (not shown): put it in a file, chmod 600, and name"
                              " that file here")
        path = (base / name).resolve()  # type: ignore[operator]
        if not validated and (not os.access(path, os.R_OK) or not path.is_file()):
            reason = ("missing" if not path.exists() else "not a file" if not path.is_file()
                      else "not readable")
            hint = f"key names are relative to {base_name}"
            if legacy_base is not None and (legacy_base / name).is_file():  # type: ignore[operator]
                hint = (f"the FlashLex SDK's default keys dir {legacy_base} has it:"
                        f" add -k {legacy_base}")
            raise ConfigError(f"{section.path}.{key}: key file {path} is {reason} ({hint})")
        return path

    keys = Keys(root_ca=key_file("rootCA"), cert=key_file("cert"), private_key=key_file("privateKey"))
    if not validated and stat.S_IMODE(keys.private_key.stat().st_mode) & 0o077:
        warnings.append(f"{section.path}.privateKey: {keys.private_key} is readable by other users;"
                        f" run: chmod 600 {keys.private_key}")
    section.value("publicKey")  # not needed for mutual TLS; accepted
    section.warn_unknown()
    return keys


def _mqtt(section: Section, thing_name: str, endpoint: str) -> Mqtt:
    backoff_section = section.section("autoReconnectBackoffTime")
    backoff = ReconnectPolicy(
        base_seconds=backoff_section.value("baseReconnectQuietTimeSecond"),
        max_seconds=backoff_section.value("maxReconnectQuietTimeSecond"),
        stable_seconds=backoff_section.value("stableConnectionTimeSecond"),
    )
    if backoff.max_seconds < backoff.base_seconds:
        raise ConfigError(f"{backoff_section.path}.maxReconnectQuietTimeSecond: must be >= "
                          f"baseReconnectQuietTimeSecond ({backoff.base_seconds:g})")
    backoff_section.warn_unknown()
    client_id = section.value("clientId") or thing_name
    rate, backlog_rate = _publish_rate(section)
    mqtt = Mqtt(
        port=section.value("port"),
        use_websocket=section.value("useWebsocket"),
        ingress_topic=_topic(section, "ingress", required=True),
        pubsub_topic=_topic(section, "pubsub"),
        egress_topic=_topic(section, "egress", required=True),
        subscriptions=section.value("subscriptions"),
        keepalive=_keepalive(section),
        client_id=client_id,
        egress_client_id=section.value("egressClientId") or f"{client_id}-egress",
        backoff=backoff,
        offline_publish_queueing=section.value("offlinePublishQueueing"),
        connect_timeout=section.value("connectDisconnectTimeout"),
        operation_timeout=section.value("mqttOperationTimeout"),
        max_inflight=section.value("maxInflight"),
        publish_rate=rate,
        publish_bytes_rate=section.value("publishBytesPerSecond"),
        backlog_rate=backlog_rate,
        poison_attempts=section.value("poisonAttempts"),
        max_topic_bytes=section.value("maxTopicBytes"),
        max_payload_bytes=section.value("maxPayloadBytes"),
        protocol=section.value("protocol"),
        session_expiry=section.value("sessionExpirySeconds"),
    )
    filters = [("ingress.topic", mqtt.ingress_topic), ("pubsub.topic", mqtt.pubsub_topic),
               *((f"subscriptions[{i}]", t) for i, t in enumerate(mqtt.subscriptions))]
    for key, topic_filter in filters:  # paho refuses a bad one at SUBSCRIBE: an ingress crash loop
        if topic_filter is not None and not valid_filter(topic_filter):
            raise ConfigError(f"{section.path}.{key}: expected an MQTT topic filter (+ a whole level,"
                              f" # only last), got {_show(topic_filter)}")
    problem = publish_topic_problem(mqtt.egress_topic, mqtt.max_topic_bytes,
                                    TOPIC_SLASHES if is_aws_endpoint(endpoint) else None)
    if problem:  # every default publish would be refused (on AWS IoT Core, cut the link)
        raise ConfigError(f"{section.path}.egress.topic: {problem}")
    if mqtt.egress_client_id == mqtt.client_id:
        raise ConfigError(f"{section.path}.egressClientId: must differ from the ingress client id"
                          f" {mqtt.client_id!r} (a broker drops one of two connections with one id)")
    for key, client_id in (("clientId", mqtt.client_id), ("egressClientId", mqtt.egress_client_id)):
        problem = client_id_problem(endpoint, client_id)
        if problem:  # `check` connects as `<name>-check` and passed; `run` reconnected for ever
            raise ConfigError(f"{section.path}.{key}: {problem}")
    if mqtt.session_expiry == 0 and mqtt.protocol != "3.1.1":
        section.warnings.append(f"{section.path}.sessionExpirySeconds: 0 under MQTT 5: the broker keeps"
                                " no session across a drop, so messages published while the link is"
                                " down, and those in flight at a crash, are lost")
    section.warn_unknown()
    return mqtt


def _topic(mqtt: Section, name: str, required: bool = False) -> Optional[str]:
    """`mqtt.<name>.topic`, warning about any other key of that section (a misspelt `topic`)."""
    section = mqtt.section(name, required=required)
    topic = section.value("topic")
    section.warn_unknown()
    return topic


def _keepalive(section: Section) -> int:
    """`keepAliveSeconds`; `keepalive` (flashlexd 0.1's name) is still read when it is absent."""
    if section.data.get("keepAliveSeconds") is not None and section.data.get("keepalive") is not None:
        section.used.add("keepalive")
        section.warnings.append(f"{section.path}.keepalive: ignored, keepAliveSeconds is set")
    if section.data.get("keepAliveSeconds") is None and section.data.get("keepalive") is not None:
        return section.value("keepalive")
    return section.value("keepAliveSeconds")


def _publish_rate(section: Section) -> Tuple[float, Optional[float]]:
    """Egress publishes per second, and the rate of a backlog queued while offline.

    `drainingFrequency` keeps the FlashLex SDK's meaning (AWSIoTPythonSDK's
    configureDrainingFrequency paced only the draining of the publishes it had queued while
    the connection was down; the others went out at once): the entries the outbox holds when
    the link comes up go at that rate (never faster than `publishRatePerSecond`), those queued
    while it is up at `publishRatePerSecond`."""
    rate = section.value("publishRatePerSecond")
    if rate is None:
        rate = KEYS[f"{section.path}.publishRatePerSecond"].default
    asked = draining = section.value("drainingFrequency")
    if draining is not None and rate:
        draining = min(draining, rate)
    if asked is not None and asked < 1:  # flashlexd 0.1's seconds would drain 10x slower
        section.warnings.append(
            f"{section.path}.drainingFrequency: {asked:g} publishes per second drains an outage's"
            f" backlog at one entry every {1 / draining:g} s (it is a rate, as in the FlashLex SDK;"
            " flashlexd 0.1 read it as seconds between checks)")
    return rate, draining


def _absolute(section: Section, key: str) -> str:
    """A path key: absolute, since the daemon's working directory is `/` under systemd and the
    unit makes only absolute paths writable (a relative one would mean a different place)."""
    value = section.value(key)
    if not os.path.isabs(value):
        raise ConfigError(f"{section.path}.{key}: must be an absolute path, got {_show(value)}")
    return value


def _store(section: Section, data_dir: Optional[str], warnings: List[str]) -> StoreSettings:
    file_data_dir = _absolute(section, "dataPath")  # checked even when overridden
    store = section.fill(StoreSettings, data_dir=Path(data_dir or file_data_dir),
                         cap_bytes=section.value("capMegabytes") * 1024 * 1024,
                         dedupe=_dedupe(section))
    section.text("subscriptionData")  # the old SDK's JSON store file; replaced by LMDB
    section.warn_unknown()
    store = _fitting_the_store(store, warnings)
    if store.max_payload_bytes > LARGE_PAYLOAD:
        warnings.append(_memory_note(store.max_payload_bytes))
    return store


def _memory_note(max_payload_bytes: int) -> str:
    """A message takes a multiple of its size while it passes (review "lowmem": 4-10x in the
    ingress reading it, 3-5x in the supervisor answering a read of it); under a small
    MemoryMax the OOM killer took the ingress at every try, a crash loop."""
    mib = max_payload_bytes / (1024 * 1024)
    need = math.ceil((IDLE_MB + 15 * mib) / 10) * 10
    return (f"flashlex.app.db.maxPayloadBytes: a message of up to {mib:.3g} MiB takes up to ~15 times that"
            f" in memory while it passes: give the service {need} MB or more (README: Processes and memory)")


def _dedupe(db: Section) -> Optional[DedupeKey]:
    """flashlex.app.db.dedupe, off unless configured (dedupe.py)."""
    if db.data.get("dedupe") is None:
        db.used.add("dedupe")
        return None
    section = db.section("dedupe")
    spec, window = section.value("key"), section.value("windowSeconds")
    section.warn_unknown()
    if spec is None:  # README: `key` defaults to off; a window alone changes nothing
        if "windowSeconds" in section.data:
            section.warnings.append(f"{section.path}.windowSeconds: set without {section.path}.key,"
                                    " so dedupe is off (it is on only with a key)")
        return None
    try:
        return DedupeKey.parse(spec, window)
    except ValueError as exc:
        raise ConfigError(f"{section.path}.key: {exc}") from None


LARGE_PAYLOAD = 4 * 1024 * 1024  # bytes: a larger inbound limit is told what memory it needs
IDLE_MB = 50  # the daemon's memory idle, in round figures (README: Processes and memory)


def _fitting_the_store(store: StoreSettings, warnings: List[str]) -> StoreSettings:
    """An inbound limit a message could reach and fill the store alone with (more than half of
    the cap, with a topic) is lowered to that, with a WARNING: such a message was refused by
    the store at every try and held every later one with the broker for good (`capMegabytes:
    16`, a 17 MB message: found by review). Lowered, not refused: a config that loaded before
    must not stop a daemon at an upgrade (exit 2 is not restarted)."""
    fitting = store.cap_bytes // 2 - MQTT_STRING_BYTES
    if store.max_payload_bytes <= fitting:
        return store
    warnings.append(f"flashlex.app.db.maxPayloadBytes: {store.max_payload_bytes} bytes could fill half"
                    f" of capMegabytes ({store.cap_bytes // (1024 * 1024)} MiB) with one message: larger"
                    f" messages than {fitting} bytes are dropped as oversize (raise the cap to take them)")
    return replace(store, max_payload_bytes=fitting)


def _api(section: Section, socket_path: Optional[str], max_payload_bytes: int,
         max_publish_bytes: int) -> Api:
    file_socket_path = _absolute(section, "path")  # checked even when overridden
    # an override made absolute: `flashlexd reload` finds the daemon by its socket's full path
    # (/proc/net/unix), and a relative one was taken for no daemon at all
    override = socket_path or os.environ.get("FLASHLEXD_SOCKET")
    api = section.fill(Api, socket_path=os.path.abspath(override) if override else file_socket_path)
    # frames carry inbound payloads (responses) and outbound ones (publish requests)
    largest_frame = REQUEST_OVERHEAD + max(max_payload_bytes, max_publish_bytes)
    if api.max_buffered_bytes is not None and api.max_buffered_bytes < largest_frame:
        which = ("flashlex.app.db.maxPayloadBytes" if max_payload_bytes >= max_publish_bytes
                 else "flashlex.thing.mqtt.maxPayloadBytes")
        raise ConfigError(f"{section.path}.maxBufferedBytes: must hold at least one request of the"
                          f" largest payload, {largest_frame} bytes (1 MiB + {which}),"
                          f" got {api.max_buffered_bytes}")
    section.warn_unknown()
    return api


def _supervision(section: Section) -> Supervision:
    supervision = section.fill(Supervision)
    if supervision.heartbeat_timeout <= 2 * supervision.heartbeat_seconds:
        raise ConfigError(f"{section.path}.heartbeatTimeoutSeconds: must be more than twice "
                          f"heartbeatSeconds ({supervision.heartbeat_seconds:g})")
    section.warn_unknown()
    return supervision
