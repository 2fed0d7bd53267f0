"""Shared fixtures. Real processes only, each stopped by PID at teardown."""
from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest
import yaml

from tests.broker import THING, Broker, Certs, make_certs, write_config
from tests.rabbitmq import RabbitBroker, available
from tests.worker_process import WorkerUnderTest

# Tests that share something expensive or singular run on one xdist worker (`make test` runs
# the suite on two, `--dist loadgroup`): the session's RabbitMQ node, real systemd, the demo, and the
# modules whose module- or session-scoped fixtures would otherwise be built once per worker.
_GROUPED_MODULES = {"test_systemd": "systemd", "test_clock_steps": "clock_steps",
                    "test_ipc_fuzz": "ipc_fuzz", "test_compat_side_by_side": "compat",
                    "test_demo": "demo"}  # one demo at a time in a checkout (scripts/demo.sh)


def _group_of(item: pytest.Item) -> Optional[str]:
    params = getattr(item, "callspec", None)
    if "rabbitmq" in item.fixturenames or (params and params.params.get("any_broker") == "rabbitmq"):
        return "rabbitmq"
    return _GROUPED_MODULES.get(item.module.__name__.rsplit(".", 1)[-1])


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        group = _group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        if item.get_closest_marker("alone") is not None:
            _time_the_test_only(config, item)


def _time_the_test_only(config: pytest.Config, item: pytest.Item) -> None:
    """An `alone` test first waits (in `_machine_share`) for the other workers' tests to end,
    which at full size may be the 16-minute damage sweep: its timeout covers the test itself,
    not that wait (a full chaos run timed one out so, at 900 s, still measuring)."""
    marker = item.get_closest_marker("timeout")
    seconds = marker.args[0] if marker is not None and marker.args else float(config.getini("timeout"))
    item.add_marker(pytest.mark.timeout(seconds, func_only=True))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "alone: a test that measures a rate ratio on the whole"
                            " machine runs with no other test beside it (the other xdist workers wait)")


@pytest.fixture(autouse=True)
def _machine_share(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests hold a shared lock on a file every xdist worker of the run sees; a test marked
    `alone` holds it exclusively, so it starts once the other workers' tests are done and they
    start their next only after it. Without xdist it is uncontended.

    flock favours no one: the other workers' tests, one after another, kept the shared lock
    taken, and an `alone` test waited 423 s for a gap, its worker idle (a 9 min 53 s suite
    that took 7 min 48 s when it was lucky). So every test passes a gate first, and an `alone`
    test holds the gate while it waits and runs: the others start nothing new meanwhile."""
    base = tmp_path_factory.getbasetemp().parent
    with open(base / "machine-gate.lock", "a") as gate, open(base / "machine-share.lock", "a") as share:
        alone = request.node.get_closest_marker("alone") is not None
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(share, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(share, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under `--dist loadgroup`, xdist must have put the test's group into the node id it
    schedules by: otherwise two workers would start RabbitMQ or systemd side by side."""
    if getattr(item.config.option, "loadgroup", False) and _group_of(item) and "@" not in item.nodeid:
        pytest.fail(f"pytest-xdist did not group {item.nodeid}: a pytest release it does not"
                    f" support? (setup.cfg pins pytest)", pytrace=False)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throw-away CA, server and thing certificates, and a stranger from another CA."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(certs: Certs, tmp_path: Path) -> Iterator[Broker]:
    """A fresh mutual-TLS mosquitto per test (it starts in a few ms, and tests kill it)."""
    running = Broker(certs, tmp_path / "broker").start()
    yield running
    running.close()


@pytest.fixture(scope="session")
def rabbitmq(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitBroker]:
    """One RabbitMQ node per session (it takes ~5-10 s to start); see tests/rabbitmq.py."""
    if not available():
        pytest.fail("rabbitmq-server is not installed: run `make deps`")
    node = RabbitBroker(certs, tmp_path_factory.mktemp("rabbitmq")).start()
    yield node
    node.close()


RABBIT_CLIENTS = [THING, f"{THING}-egress", "test-pub", "test-sub", "chaos-acked-pub"]


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def any_broker(request: pytest.FixtureRequest, certs: Certs, tmp_path: Path) -> Iterator[Any]:
    """Each real broker in turn: a fresh mosquitto, or the session's RabbitMQ node, which is
    left running with no session of this test's clients."""
    if request.param == "mosquitto":
        running = Broker(certs, tmp_path / "broker").start()
        yield running
        running.close()
        return
    node: RabbitBroker = request.getfixturevalue("rabbitmq")
    if not node.running:
        node.start()
    # also before: a test that took the session's node as `rabbitmq` (test_mqtt5, test_ingress,
    # test_check) does not forget its sessions, so THING's queue may still be bound to the
    # ingress topic and hold what was published since (a `flashlexd check` probe)
    node.forget(RABBIT_CLIENTS)
    yield node
    node.end_peers()
    if not node.running:
        node.start()
    node.forget(RABBIT_CLIENTS)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[str, Path], WorkerUnderTest]]:
    """Start a worker process: `start_worker("ingress", config_path)`; all killed at teardown."""
    started: List[WorkerUnderTest] = []

    def start(name: str, config: Path) -> WorkerUnderTest:
        worker = WorkerUnderTest(name, config, tmp_path / f"{name}.log").start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def daemon_config(broker, tmp_path) -> Path:
    """A FlashLex config for the test broker with supervision tuned for tests: heartbeats every
    0.2 s, a hung worker noticed after 3 s."""
    path = write_config(tmp_path / "etc", broker)
    document = yaml.safe_load(path.read_text())
    document["flashlex"]["app"]["supervisor"] = {
        "heartbeatSeconds": 0.2, "heartbeatTimeoutSeconds": 3, "stopTimeoutSeconds": 5,
        "restartBackoffMaxSeconds": 2, "crashLoopRestarts": 4, "crashLoopWindowSeconds": 30}
    document["flashlex"]["thing"]["mqtt"]["keepalive"] = 30
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path
