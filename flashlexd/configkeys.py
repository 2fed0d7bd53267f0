"""Every config key flashlexd reads, in one table: its path, type, default, bounds, what a reload
does with it, and its documentation.

The table drives the parser (`configsection.Section.value` reads a key by its entry: type
check, bounds, default, the one-line error naming the path) and the README's configuration
table (`readme_table`; `python -m flashlexd.configkeys README.md` rewrites it, and a test fails
when the two disagree). A new key is one entry here plus the code that uses its value.
Checks between keys (one key's bound set by another) stay in config.py, next to the dataclass
they fill.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from flashlexd.dedupe import DEFAULT_WINDOW_SECONDS as DEDUPE_WINDOW_SECONDS
from flashlexd.wire import DEFAULT_MAX_PAYLOAD, DEFAULT_SOCKET, FULL_POLICIES

DEFAULT_DATA_DIR = "/var/lib/flashlexd"
INGEST_COMMIT_MS = 500  # chosen by measurement: docs/WEAR.md
INGEST_COMMIT_BATCH = 8  # below RabbitMQ's default prefetch (10) and mosquitto's in-flight limit (20)
API_COMMIT_MS = 0  # a window delays every call: only worth it with several apps writing at once
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_MQTT_PAYLOAD = 268435455 - 65535 - 4  # remaining length limit minus the longest topic, packet id
# the cap plus its headroom (1/8) must fit LMDB's map size, a 64-bit size_t
MAX_CAP_MEGABYTES = 2 ** 43  # 8 EiB
MAX_STOP_TIMEOUT = 86399  # seconds: the unit `flashlexd service` renders follows less than a day
PROTOCOLS = ("auto", "5", "3.1.1")  # flashlex.thing.mqtt.protocol
REQUIRED = object()  # the default of a key that must be given

# what SIGHUP does with a changed value (the README's "reload" column)
AT_ONCE = "at once"
WORKERS = "workers restart"
AT_ONCE_AND_WORKERS = "at once; workers restart"
LINKS = "ingress, egress restart"
LINKS_AND_API = "at once; ingress, egress restart"
NEXT_START = "next start"
REFUSED = "reload refused (with every other change): restart"  # the store cannot move under a running daemon
UNUSED = ""


@dataclass(frozen=True)
class Key:
    path: str
    kind: str  # text, integer, seconds, boolean, choice, texts, uids, rate, consumers, section, legacy
    default: Any = None  # None: no value when absent; REQUIRED: must be given
    doc: str = ""
    reload: str = UNUSED
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Tuple[str, ...] = ()
    shown: Optional[str] = None  # the README's default column, when not just the default
    maximum_why: str = ""  # said after the maximum in the error, e.g. " (the MQTT limit)"
    minimum_why: str = ""  # the same for a minimum (read for seconds; integers have theirs)
    field: Optional[str] = None  # the config dataclass field `Section.fill` puts the value in

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is REQUIRED:
            return "required"
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, str):
            return f"`{self.default}`"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


def _legacy(path: str, doc: str, reload: str = UNUSED) -> Key:
    return Key(path, "legacy", doc=doc, reload=reload)


_DB, _SOCKET, _SUP = "flashlex.app.db", "flashlex.app.socket", "flashlex.app.supervisor"
_THING, _MQTT = "flashlex.thing", "flashlex.thing.mqtt"
_BACKOFF = f"{_MQTT}.autoReconnectBackoffTime"
# a new ingress client id (by a reload, or while stopped): a new broker session, the old one not drained
_CLIENT_ID_SWITCH = (
    "changed by a reload or while stopped, messages published during the switch stay in the old"
    " id's session at the broker (until its session expiry) and are not fetched (one WARNING,"
    " `flashlexd reload` says so too; the data dir's inbox and outbox are kept): stop the publishers"
    " first, or drain the old id afterwards (e.g. `mosquitto_sub -c -i OLDID ...`)")
# thing.endpoint: a session lives on one broker, named by its host (Thing.broker_identity)
_BROKER_MOVE = ("changed by a reload or while stopped to another host (compared lower-cased, without"
                " a trailing dot, an AWS IoT endpoint's `-ats` folded: `abc-ats.iot.REGION.amazonaws.com`"
                " and `abc.iot.REGION.amazonaws.com` are one; names are not resolved), it counts as a"
                " move: if the old host is another broker, what that one queued for the client id stays"
                " there until the device goes back or that session expires (one WARNING, `flashlexd reload`"
                " says so too; not counted in `sessions_lost`), and the ingress's DUP marks are dropped"
                " (see \"Delivery guarantees\": one broker under another host name may then store a"
                " message twice); MQTT 5 is probed again on the new broker")
# mqtt.port: the listeners of one broker share its sessions
_PORT_SAME_BROKER = ("a port change (8883 and 443, or `useWebsocket`) reaches the same broker: its session"
                     " and the ingress's DUP marks are kept (not a move: `thing.endpoint`)")

TABLE: Tuple[Key, ...] = (
    _legacy("flashlex.app.api",
            "FlashLex cloud API of the old SDK (`endpoint`, `env`): accepted, not used"),
    _legacy("flashlex.app.callback", "old SDK callback style: accepted, not used"),
    _legacy("flashlex.app.thread", "old SDK threading style: `subscribe` (the seed's) subscribes the"
            " ingress topic alone, as the SDK did (not `pubsub.topic`); other values: accepted, not used",
            LINKS),
    _legacy("flashlex.app.message", "old SDK message settings: accepted, not used"),
    _legacy(f"{_DB}.subscriptionData",
            "the old SDK's JSON store file: accepted, not used (LMDB replaces it)"),
    Key(f"{_DB}.expireSeconds", "seconds", None,
        "inbox messages older than this are removed; must be > 0. Set, lowered or raised by a"
        " reload, it applies to every message stored, whatever was set when it came",
        WORKERS, shown="no expiry", field="expire_seconds"),
    Key(f"{_DB}.dedupe.key", "text", None,
        "off unless set. An opt-in application key against a broker's redeliveries after its own"
        " crash: `json:<dotted.path>` reads it from a JSON payload (`json:id`, `json:meta.msgId`,"
        " `json:items.0`); a message whose key was stored in the last `windowSeconds` is"
        " acknowledged, counted in `duplicates` and not stored. A payload that is not JSON or lacks"
        " the path, or whose key is null or empty, is stored normally (counted in ingress's"
        " `dedupe_keyless`). `mqtt5:<user-property>` reads it from an MQTT 5 user property (absent or"
        " empty: stored normally; under MQTT 3.1.1 messages carry none: every message"
        " is stored normally). See \"Delivery guarantees\"",
        WORKERS, shown="off"),
    Key(f"{_DB}.dedupe.windowSeconds", "seconds", DEDUPE_WINDOW_SECONDS,
        "how long a dedupe key is remembered; set without `key`, dedupe stays off (one WARNING"
        " at start and reload)", WORKERS),
    Key(f"{_DB}.dataPath", "text", DEFAULT_DATA_DIR, "store directory (`--data-dir` wins)", REFUSED),
    Key(f"{_DB}.capMegabytes", "integer", 256, "store size cap", WORKERS, minimum=1,
        maximum=MAX_CAP_MEGABYTES, maximum_why=" (LMDB's map size limit, with its headroom)"),
    Key(f"{_DB}.whenFull", "choice", "reject",
        "at the cap: `reject` (stop acknowledging; the broker keeps the messages) or `dropOldest` (drop"
        " the oldest inbox messages, counted and logged once a minute with how many). Outbox entries and dead letters are never dropped: under"
        " `reject` a publish is refused at the cap; under `dropOldest` the oldest inbox messages make"
        " room for it too, and once outbox entries and dead letters alone fill the cap, publishes and"
        " inbox appends are refused", WORKERS, choices=FULL_POLICIES, field="when_full"),
    Key(f"{_DB}.sweepSeconds", "seconds", 5.0, "how often the expiry worker sweeps (at least 0.1)", WORKERS,
        minimum=0.1, minimum_why=" (each sweep reads the store: more often only burns CPU)",
        field="sweep_seconds"),
    Key(f"{_DB}.ingestCommitMs", "integer", INGEST_COMMIT_MS,
        "how long a received message may wait for more to share its commit (one fsync, fewer bytes"
        " written: see docs/WEAR.md); its PUBACK waits for that commit. The broker connection's drop"
        " ends the window. `0`: commit at each loop pass. SD-card friendly: `2000` with `ingestCommitBatch: 16`", WORKERS, minimum=0,
        maximum=5000, field="ingest_commit_ms"),
    Key(f"{_DB}.ingestCommitBatch", "integer", INGEST_COMMIT_BATCH,
        "received messages that end the commit window at once. Keep it below the broker's window of"
        " unacknowledged messages (mosquitto's `max_inflight_messages`, 20 by default; RabbitMQ's"
        " `mqtt.prefetch`, 10): a broker that stops sending before the batch is full waits for"
        " `ingestCommitMs` each time. The window also caps the ingest rate: RabbitMQ's 10 let ~2,500"
        " msg/s through here (a commit per 10 messages), so raise `mqtt.prefetch` for a thing that"
        " receives more. SD-card friendly: `16` (on mosquitto's defaults)", WORKERS,
        minimum=1, maximum=1024, field="ingest_commit_batch"),
    Key(f"{_DB}.apiCommitMs", "integer", API_COMMIT_MS,
        "how long an API `ack` (or `publish`) waits for other apps' calls of the same kind to share"
        " its write (a publish: one store commit; an ack: one ack journal record, a named consumer's:"
        " one store commit for all the consumers' acks, docs/WEAR.md); the"
        " call returns after that write (durable). It delays every such call by up to this much, so"
        " an app calling one at a time gains nothing from it (at `10`, one app publishing one"
        " message at a time gets ~80 a second). `0`: each call writes alone, at once."
        " Several apps acking or publishing at once (named consumers' apps too): e.g. `10`",
        AT_ONCE_AND_WORKERS, minimum=0, maximum=5000, field="api_commit_ms"),
    Key(f"{_DB}.maxPayloadBytes", "integer", DEFAULT_MAX_PAYLOAD,
        "inbound limit: larger incoming messages (payload and MQTT 5 properties, counted as sent) are acknowledged"
        " and dropped, counted (for outbound,"
        " see `thing.mqtt.maxPayloadBytes`); it also sizes API responses and frames; with 64 KiB"
        " for a topic, at most half of `capMegabytes` (over it, lowered to that, with a WARNING);"
        " under MQTT 5 the ingress's CONNECT asks the broker to keep PUBLISHes over it by more"
        " than 1 MiB; over 4 MiB, a WARNING gives the memory the service needs (see Processes and memory)",
        AT_ONCE_AND_WORKERS, minimum=1, maximum=MAX_MQTT_PAYLOAD, maximum_why=" (the MQTT limit)",
        field="max_payload_bytes"),
    Key("flashlex.app.consumers", "consumers", None,
        "named consumers: each name (`[a-z0-9_-]{1,64}`) gets every message matching its `filter`"
        " (MQTT wildcards, default `#`: every topic but those beginning with `$`, as in MQTT) with its own acks; `maxBacklog` (optional) caps its unacked"
        " messages (its oldest beyond it are dropped for it, counted); `allowUids` (optional) limits"
        " it to those uids besides root and the daemon's own. See \"Several apps: named consumers\"",
        AT_ONCE, shown="none"),
    Key("flashlex.app.allowDynamicConsumers", "boolean", True,
        "apps may register a consumer not declared in `consumers` by using its name, while fewer than"
        " 64 consumers (declared and registered) are stored", AT_ONCE),
    Key("flashlex.app.consumerIdleDays", "integer", 7,
        "a dynamic consumer unused this many days is removed (one WARNING)", AT_ONCE, minimum=1),
    Key("flashlex.app.dynamicMaxBacklog", "integer", None,
        "a dynamic consumer's `maxBacklog`: beyond it its oldest unacked messages are dropped for"
        " it, counted; without it, an app reading under an undeclared name and never acking holds"
        " every message it matches, and under `whenFull: reject` a full store then refuses every"
        " app's new messages", AT_ONCE, minimum=1, shown="none"),
    Key("flashlex.app.logLevel", "choice", "info",
        "`debug`, `info`, `warning`, `error` (`--log-level` wins); on reload the supervisor's at once",
        WORKERS, choices=LOG_LEVELS),
    Key(f"{_SOCKET}.path", "text", DEFAULT_SOCKET,
        "API socket (`--socket`, then `$FLASHLEXD_SOCKET` win)", NEXT_START),
    Key(f"{_SOCKET}.group", "text", None,
        "group owning the socket (mode 0660); its members may use the API; the unit runs the service"
        " in it (`Group=`): set after the install, the unit must be rendered again. A reload refuses"
        " a group that does not exist, or that the running service is not in: a new group takes a"
        " restart", NEXT_START,
        shown="none", field="socket_group"),
    Key(f"{_SOCKET}.allowUids", "uids", (),
        "uids allowed besides root and the daemon's own; when set, the socket is 0666 (and the unit's"
        " runtime dir 0755) and every connection is checked by SO_PEERCRED; set after the install,"
        " the unit must be rendered again (its runtime dir's mode)", NEXT_START, shown="`[]`",
        field="allow_uids"),
    Key(f"{_SOCKET}.maxConnections", "integer", 1024,
        "concurrent API connections; more get `busy` at once. One uid holds a quarter of them at most"
        " (at least 1), except root, which also has 8 more beyond the cap (so"
        " `sudo flashlexctl status` always gets in). Never more than the open files limit minus 72"
        " (64, and those 8; the supervisor raises its soft limit to the hard one at start; a lower"
        " cap is logged)", AT_ONCE, minimum=1, field="max_connections"),
    Key(f"{_SOCKET}.idleTimeoutSeconds", "seconds", 300.0, "idle API connections are closed", AT_ONCE,
        field="idle_timeout"),
    Key(f"{_SOCKET}.maxBufferedBytes", "integer", None,
        "bytes of incoming requests all API connections may hold together; a request that does not"
        " fit is answered `busy` and its connection closed (one of up to 16 KiB is read all the same)."
        " Must be at least 1 MiB + `maxPayloadBytes`",
        AT_ONCE, minimum=1, shown="8388608 (8 MiB; at least two of the largest requests)",
        field="max_buffered_bytes"),
    Key(f"{_SOCKET}.frameTimeoutSeconds", "seconds", 10.0,
        "a request must arrive whole within this many seconds of its first byte; slower senders get"
        " `frame_timeout` and are closed", AT_ONCE, field="frame_timeout"),
    Key(f"{_SUP}.heartbeatSeconds", "seconds", 1.0, "worker heartbeat period (at least 0.1)", WORKERS,
        minimum=0.1, minimum_why=" (more often only burns CPU)", field="heartbeat_seconds"),
    Key(f"{_SUP}.heartbeatTimeoutSeconds", "seconds", 10.0,
        "a worker silent this long gets SIGABRT (its stack is logged), SIGKILL a second later, and is"
        " replaced; must be more than twice `heartbeatSeconds`, and at least 1", WORKERS, minimum=1,
        minimum_why=" (a worker busy for a moment would be taken for hung, the daemon for a crash loop)",
        field="heartbeat_timeout"),
    Key(f"{_SUP}.stopTimeoutSeconds", "seconds", 10.0, "graceful stop budget before SIGKILL (the unit"
        " `flashlexd service` renders gives systemd's TimeoutStopSec 20 s more, at least 30; as it"
        " stops, the daemon asks systemd for as much with `EXTEND_TIMEOUT_USEC`, so a budget raised"
        " after the unit was rendered holds all the same). At most"
        f" {MAX_STOP_TIMEOUT} (under a day)", WORKERS, maximum=MAX_STOP_TIMEOUT,
        maximum_why=" (under a day: the unit's TimeoutStopSec follows no more)", field="stop_timeout"),
    Key(f"{_SUP}.restartBackoffMaxSeconds", "seconds", 30.0, "cap of the restart backoff", WORKERS,
        field="backoff_max_seconds"),
    Key(f"{_SUP}.crashLoopRestarts", "integer", 5,
        "more failures of one worker than this within `crashLoopWindowSeconds`: exit 1", WORKERS,
        minimum=1, field="crash_loop_restarts"),
    Key(f"{_SUP}.crashLoopWindowSeconds", "seconds", 60.0, "the window of `crashLoopRestarts`", WORKERS,
        field="crash_loop_window"),
    _legacy("flashlex.dist", "build metadata of the old SDK (`commitSha`): accepted, not used"),
    _legacy(f"{_THING}.id", "FlashLex thing id: accepted, not used"),
    Key(f"{_THING}.name", "text", REQUIRED, "MQTT client id of ingress (unless `mqtt.clientId`);"
        f" {_CLIENT_ID_SWITCH}", LINKS),
    Key(f"{_THING}.endpoint", "text", REQUIRED, "broker host name (verified against its certificate)"
        " or IPv4/IPv6 address, alone: no `https://`, port or path (the port is `mqtt.port`);"
        " on an AWS IoT Core endpoint (`*.amazonaws.com`) `publish` also refuses topics over its 7"
        " slashes or beginning with `$` (but `$aws/`), and so does the config for `mqtt.egress.topic`;"
        f" {_BROKER_MOVE}", LINKS_AND_API),
    *(Key(f"{_THING}.keys.{name}", "text", REQUIRED,
          f"{what}, for mutual TLS, checked at start and on reload: files that do not load, or a key"
          " that does not match the certificate, are a config error naming the file; read again at"
          " each worker restart, and by a link at its next connection attempt once they changed"
          " (a renewal written in place is used without a reload); new files that do not load"
          " leave the last credentials that did (one WARNING); a reload that finds the files"
          " changed in place (a rotated CA or certificate) restarts ingress and egress" + extra, LINKS)
      for name, what, extra in (
          ("rootCA", "CA certificate", ""), ("cert", "client certificate", ""),
          ("privateKey", "private key", ". Readable by group or others: `run` refuses it (exit 2)"
                                        " unless `--allow-insecure-key`"))),
    Key(f"{_THING}.keys.publicKey", "text", None, "accepted, not needed", UNUSED),
    _legacy(f"{_THING}.keys.path", "the old SDK's keys dir (its `app.py` set it from `-k`): accepted,"
                                   " not used; use `--keys-dir`"),
    Key(f"{_MQTT}.port", "integer", 8883, "443 uses ALPN `x-amzn-mqtt-ca` as AWS IoT requires;"
        f" {_PORT_SAME_BROKER}", LINKS,
        minimum=1, maximum=65535),
    Key(f"{_MQTT}.useWebsocket", "boolean", False,
        "MQTT over secure websockets, with the client certificate. AWS IoT Core takes websockets only"
        " with SigV4 (IAM credentials, what the old SDK signed with): for its endpoints `true` connects"
        " with MQTT over TLS on port 443 (ALPN) instead, with one warning", LINKS),
    Key(f"{_MQTT}.ingress.topic", "text", REQUIRED, "subscribed (QoS 1) by ingress", LINKS),
    Key(f"{_MQTT}.pubsub.topic", "text", None, "also subscribed by ingress, except under the old SDK's"
        " `app.thread: subscribe`", LINKS, shown="none"),
    Key(f"{_MQTT}.subscriptions", "texts", (), "extra topic filters for ingress", LINKS, shown="`[]`"),
    Key(f"{_MQTT}.egress.topic", "text", REQUIRED, "default topic of published messages",
        LINKS_AND_API),
    Key(f"{_MQTT}.clientId", "text", None, f"ingress client id; {_CLIENT_ID_SWITCH}", LINKS,
        shown="`thing.name`"),
    Key(f"{_MQTT}.egressClientId", "text", None, "egress client id (must differ)", LINKS,
        shown="`<clientId>-egress`"),
    Key(f"{_MQTT}.keepAliveSeconds", "integer", 30,
        "MQTT keepalive seconds (>= 2; AWS IoT Core counts 30-1200: on its endpoints a longer one is lowered to 1200). A silent broker is declared dead"
        " after keepalive + min(`mqttOperationTimeout`, keepalive / 2)", LINKS, minimum=2, maximum=65535,
        maximum_why=" (the MQTT limit)"),
    Key(f"{_MQTT}.keepalive", "integer", None,
        "flashlexd 0.1's name of `keepAliveSeconds`, still read when that is absent", LINKS, minimum=2,
        maximum=65535, maximum_why=" (the MQTT limit)"),
    Key(f"{_MQTT}.maxInflight", "integer", 100,
        "egress QoS 1 messages published and not yet acknowledged (AWS IoT Core: 100)", LINKS,
        minimum=1, maximum=65535, maximum_why=" (MQTT packet ids)"),
    Key(f"{_MQTT}.publishRatePerSecond", "rate", 100.0,
        "egress publishes per second, paced (AWS IoT Core drops publishes over 100/s per connection"
        " without a PUBACK); 0 = unlimited, for brokers without quotas", LINKS, minimum=0),
    Key(f"{_MQTT}.drainingFrequency", "rate", None,
        "the FlashLex SDK's drain rate in publishes per second (AWSIoTPythonSDK's"
        " `configureDrainingFrequency`), kept with that meaning: the entries the outbox holds when"
        " the link comes up (queued while it was down) go at this rate, at most `publishRatePerSecond`;"
        " those queued while it is up go at `publishRatePerSecond`. Must be > 0", LINKS, shown="none"),
    Key(f"{_MQTT}.publishBytesPerSecond", "integer", 524288,
        "egress payload + topic bytes per second (AWS IoT Core: 512 KiB/s per connection);"
        " 0 = unlimited", LINKS, minimum=0),
    Key(f"{_MQTT}.poisonAttempts", "integer", 3,
        "an outbox entry alone in flight when the link drops this many times, or skipped by the broker"
        " (later ones acknowledged) on this many connections in a row, is moved to the dead letters"
        " (see \"Poison entries\")", LINKS, minimum=1),
    Key(f"{_MQTT}.protocol", "choice", "auto",
        "`5`, `3.1.1` or `auto`: MQTT 5, and on a CONNACK \"unsupported protocol version\" (or a"
        " close at the MQTT 5 CONNECT that 3.1.1 passes) MQTT 3.1.1 until the next start (logged once). `status` shows what each link negotiated; see"
        " \"MQTT 5 and 3.1.1\"", LINKS, choices=PROTOCOLS),
    Key(f"{_MQTT}.sessionExpirySeconds", "integer", 3600,
        "MQTT 5: how long the broker keeps our sessions (subscriptions, queued messages) after a"
        " link drops (AWS IoT Core's default, 3600; its maximum is 604800). Never a Clean Start, not"
        " even on a store's first connection (see \"MQTT 5 and 3.1.1\"). 0 is warned about: no"
        " session outlives a drop, so what was in flight at a crash is lost", LINKS, minimum=0, maximum=4294967295,
        maximum_why=" (the MQTT limit)"),
    Key(f"{_BACKOFF}.baseReconnectQuietTimeSecond", "seconds", 1.0,
        "reconnect backoff: the first delay, doubling up to `maxReconnectQuietTimeSecond`; plus"
        " jitter, never more than one CONNECT per second per client id, a worker replaced after"
        " a crash included (AWS IoT Core's limit); at most 86400", LINKS, maximum=86400,
        maximum_why=" (a day: longer, the link would as good as never come back)"),
    Key(f"{_BACKOFF}.maxReconnectQuietTimeSecond", "seconds", 32.0,
        "reconnect backoff cap (>= `baseReconnectQuietTimeSecond`; at most 86400)", LINKS, maximum=86400,
        maximum_why=" (a day: longer, the link would as good as never come back)"),
    Key(f"{_BACKOFF}.stableConnectionTimeSecond", "seconds", 20.0,
        "seconds connected after which the reconnect backoff starts again from the base", LINKS),
    Key(f"{_MQTT}.maxTopicBytes", "integer", 256,
        "outbound: `publish` refuses longer topics (UTF-8 bytes; AWS IoT Core's limit; at most"
        " 65535). The egress topic must meet it too", LINKS_AND_API, minimum=1, maximum=65535,
        maximum_why=" (the MQTT limit)"),
    Key(f"{_MQTT}.maxPayloadBytes", "integer", 131072,
        "outbound: `publish` refuses larger payloads (`payload_too_large`; AWS IoT Core's 128 KB). Not"
        " the inbound `app.db.maxPayloadBytes`", LINKS_AND_API, minimum=1, maximum=MAX_MQTT_PAYLOAD,
        maximum_why=" (the MQTT limit)"),
    Key(f"{_MQTT}.offlinePublishQueueing", "integer", -1,
        "outbox cap in entries: -1 unlimited, 0 refuse publishes while egress is offline",
        LINKS_AND_API, minimum=-1),
    Key(f"{_MQTT}.connectDisconnectTimeout", "seconds", 10.0, "seconds a connect attempt may take",
        LINKS),
    Key(f"{_MQTT}.mqttOperationTimeout", "seconds", 30.0,
        "seconds to wait for any acknowledgement (PUBACK, SUBACK, UNSUBACK; PINGRESP within min(this,"
        " keepalive / 2)) with none arriving, or for a PUBACK that later publishes' PUBACKs overtook:"
        " past it the link is closed and re-established and the in-flight entries are sent again", LINKS),
)

KEYS: Dict[str, Key] = {key.path: key for key in TABLE}
LEGACY_KEYS = frozenset(key.path for key in TABLE if key.kind == "legacy")
# two names of one setting: either one set sets it
ALIASES = {f"{_MQTT}.keepalive": f"{_MQTT}.keepAliveSeconds", f"{_MQTT}.keepAliveSeconds": f"{_MQTT}.keepalive"}
# the keys a `flashlexd run` option wins over (Overrides' fields)
OVERRIDDEN_BY = {"data_dir": f"{_DB}.dataPath", "socket_path": f"{_SOCKET}.path",
                 "log_level": "flashlex.app.logLevel"}

TABLE_START = "<!-- config keys: generated from flashlexd/configkeys.py -->"
TABLE_END = "<!-- end of config keys -->"


def readme_table() -> str:
    """The README's configuration table, from `TABLE`."""
    lines = ["| key | default | on reload (SIGHUP) | meaning in flashlexd |",
             "| --- | --- | --- | --- |"]
    for key in TABLE:
        lines.append(f"| `{key.path}` | {key.default_text} | {key.reload} | {key.doc} |")
    return "\n".join(lines)


def readme_section(readme: str) -> str:
    """What stands between the table markers of `readme`."""
    start = readme.index(TABLE_START) + len(TABLE_START)
    return readme[start:readme.index(TABLE_END, start)].strip("\n")


def rewrite_readme(path: str) -> None:
    """Put `readme_table()` between the markers of the README at `path`."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END, start)
    with open(path, "w", encoding="utf-8") as file:
        file.write(f"{text[:start]}\n{readme_table()}\n{text[end:]}")


if __name__ == "__main__":
    rewrite_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
