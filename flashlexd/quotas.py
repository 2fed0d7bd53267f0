"""AWS IoT Core's per-connection quotas and transports, and the config values that would break them.

AWS does not refuse a publish over its rate quota: it drops it without a PUBACK and keeps the
connection up, so a config over a quota does not fail loudly, it stalls. These checks turn that
into one warning line per value, shown by `flashlexd run` and `flashlexd check`. They apply only
when the endpoint is an AWS IoT Core one (other brokers have other limits, or none).
The README's quota table lists the same figures with the key that maps to each.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # config imports this module
    from flashlexd.config import Mqtt

# https://docs.aws.amazon.com/general/latest/gr/iot-core.html (message broker and connection limits)
PUBLISH_RATE = 100             # PUBLISH requests per second per connection (not adjustable)
PUBLISH_BYTES_RATE = 512 * 1024  # throughput per connection, bytes per second
IN_FLIGHT = 100                # unacknowledged QoS 1 publishes per connection
PAYLOAD_BYTES = 128 * 1024     # largest message payload
TOPIC_BYTES = 256              # longest topic name, UTF-8 bytes
TOPIC_SLASHES = 7              # at most 7 forward slashes (8 levels) in a topic or filter
SUBSCRIPTIONS = 50             # subscriptions per connection
CLIENT_ID_BYTES = 128         # longest client id, UTF-8 bytes (a thing name may be 128 itself)
FILTERS_PER_SUBSCRIBE = 8      # topic filters in one SUBSCRIBE request
CONNECTS_PER_SECOND = 1        # CONNECT requests per second per client id
KEEPALIVE_RANGE = (30, 1200)   # seconds; AWS clamps values outside it
SESSION_EXPIRY = "1 h (adjustable up to 7 days)"  # how long a persistent session outlives a disconnect
SESSION_EXPIRY_MAX = 7 * 24 * 3600  # the adjustable quota's ceiling, seconds
QOS1_RETRY_SECONDS = 3600      # a QoS 1 message sent us and not acknowledged this long is dropped


ALPN_PORT = 443  # AWS IoT serves MQTT with client certificates on 443 only with this ALPN:
ALPN_PROTOCOL = "x-amzn-mqtt-ca"


def is_aws_endpoint(endpoint: str) -> bool:
    host = endpoint.lower().rstrip(".")
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def aws_transport(endpoint: str, path: str, mqtt: "Mqtt", warnings: List[str]) -> "Mqtt":
    """`mqtt` with the transport an AWS IoT Core endpoint takes the thing's certificate over.
    AWS authenticates MQTT over websockets only with SigV4 (IAM credentials, what the old SDK
    used with `useWebsocket: true`) or a custom authorizer, never a client certificate: such a
    config connects with MQTT over TLS on port 443 (ALPN), which passes the same firewalls."""
    if not (mqtt.use_websocket and is_aws_endpoint(endpoint)):
        return mqtt
    warnings.append(f"{path}.useWebsocket: AWS IoT Core takes MQTT over websockets only with SigV4"
                    f" (IAM) credentials, not a certificate; connecting with MQTT over TLS on port"
                    f" {ALPN_PORT} (ALPN {ALPN_PROTOCOL}) instead, through the same firewalls")
    return replace(mqtt, use_websocket=False, port=ALPN_PORT)


def aws_keepalive(endpoint: str, path: str, mqtt: "Mqtt", warnings: List[str]) -> "Mqtt":
    """`mqtt` with a keepalive AWS IoT Core keeps to: it counts at most 1200 s and closes a link
    quiet for 1.5 x that, so a longer one, sent as asked, would lose an idle link every ~30 min
    (under 3.1.1 the broker does not say what it counts)."""
    high = KEEPALIVE_RANGE[1]
    if not is_aws_endpoint(endpoint) or mqtt.keepalive <= high:
        return mqtt
    warnings.append(f"{path}.keepAliveSeconds: {mqtt.keepalive} is over AWS IoT Core's {high} s (it"
                    f" closes a link quiet for 1.5 x {high} s); using {high}")
    return replace(mqtt, keepalive=high)


def client_id_problem(endpoint: str, client_id: str) -> Optional[str]:
    """Why AWS IoT Core refuses every CONNECT with this client id, if it does."""
    size = len(client_id.encode("utf-8"))
    if is_aws_endpoint(endpoint) and size > CLIENT_ID_BYTES:
        return (f"{client_id!r} is {size} bytes, over AWS IoT Core's {CLIENT_ID_BYTES}-byte client id"
                f" (the broker refuses every connection): set a shorter one")
    return None


def quota_warnings(endpoint: str, path: str, mqtt: "Mqtt", thing_name: str) -> List[str]:
    """One line per config value of `flashlex.thing.mqtt` (at `path`) over a quota; the thing's
    name counts through `flashlexd check`'s client id, `<thing name>-check`."""
    if not is_aws_endpoint(endpoint):
        return []
    warnings: List[str] = []

    def over(key: str, value: object, quota: str, outcome: str = "the broker drops what exceeds it") -> None:
        warnings.append(f"{path}.{key}: {value} is over AWS IoT Core's quota of {quota}; {outcome}")

    disconnects = "the broker disconnects the client on a publish over it"  # not a silent drop

    if mqtt.publish_rate == 0 or mqtt.publish_rate > PUBLISH_RATE:
        over("publishRatePerSecond", "unlimited" if mqtt.publish_rate == 0 else f"{mqtt.publish_rate:g}/s",
             f"{PUBLISH_RATE} publishes/s per connection")
    if mqtt.publish_bytes_rate == 0 or mqtt.publish_bytes_rate > PUBLISH_BYTES_RATE:
        over("publishBytesPerSecond", "unlimited" if mqtt.publish_bytes_rate == 0
             else mqtt.publish_bytes_rate, f"{PUBLISH_BYTES_RATE} bytes/s per connection")
    if mqtt.max_payload_bytes > PAYLOAD_BYTES:
        over("maxPayloadBytes", mqtt.max_payload_bytes, f"{PAYLOAD_BYTES} bytes per payload", disconnects)
    if mqtt.max_topic_bytes > TOPIC_BYTES:
        over("maxTopicBytes", mqtt.max_topic_bytes, f"{TOPIC_BYTES} bytes per topic", disconnects)
    if mqtt.max_inflight > IN_FLIGHT:
        over("maxInflight", mqtt.max_inflight, f"{IN_FLIGHT} unacknowledged publishes")
    low = KEEPALIVE_RANGE[0]
    if mqtt.keepalive < low:  # harmless: we ping more often than the broker needs
        warnings.append(f"{path}.keepAliveSeconds: {mqtt.keepalive} is under AWS IoT Core's range"
                        f" of {low}-{KEEPALIVE_RANGE[1]} s; the broker counts {low} s")
    if mqtt.session_expiry > SESSION_EXPIRY_MAX:
        warnings.append(f"{path}.sessionExpirySeconds: {mqtt.session_expiry} is over AWS IoT Core's"
                        f" {SESSION_EXPIRY_MAX} s (7 days, its quota's ceiling; 1 h unless raised):"
                        f" the broker drops a session offline longer, with the QoS 1 messages it kept")
    check_id = f"{thing_name}-check"
    if len(check_id.encode("utf-8")) > CLIENT_ID_BYTES:
        warnings.append(f"{path.rsplit('.', 1)[0]}.name: `flashlexd check` connects as {check_id!r},"
                        f" {len(check_id.encode('utf-8'))} bytes, over AWS IoT Core's {CLIENT_ID_BYTES}-byte"
                        f" client id: its mqtt step is refused (the daemon's links are not affected)")
    topics = mqtt.ingress_topics()
    if len(topics) > SUBSCRIPTIONS:
        over("subscriptions", f"{len(topics)} topic filters", f"{SUBSCRIPTIONS} subscriptions per connection")
    for topic in (*topics, mqtt.egress_topic):
        counted = topic  # Basic Ingest's $aws/rules/<rule>/ and a shared one's $share/<group>/ are
        if topic.startswith(("$aws/rules/", "$share/")) and topic.count("/") >= 2:  # not counted by AWS
            counted = topic.split("/", 3 if topic.startswith("$aws/") else 2)[-1]
        if len(counted.encode("utf-8")) > TOPIC_BYTES or counted.count("/") > TOPIC_SLASHES:
            warnings.append(f"{path}: topic {topic!r} is over AWS IoT Core's limits of {TOPIC_BYTES}"
                            f" bytes and {TOPIC_SLASHES} slashes")
    return warnings
