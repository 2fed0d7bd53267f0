#!/usr/bin/env bash
# make demo: a throw-away CA, a mutual-TLS mosquitto on loopback, flashlexd, and messages
# flowing both ways. Everything it starts is stopped by PID when it ends, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
DEMO=$PWD/.demo
THING=demo-thing
# one demo at a time: a second one replaced the first's keys under it (a TLS error, exit 2)
exec 9>"$PWD/.demo.lock"
flock -n 9 || { echo "another make demo is running in $PWD: wait for it to end" >&2; exit 1; }
rm -rf "$DEMO" && mkdir -p "$DEMO/keys" "$DEMO/broker"

say() { printf '\n==> %s\n' "$*"; }
# every job this shell started, newest first (the subscriber, the daemon, then its broker): a
# Ctrl-C between starting one and noting its PID left the daemon running (found under load)
cleanup() {
    for pid in $(jobs -p | tac); do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true  # 143: killed, as asked
    done
    return 0
}
trap cleanup EXIT
# Ctrl-C reaches the daemon too: without this the script polled on for the stopped daemon and
# ended with "timed out waiting for ..."
trap 'echo "interrupted: stopping what the demo started" >&2; exit 130' INT
wait_until() {  # wait_until SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $what" >&2; exit 1; }
        sleep 0.1
    done
}

say "Making a throw-away CA, a broker certificate and a thing certificate (openssl)"
cd "$DEMO/keys"
ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "$@" 2>/dev/null; }
ec -x509 -keyout ca.key -out root-ca-cert.pem -days 2 -subj "/CN=flashlexd demo CA"
ec -keyout server.key -out server.csr -subj "/CN=localhost"
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > san.ext
openssl x509 -req -in server.csr -CA root-ca-cert.pem -CAkey ca.key -CAcreateserial \
    -out server.pem -days 2 -extfile san.ext 2>/dev/null
ec -keyout $THING-keypair-private.pem -out thing.csr -subj "/CN=$THING"
openssl x509 -req -in thing.csr -CA root-ca-cert.pem -CAkey ca.key -CAcreateserial \
    -out $THING-certificate.pem -days 2 2>/dev/null
chmod 600 ./*.key ./*-private.pem
cd - >/dev/null
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

say "Starting mosquitto with mutual TLS on 127.0.0.1:$PORT (client certificates required)"
cat > "$DEMO/broker/mosquitto.conf" <<CONF
user root
per_listener_settings false
listener $PORT 127.0.0.1
cafile $DEMO/keys/root-ca-cert.pem
certfile $DEMO/keys/server.pem
keyfile $DEMO/keys/server.key
require_certificate true
use_identity_as_username true
allow_anonymous false
persistence true
persistence_location $DEMO/broker/
log_type error
log_type warning
log_type notice
log_type information
log_type subscribe
CONF
mosquitto -c "$DEMO/broker/mosquitto.conf" > "$DEMO/broker/log" 2>&1 9>&- &  # not the lock: an orphan would hold it
wait_until 10 "mosquitto" bash -c "echo > /dev/tcp/127.0.0.1/$PORT"

say "Writing a FlashLex-format config: $DEMO/keys/config.yml"
cat > "$DEMO/keys/config.yml" <<CONF
flashlex:
  app:
    db:
      dataPath: $DEMO/data
      expireSeconds: 3600
    socket:
      path: $DEMO/flashlexd.sock
  thing:
    name: $THING
    endpoint: localhost
    keys:
      rootCA: root-ca-cert.pem
      cert: $THING-certificate.pem
      privateKey: $THING-keypair-private.pem
    mqtt:
      ingress: {topic: ingress/$THING}
      pubsub: {topic: pubsub/$THING}
      egress: {topic: flashlex/collect}
      port: $PORT
CONF
export FLASHLEXD_SOCKET=$DEMO/flashlexd.sock
CLIENT=(-h localhost -p "$PORT" --cafile "$DEMO/keys/root-ca-cert.pem"
        --cert "$DEMO/keys/$THING-certificate.pem" --key "$DEMO/keys/$THING-keypair-private.pem")

say "Starting the daemon: flashlexd run --config $DEMO/keys/config.yml (log: $DEMO/flashlexd.log)"
"$BIN/flashlexd" run --config "$DEMO/keys/config.yml" > "$DEMO/flashlexd.log" 2>&1 9>&- &
wait_until 20 "flashlexd to connect" "$BIN/flashlexctl" status

say "The cloud sends three messages to ingress/$THING (an independent mosquitto_pub)"
for body in '{"temp": 21.5}' '{"door": "open"}' 'not JSON at all'; do
    mosquitto_pub "${CLIENT[@]}" -i demo-cloud -q 1 -t "ingress/$THING" -m "$body"
done
wait_until 10 "three stored messages" bash -c "[ \$('$BIN/flashlexctl' --json messages | '$BIN/python' -c 'import json,sys; print(len(json.load(sys.stdin)))') -ge 3 ]"

say "flashlexctl status"
"$BIN/flashlexctl" status
say "flashlexctl messages (stored durably; an application reads and acknowledges them)"
"$BIN/flashlexctl" messages

say "An application publishes to the cloud: flashlexctl publish '{\"hello\": \"cloud\"}'"
mosquitto_sub "${CLIENT[@]}" -i demo-collector -q 1 -t flashlex/collect -C 1 -W 15 > "$DEMO/received" 9>&- &
SUB_PID=$!
wait_until 10 "the cloud subscriber" grep -q "demo-collector 1 flashlex/collect" "$DEMO/broker/log"
"$BIN/flashlexctl" publish '{"hello": "cloud"}'
wait "$SUB_PID"
echo "the cloud (an independent mosquitto_sub on flashlex/collect) received: $(cat "$DEMO/received")"

say "Stopping the daemon and the broker (by PID)"
cleanup
echo "done: the store and logs are in $DEMO"
