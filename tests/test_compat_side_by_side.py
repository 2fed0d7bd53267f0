"""Old FlashLex apps side by side: the real FlashLex SDK (flashlexiot 0.9.16 from PyPI, in a
throw-away venv) and flashlexd's compat layer run the same apps (tests/compat_apps.py) on the
same inputs, and must return the same shapes: JSON, non-JSON, binary and empty payloads, unknown
pks, collectMessage encodings, and the service/daemon down and back.

The old side runs without AWS: its store is pickleDB's JSON file, fed through the old service's
own PersistentCallbackHandler with the old MQTT client's message objects; collectMessage posts
to a local HTTP server standing in for the FlashLex API. The new side is the real daemon on a
real TLS mosquitto; its collectMessage bodies are read back from the broker.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from flashlexd.client import connect
from tests.broker import EGRESS_TOPIC, INGRESS_TOPIC, Subscriber, free_port, publish, wait_for
from tests.daemon import Daemon

APPS = str(Path(__file__).with_name("compat_apps.py"))
# flashlexiot declares only `requests`; these are what its modules import, pinned as its own
# requirements.txt pinned them (pickleDB 0.9.2's rem() raises KeyError; PyJWT 1.x returns bytes,
# which createToken decodes). AWSIoTPythonSDK supplies the old MQTT client's message class.
OLD_SDK = ["flashlexiot==0.9.16", "pickleDB==0.9.2", "PyJWT==1.7.1", "PyYAML>=5.1", "cryptography",
           "AWSIoTPythonSDK==1.4.4"]
THING_ID = "349c5942-77d6-4f36-880b-1762a3b07f06"
DEVICES = {"lamp": {"ip": "192.168.1.20"}, "fan": {"ip": "192.168.1.21"}}
OUTAGE = "FlashLex SDK calls answer [] / 500"

JSON_AND_NOT = [b'{"message": "Sending a basic message...", "sequence": 151}', b"hello plain text",
                b"\xff\xfe\x00binary", b"", b'"just a string"', b"[1, 2.5, null, true]",
                b'{"\\u00e9": 1e3, "nested": {"a": [false]}}']
SONOFF = [b'{"device": "lamp", "message": "on"}', b"hello plain text", b"\x89PNG\r\n\x1a\n",
          b'{"device": "fan", "message": "on"}', b'{"device": "lamp", "message": "off"}',
          b'{"device": "lamp", "message": "stop"}']


@pytest.fixture(scope="session")
def old_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the old SDK, made once per session ($FLASHLEXD_OLD_SDK_VENV reuses one)."""
    venv = Path(os.environ.get("FLASHLEXD_OLD_SDK_VENV") or tmp_path_factory.mktemp("flashlexiot") / "venv")
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              *OLD_SDK], capture_output=True, text=True, timeout=900)
        if pip.returncode != 0:
            pytest.fail(f"cannot install the old SDK: {pip.stderr.strip()[-2000:]}")
        (venv / ".complete").touch()
    return python


