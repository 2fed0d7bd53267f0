"""FlashLex SDK apps written the way real ones were, run unchanged against either SDK.

    python compat_apps.py old|new APP CONFIG REPORT     # APP: documented, sonoff, ticker, outage
    python compat_apps.py feed CONFIG PAYLOADS REPORT   # old SDK only: its service's store path

`old` imports `flashlexiot.sdk` (flashlexiot 0.9.16), `new` imports `flashlexd.client.compat`;
nothing else differs. Each app writes what every SDK call returned or raised to REPORT (JSON),
for tests/test_compat_side_by_side.py to compare. Runs on the old SDK's venv too: stdlib, PyYAML
and the SDK only.
"""
import datetime
import json
import os
import sys
import time

THING_ID = "349c5942-77d6-4f36-880b-1762a3b07f06"
COLLECTED = [{"foo": "bar"}, "hello", [1, 2.5, None], 3, None, {"\u00e9": "\u00fc"},
             {"when": datetime.datetime(2020, 1, 1)}, b"raw bytes"]


def load_sdk(kind):
    """The SDK module: FlashlexSDK and the module functions openFile and createToken."""
    if kind == "old":
        import flashlexiot.sdk as sdk
    else:
        import flashlexd.client.compat as sdk
    return sdk


def jwt_parts(token):
    """A JWT's header and claims (base64url JSON), without checking the signature."""
    import base64
    header, claims, _ = token.split(".")
    return [json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
            for part in (header, claims)]


def loadConfig(configFile):
    """As app.py, bootstrap.py and collectmessage.py loaded it."""
    import yaml
    with open(configFile, "r") as ymlfile:
        return yaml.load(ymlfile, Loader=yaml.FullLoader)


def outcome(call):
    """What a call gave an app: {"returned": value} or {"raised": type, "args": [...]}."""
    try:
        return {"returned": call()}
    except Exception as exc:  # the report says which exception an app would have seen
        return {"raised": type(exc).__name__, "args": [repr(a) for a in exc.args]}


def documented(module, config_path, report):
    """The calls the SDK offers, as its guide, test_base.py and collectmessage.py use them."""
    config = loadConfig(config_path)
    sdk = module.FlashlexSDK(config)
    report["openFile"] = module.openFile(config_path) == open(config_path).read()
    keys = config["flashlex"]["thing"]["keys"]
    key = module.openFile("{0}/jwt-private.pem".format(keys["path"]))  # an RSA key: RS256
    token = module.createToken(THING_ID, {"iss": "urn:thing:" + THING_ID, "exp": 4102444800}, key)
    report["createToken"] = [type(token).__name__, jwt_parts(token)]
    report["getConfig"] = sdk.getConfig()["flashlex"]["thing"]["name"]
    report["setConfig"] = outcome(lambda: sdk.setConfig(config))
    report["loadConfig"] = sdk.loadConfig(config_path) == config
    messages = sdk.getSubscribedMessages()
    report["messages"] = messages
    report["count_1"] = sdk.getSubscribedMessages(count=1)
    report["reverse"] = sdk.getSubscribedMessages(sortMessages=True, reverse=True)
    report["removed"] = [outcome(lambda m=m: sdk.removeMessageFromStore(m)) for m in messages]
    report["removed_again"] = outcome(lambda: sdk.removeMessageFromStore(messages[0]))
    report["remove_unknown_pk"] = outcome(lambda: sdk.removeMessageFromStore({"pk": "b300d03c7bd4"}))
    report["remove_without_pk"] = outcome(lambda: sdk.removeMessageFromStore({"message": {}}))
    report["after"] = sdk.getSubscribedMessages()
    report["collected"] = [outcome(lambda v=v: sdk.collectMessage(v)) for v in COLLECTED]


def sonoff(module, config_path, report):
    """A Sonoff switch controller: commands {"device", "message": on|off|stop} switch the devices
    of its own `devices:` config section and report each new state to the cloud."""
    config = loadConfig(config_path)
    devices = config["devices"]
    sdk = module.FlashlexSDK(config)
    state = {name: "off" for name in devices}
    report["applied"], report["collected"] = [], []
    deadline = time.time() + 30
    while time.time() < deadline:
        for record in sdk.getSubscribedMessages():
            command = record["message"]["payload"]["message"]
            device = record["message"]["payload"]["device"]
            report["applied"].append([device, command])
            if command == "stop":
                sdk.removeMessageFromStore(record)
                report["state"] = state
                return
            state[device] = command
            report["collected"].append(sdk.collectMessage({"device": device, "state": command,
                                                           "ip": devices[device]["ip"]}))
            sdk.removeMessageFromStore(record)
        time.sleep(0.1)  # the app's own polling pace
    raise SystemExit("sonoff: no stop command within 30 s")


def ticker(module, config_path, report):
    """An LED ticker: scrolls each message's payload as JSON text, then removes it."""
    sdk = module.FlashlexSDK(loadConfig(config_path))
    report["scrolled"] = []
    for message in sdk.getSubscribedMessages():
        report["scrolled"].append(json.dumps(message["message"]["payload"]))
        sdk.removeMessageFromStore(message)
    report["left"] = sdk.getSubscribedMessages()


def outage(module, config_path, report):
    """One SDK object through an outage: calls while the service is down, then (after the test
    restarts it and sends a message, and creates REPORT.go) the same object again."""
    sdk = module.FlashlexSDK(loadConfig(config_path))
    report["down"] = [outcome(sdk.getSubscribedMessages),
                      outcome(lambda: sdk.collectMessage({"n": 1})),
                      outcome(sdk.getSubscribedMessages)]
    go = report["_path"] + ".go"
    open(report["_path"] + ".ready", "w").close()
    deadline = time.time() + 60
    while not os.path.exists(go):
        if time.time() > deadline:
            raise SystemExit("outage: the test never said go")
        time.sleep(0.05)
    messages = sdk.getSubscribedMessages()
    report["back"] = messages
    report["back_removed"] = [outcome(lambda m=m: sdk.removeMessageFromStore(m)) for m in messages]


def feed(config_path, payloads_path, report):
    """Store messages the way the old service did: its PersistentCallbackHandler called with
    the old MQTT client's message objects (AWSIoTPythonSDK's paho, fields as its
    _handle_publish sets them: qos and retain from the header bits, ints)."""
    from AWSIoTPythonSDK.core.protocol.paho.client import MQTTMessage
    from flashlexiot.backend.callbacks import PersistentCallbackHandler
    config = loadConfig(config_path)
    handler = PersistentCallbackHandler(config)
    with open(payloads_path) as handle:
        inputs = json.load(handle)
    report["handled"] = []
    for mid, (topic, payload_hex) in enumerate(inputs, start=1):
        message = MQTTMessage()
        header = 0x30 | (1 << 1)  # PUBLISH, QoS 1, not retained
        message.dup, message.qos, message.retain = (header & 0x08) >> 3, (header & 0x06) >> 1, header & 0x01
        message.topic, message.mid, message.payload = topic, mid, bytes.fromhex(payload_hex)
        report["handled"].append(outcome(lambda: handler.handleMessage(None, None, message)))


APPS = {"documented": documented, "sonoff": sonoff, "ticker": ticker, "outage": outage}


def main(argv):
    report = {"_path": argv[-1]}
    try:
        if argv[0] == "feed":
            feed(argv[1], argv[2], report)
        else:
            APPS[argv[1]](load_sdk(argv[0]), argv[2], report)
    finally:
        path = report.pop("_path")
        with open(path, "w") as handle:
            json.dump(report, handle, default=repr)


if __name__ == "__main__":
    main(sys.argv[1:])