class FlashlexApi(http.server.ThreadingHTTPServer):
    """The FlashLex cloud API's collect endpoint, recording what the old SDK posted."""

    def __init__(self) -> None:
        self.bodies: List[Tuple[str, bytes]] = []
        super().__init__(("127.0.0.1", 0), _Collect)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Collect(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[FlashlexApi]:
    server = FlashlexApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Side:
    """One SDK's world: its config file, how messages get in, how an app runs."""

    def __init__(self, kind: str, python: Path, config: Path, workdir: Path):
        self.kind, self.python, self.config, self.workdir = kind, python, config, workdir

    def app(self, name: str, background: bool = False):
        report = self.workdir / f"{self.kind}-{name}.json"
        env = {k: v for k, v in os.environ.items() if k != "FLASHLEXD_SOCKET"}
        argv = [str(self.python), APPS, self.kind, name, str(self.config), str(report)]
        process = subprocess.Popen(argv, env=env, cwd=self.workdir, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        if background:
            return process, report
        return finish(process, report)


def finish(process: subprocess.Popen, report: Path) -> Dict[str, Any]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, f"{report.name}: exit {process.returncode}\n{err[-3000:]}"
    result = json.loads(report.read_text())
    result["_stderr"] = err
    return result


def _document(extra: Dict[str, Any]) -> Dict[str, Any]:
    return {"devices": DEVICES, **extra}


@pytest.fixture(scope="session")
def jwt_key() -> bytes:
    """An RSA key for the old SDK's RS256 tokens (the test thing's TLS key is EC)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@pytest.fixture
def old(old_python: Path, api: FlashlexApi, jwt_key: bytes, tmp_path: Path) -> Side:
    """The old SDK's config as its app.py left it: keys.path set (-k), dataPath set (-d)."""
    workdir, keys = tmp_path / "old", tmp_path / "old" / "keys"
    keys.mkdir(parents=True)
    (workdir / "data").mkdir()
    (keys / "jwt-private.pem").write_bytes(jwt_key)
    config = workdir / "config.yml"
    config.write_text(yaml.safe_dump(_document({"flashlex": {
        "app": {"api": {"endpoint": api.endpoint, "env": "dev"}, "callback": "persistent",
                "db": {"dataPath": str(workdir / "data"), "subscriptionData": "subscription.json",
                       "expireSeconds": 60}},
        "thing": {"id": THING_ID, "name": "ecd13b11-mything",
                  "keys": {"path": str(keys), "privateKey": "jwt-private.pem"},
                  "mqtt": {"ingress": {"topic": INGRESS_TOPIC}}}}}), sort_keys=False))
    return Side("old", old_python, config, workdir)


@pytest.fixture
def new(daemon_config: Path, jwt_key: bytes, tmp_path: Path) -> Side:
    """The daemon's own config file, with the app's `devices:` section and the old SDK's keys in it."""
    workdir = tmp_path / "new"
    workdir.mkdir()
    (workdir / "jwt-private.pem").write_bytes(jwt_key)
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["thing"]["keys"]["path"] = str(workdir)
    document["flashlex"]["app"]["socket"]["path"] = str(workdir / "flashlexd.sock")
    document["flashlex"]["app"]["api"] = {"endpoint": "https://api.flashlex.com", "env": "dev"}
    document["flashlex"]["thing"]["id"] = THING_ID
    daemon_config.write_text(yaml.safe_dump(_document(document), sort_keys=False))
    return Side("new", Path(sys.executable), daemon_config, workdir)


def start_daemon(side: Side) -> Daemon:
    daemon = Daemon(side.config, side.workdir).start()
    try:
        daemon.wait_api(15)
        with connect(str(daemon.socket_path)) as fx:
            wait_for(lambda: fx.status()["mqtt"]["ingress"].get("connected")
                     and fx.status()["mqtt"]["egress"].get("connected"), 15, "both MQTT connections")
    except BaseException:
        daemon.stop()  # a daemon that never came up must not outlive the test
        raise
    return daemon


@pytest.fixture
def daemon(new: Side) -> Iterator[Daemon]:
    running = start_daemon(new)
    yield running
    running.stop()


def feed_old(side: Side, payloads: List[bytes]) -> List[Dict[str, Any]]:
    """Messages into the old store through the old service's callback; what it did with each."""
    inputs = side.workdir / "inputs.json"
    inputs.write_text(json.dumps([[INGRESS_TOPIC, p.hex()] for p in payloads]))
    report = side.workdir / "feed.json"
    process = subprocess.Popen([str(side.python), APPS, "feed", str(side.config), str(inputs), str(report)],
                               cwd=side.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finish(process, report)["handled"]


def feed_new(broker, daemon: Daemon, payloads: List[bytes]) -> None:
    """The same messages through the broker into the daemon; waits until all are stored."""
    with connect(str(daemon.socket_path)) as fx:
        before = len(fx.messages(limit=1000))
        for payload in payloads:
            publish(broker, INGRESS_TOPIC, payload)
        wait_for(lambda: len(fx.messages(limit=1000)) == before + len(payloads), 15, "all stored")


def shape(report: Dict[str, Any]) -> Dict[str, Any]:
    """The report with what legitimately differs per store replaced by its kind: each pk (also
    inside KeyError args) by its order of appearance, timestamps, datetimes and mids by type."""
    pks: Dict[str, str] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"pk", "timestamp", "datetime", "message"}:
            assert isinstance(value["pk"], str) and isinstance(value["timestamp"], float)
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", value["datetime"])
            assert type(value["message"]["mid"]) is int and type(value["message"]["retain"]) is int
            pks.setdefault(value["pk"], f"<pk {len(pks)}>")
            return {"pk": pks[value["pk"]], "timestamp": "<float>", "datetime": "<datetime>",
                    "message": {**value["message"], "mid": "<int>"}}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items() if k != "_stderr"}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            for pk, name in pks.items():
                value = value.replace(repr(pk), repr(name))
        return value
    return walk(report)


def test_documented_calls_return_the_same_shapes(old, new, daemon, broker, api, tmp_path):
    handled = feed_old(old, JSON_AND_NOT)
    assert [h.get("raised") for h in handled] == [None, "JSONDecodeError", "UnicodeDecodeError",
                                                  "JSONDecodeError", None, None, None]
    feed_new(broker, daemon, JSON_AND_NOT)
    egress = Subscriber(broker, EGRESS_TOPIC, tmp_path / "egress").start()

    was, now = old.app("documented"), new.app("documented")

    assert shape(now) == shape(was)
    assert [m["message"]["payload"] for m in now["messages"]] == [
        {"message": "Sending a basic message...", "sequence": 151}, "just a string",
        [1, 2.5, None, True], {"\u00e9": 1000.0, "nested": {"a": [False]}}]
    assert now["removed_again"]["raised"] == "KeyError" and now["after"] == []
    assert now["openFile"] is True
    assert now["createToken"] == ["str", [{"typ": "JWT", "alg": "RS256", "kid": THING_ID},
                                          {"iss": f"urn:thing:{THING_ID}", "exp": 4102444800}]]
    assert [c.get("returned") for c in now["collected"]] == [200, 200, 200, 200, 200, 200, 500, 500]
    # the bytes the cloud got: the old SDK's HTTP body, flashlexd's MQTT payload
    sent = wait_for(lambda: (lambda lines: lines if len(lines) == 6 else None)(egress.lines()), 20,
                    "six collected messages on the egress topic")
    assert sent == [body for _, body in api.bodies]
    assert {path for path, _ in api.bodies} == {f"/dev/v1/things/{THING_ID}/collect"}
    # the non-JSON messages stay in the inbox for native clients
    with connect(str(daemon.socket_path)) as fx:
        assert [m.payload for m in fx.messages()] == [b"hello plain text", b"\xff\xfe\x00binary", b""]


def test_a_sonoff_app_runs_past_non_json_and_binary_messages(old, new, daemon, broker, api, tmp_path):
    feed_old(old, SONOFF)
    feed_new(broker, daemon, SONOFF)
    was, now = old.app("sonoff"), new.app("sonoff")
    assert shape(now) == shape(was)
    assert now["applied"] == [["lamp", "on"], ["fan", "on"], ["lamp", "off"], ["lamp", "stop"]]
    assert now["state"] == {"lamp": "off", "fan": "on"} and now["collected"] == [200, 200, 200]
    # the app's own `devices:` section: warned about once by the app's SDK and by `flashlexd run`
    assert now["_stderr"].count("devices: unknown top-level section, ignored") == 1
    assert daemon.output().count("devices: unknown top-level section, ignored") == 1


def test_an_led_ticker_scrolls_the_same_text(old, new, daemon, broker):
    feed_old(old, JSON_AND_NOT)
    feed_new(broker, daemon, JSON_AND_NOT)
    was, now = old.app("ticker"), new.app("ticker")
    assert shape(now) == shape(was)
    assert now["scrolled"] == ['{"message": "Sending a basic message...", "sequence": 151}',
                               '"just a string"', "[1, 2.5, null, true]",
                               '{"\\u00e9": 1000.0, "nested": {"a": [false]}}']
    assert now["left"] == []


def test_service_down_and_back_gives_the_same_answers_to_the_same_object(old, new, broker):
    # old: the service stopped (its store file absent) and the FlashLex API unreachable
    document = yaml.safe_load(old.config.read_text())
    document["flashlex"]["app"]["api"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
    old.config.write_text(yaml.safe_dump(document, sort_keys=False))
    reports = {}
    for side in (old, new):
        process, report = side.app("outage", background=True)
        wait_for(lambda: Path(f"{report}.ready").exists() or process.poll() is not None, 30,
                 f"{side.kind}: the app's calls while down")
        if side is old:
            feed_old(old, [SONOFF[0]])
        else:
            daemon = start_daemon(new)
            feed_new(broker, daemon, [SONOFF[0]])
        Path(f"{report}.go").touch()
        try:
            reports[side.kind] = finish(process, report)
        finally:
            if side is new:
                daemon.stop()
    was, now = reports["old"], reports["new"]
    assert shape(now) == shape(was)
    assert now["down"] == [{"returned": []}, {"returned": 500}, {"returned": []}]
    assert [r["message"]["payload"] for r in now["back"]] == [{"device": "lamp", "message": "on"}]
    assert now["_stderr"].count(OUTAGE) == 1, now["_stderr"]
