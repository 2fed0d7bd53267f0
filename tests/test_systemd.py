"""The packaged unit under a real systemd (PID 1 of a private namespace): READY=1 makes the
service active, a hung supervisor is killed by the watchdog and restarted, stop is clean, and
every documented option works inside the hardened sandbox: the defaults, socket.group,
allowUids, a custom dataPath and a service user other than root."""
from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest
import yaml

from flashlexd.service import make_directories, render_unit
from flashlexd.unitplaces import read_places
from tests.broker import wait_for
from tests.systemd import RealSystemd

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/lib/systemd/systemd") or not shutil.which("unshare"),
    reason="needs root, systemd and unshare")

UNIT = "flashlexd.service"
FLASHLEXCTL = f"{sys.prefix}/bin/flashlexctl"
SOCKET = "/run/flashlexd/flashlexd.sock"
NOBODY = 65534


def _namespace_setup() -> str:
    """Private mounts for the test's systemd: its own /var/lib (the default data dir never
    touches the host's), and, when this venv's interpreter lives under /root (pyenv), /root
    replaced by a 0755 tmpfs holding only that tree, so a service user other than root can
    run it as on a device with /usr/bin/python3."""
    lines = ["mount -t tmpfs -o mode=0755 tmpfs /var/lib"]
    interpreter = os.path.realpath(sys.executable)
    if interpreter.startswith("/root/"):
        top = interpreter.split("/")[2]
        lines += ["mkdir -p /run/.host-root", "mount --bind /root /run/.host-root",
                  "mount -t tmpfs -o mode=0755 tmpfs /root", f"mkdir -p /root/{top}",
                  f"mount --bind /run/.host-root/{top} /root/{top}"]
    return "\n".join(lines)


@pytest.fixture
def start_service(tmp_path) -> Iterator[Callable[..., RealSystemd]]:
    """start(config, user=, group=, setup=, service=): the unit rendered from `config` as
    `flashlexd service` does, with a drop-in that only adapts it to the test box (no journald,
    no basic.target, the test's /tmp visible: it holds the config) plus `service` lines,
    `setup` run in the namespace first, and `--install`'s data dir."""
    started: List[RealSystemd] = []

    def start(config: Path, user: str = "root", group: str = "", setup: str = "",
              service: str = "") -> RealSystemd:
        places, _ = read_places(config)
        make_directories(places, user, group or places.socket_group or user)
        log = tmp_path / "service.log"
        drop_in = (f"[Unit]\nDefaultDependencies=no\n[Service]\nStandardOutput=append:{log}\n"
                   f"StandardError=inherit\nWatchdogSec=3\nRestartSec=1\nPrivateTmp=no\n{service}")
        unit = render_unit(venv=sys.prefix, config=str(config), user=user, group=group, places=places)
        instance = RealSystemd(tmp_path / "units", UNIT, unit, drop_in,
                               setup=_namespace_setup() + "\n" + setup)
        instance.log, instance.unit = log, unit
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.stop()


def edited(config: Path, **app: Dict) -> Path:
    """The config with the socket at its default and `app` sections merged in."""
    document = yaml.safe_load(config.read_text())
    del document["flashlex"]["app"]["socket"]  # the default: /run/flashlexd, RuntimeDirectory=
    for section, values in app.items():
        document["flashlex"]["app"].setdefault(section, {}).update(values)
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.fixture
def systemd(start_service, daemon_config):
    return start_service(edited(daemon_config))


def active(systemd: RealSystemd):
    props = systemd.show()
    return props if props.get("ActiveState") == "active" and props.get("MainPID", "0") != "0" else None


def running(systemd: RealSystemd, socket: str = SOCKET) -> Dict[str, str]:
    """Active, never restarted, both MQTT connections up (TLS and all, inside the sandbox),
    and nothing the sandbox refused in the log (a filtered system call fails with EPERM)."""
    props = wait_for(lambda: active(systemd), 30, "the service to become active")
    wait_for(lambda: _connected(systemd, socket), 30, "both MQTT connections under the unit")
    log = systemd.log.read_text(errors="replace")
    assert props["NRestarts"] == systemd.show()["NRestarts"] == "0", log
    assert "Operation not permitted" not in log and "Traceback" not in log, log
    return props


def _connected(systemd: RealSystemd, socket: str) -> bool:
    out = systemd.run(FLASHLEXCTL, "--socket", socket, "--json", "status")
    if out.returncode not in (0, 1):
        return False
    mqtt = json.loads(out.stdout)["mqtt"]
    return bool(mqtt["ingress"].get("connected") and mqtt["egress"].get("connected"))


def stat(systemd: RealSystemd, path: str) -> str:
    return systemd.run("stat", "-c", "%a %U %G", path, check=True).stdout.strip()


def ctl_as(systemd: RealSystemd, uid: int, gid: int, *groups: int, socket: str = SOCKET) -> subprocess.CompletedProcess:
    """flashlexctl status run inside the namespace as another user."""
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return systemd.run("setpriv", f"--reuid={uid}", f"--regid={gid}", *group_args, "--",
                       FLASHLEXCTL, "--socket", socket, "status")


def test_unit_becomes_active_through_ready(systemd):
    running(systemd)
    status = wait_for(lambda: systemd.show().get("StatusText", "") or None, 10, "a STATUS= line")
    assert "workers" in status
    out = systemd.run(FLASHLEXCTL, "status")
    assert out.returncode in (0, 1), out.stderr  # 1 while a worker is still connecting
    assert "ingress" in out.stdout
    assert "not rendered by this release" not in systemd.log.read_text(errors="replace")  # its own unit


def test_hung_supervisor_is_restarted_by_the_watchdog(systemd):
    first = wait_for(lambda: active(systemd), 30, "the service to become active")
    hung = _host_pid(systemd, first["MainPID"])
    os.kill(hung, signal.SIGSTOP)
    results = set()

    def restarted():
        props = systemd.show()
        results.add(props.get("Result"))
        return props if props.get("NRestarts", "0") != "0" and active(systemd) else None

    props = wait_for(restarted, 40, "a watchdog restart", interval=0.05)
    assert "watchdog" in results, results
    assert int(props["NRestarts"]) >= 1 and props["MainPID"] != first["MainPID"]
    assert not os.path.exists(f"/proc/{hung}") or "Z" in open(f"/proc/{hung}/stat").read()


def test_systemctl_stop_exits_cleanly(systemd):
    wait_for(lambda: active(systemd), 30, "the service to become active")
    result = systemd.run("systemctl", "stop", UNIT)
    assert result.returncode == 0, result.stderr
    props = systemd.show()
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", props
    assert "stopping: received SIGTERM" in systemd.log.read_text(errors="replace")


def test_systemctl_reload_fails_with_the_reason_when_the_config_is_refused(start_service, daemon_config):
    """Found by review: ExecReload was `kill -HUP`, so `systemctl reload` succeeded on a config
    the daemon refused. `flashlexd reload` waits for the outcome; the service stays up."""
    config = edited(daemon_config)
    service = start_service(config)
    first = running(service)
    good = config.read_text()
    config.write_text(good.replace("port: ", "port: abc #"))
    refused = service.run("systemctl", "reload", UNIT)
    assert refused.returncode != 0, refused
    line = "flashlexd reload: refused, still running the previous config: "
    wait_for(lambda: line in service.log.read_text(errors="replace"), 10, "the reload command's line")
    assert active(service)["MainPID"] == first["MainPID"]
    config.write_text(good)
    applied = service.run("systemctl", "reload", UNIT)
    assert applied.returncode == 0, applied.stderr
    assert service.log.read_text(errors="replace").count(line) == 1


def test_start_on_a_full_disk_retries_until_space_is_freed(start_service, daemon_config):
    """Each start on a full disk fails (exit 1) within a second: systemd's default start limit
    (5 in 10 s) stopped the retries for good, while README promises a start once space frees."""
    config = edited(daemon_config)
    data = yaml.safe_load(config.read_text())["flashlex"]["app"]["db"]["dataPath"]
    service = start_service(config, setup=f"mount -t tmpfs -o size=256k,mode=0700 tmpfs {data}\n"
                                          f"dd if=/dev/zero of={data}/filler bs=4k 2>/dev/null || true")
    props = wait_for(lambda: _gave_up_or_retried(service.show(), 7), 60, "7 restarts or a give-up")
    assert props["Result"] != "start-limit-hit" and props["ActiveState"] != "failed", props
    service.run("rm", f"{data}/filler", check=True)
    running_again = wait_for(lambda: active(service), 30, "a start once space is freed")
    assert int(running_again["NRestarts"]) >= 7
    assert "no space left on device" in service.log.read_text(errors="replace").lower()


def _gave_up_or_retried(props: Dict[str, str], restarts: int) -> Optional[Dict[str, str]]:
    failed = props["ActiveState"] == "failed" or props["Result"] == "start-limit-hit"
    return props if failed or int(props["NRestarts"]) >= restarts else None


def test_a_stop_budget_raised_after_the_unit_was_rendered_still_holds(start_service, daemon_config):
    """stopTimeoutSeconds raised in the config after the unit was rendered: systemd SIGKILLed
    the daemon at the unit's older TimeoutStopSec while it waited for a stuck worker, the unit
    ended failed (Result=timeout) and the daemon logged nothing of it (found by review)."""
    config = edited(daemon_config, supervisor={"stopTimeoutSeconds": 6})
    systemd = start_service(config, service="TimeoutStopSec=2\n")  # as rendered for a smaller budget
    wait_for(lambda: active(systemd), 30, "the service to become active")
    stuck = systemd.run("pgrep", "-f", "^flashlexd: expiry", check=True).stdout.split()
    systemd.run("kill", "-STOP", *stuck, check=True)
    result = systemd.run("systemctl", "stop", UNIT)
    props, log = systemd.show(), systemd.log.read_text(errors="replace")
    assert result.returncode == 0, result.stderr
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", (props, log)
    assert "expiry did not stop in time: killing pid" in log, log


def test_defaults_root_only_socket_and_state_directory(start_service, daemon_config):
    config = yaml.safe_load(daemon_config.read_text())
    del config["flashlex"]["app"]["db"]["dataPath"]  # the default: /var/lib/flashlexd
    daemon_config.write_text(yaml.safe_dump(config))
    service = start_service(edited(daemon_config))
    props = running(service)
    assert "StateDirectory=flashlexd" in service.unit and "ReadWritePaths" not in service.unit
    assert stat(service, "/var/lib/flashlexd") == "700 root root"
    assert service.run("test", "-f", "/var/lib/flashlexd/data.mdb").returncode == 0
    assert stat(service, "/run/flashlexd") == "750 root root"
    assert stat(service, SOCKET) == "660 root root"
    outsider = ctl_as(service, NOBODY, NOBODY)
    assert outsider.returncode == 2 and "permission denied" in outsider.stderr, outsider.stderr
    # what the sandbox leaves visible to the daemon: its own /proc entries and the boot id
    main = _host_pid(service, props["MainPID"])
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/io"):
        seen = subprocess.run(["nsenter", "-t", str(main), "-m", "-p", "cat", path],
                              capture_output=True, text=True, timeout=10)
        assert seen.returncode == 0 and seen.stdout.strip(), (path, seen.stderr)
    mounts = subprocess.run(["nsenter", "-t", str(main), "-m", "-p", "cat", "/proc/self/mountinfo"],
                            capture_output=True, text=True, timeout=10).stdout
    proc = [line for line in mounts.splitlines() if line.split()[4] == "/proc"]
    assert proc and "hidepid=invisible" in proc[-1], proc  # ProtectProc=: others' entries hidden


def test_a_socket_inside_the_state_directory_stays_reachable(start_service, daemon_config):
    """StateDirectoryMode=0700 closed a data dir holding the socket at every start, and the
    daemon opened it to 0711 again, an INFO line each time; the unit now says 0711 itself."""
    config = yaml.safe_load(daemon_config.read_text())
    del config["flashlex"]["app"]["db"]["dataPath"]  # the default: /var/lib/flashlexd
    daemon_config.write_text(yaml.safe_dump(config))
    socket = "/var/lib/flashlexd/api.sock"
    service = start_service(edited(daemon_config, socket={"path": socket, "allowUids": [NOBODY]}))
    running(service, socket)
    assert "StateDirectoryMode=0711\n" in service.unit
    assert stat(service, "/var/lib/flashlexd") == "711 root root"
    outsider = ctl_as(service, NOBODY, NOBODY, socket=socket)
    assert outsider.returncode in (0, 1) and "flashlexd" in outsider.stdout, outsider.stderr
    assert "set to 0711" not in service.log.read_text(errors="replace")


def test_a_second_unit_sharing_the_runtime_directory_leaves_the_first_ones_socket(
        start_service, daemon_config, tmp_path):
    """Found by review: two units with sockets in /run/flashlexd shared RuntimeDirectory=, and
    stopping (or a failed start of) either removed the directory with the other's socket: the
    other looked healthy while no app could reach it, and a unit given the same socket.path by
    mistake bound it at its restart and served the first one's apps as another thing."""
    service = start_service(edited(daemon_config))
    running(service)
    second = yaml.safe_load(daemon_config.read_text())
    second["flashlex"]["thing"]["name"] = "second-thing"
    second["flashlex"]["app"]["db"]["dataPath"] = str(tmp_path / "second-data")
    second["flashlex"]["app"]["socket"] = {"path": "/run/flashlexd/second.sock"}
    config = daemon_config.parent / "second.yml"
    config.write_text(yaml.safe_dump(second))
    places, _ = read_places(config)
    make_directories(places, "root", "root")
    units = service.units
    (units / "flashlexd-second.service").write_text(
        render_unit(venv=sys.prefix, config=str(config), user="root", group="", places=places))
    (units / "flashlexd-second.service.d").mkdir()
    shutil.copy(units / f"{UNIT}.d" / "test.conf", units / "flashlexd-second.service.d")
    service.run("systemctl", "daemon-reload", check=True)
    service.run("systemctl", "start", "flashlexd-second", check=True)
    wait_for(lambda: _connected(service, "/run/flashlexd/second.sock"), 30, "the second unit")
    service.run("systemctl", "stop", "flashlexd-second", check=True)
    assert service.run("test", "-S", SOCKET).returncode == 0, "the first unit's socket was removed"
    assert _connected(service, SOCKET)
    assert "RuntimeDirectoryPreserve=yes" in service.unit


@pytest.fixture
def socket_group():
    """A system group for the test; requested before `start_service`, so that it is removed
    after the service is gone."""
    name = "flashlexdtest"
    subprocess.run(["userdel", name], capture_output=True)  # left by a run killed mid-test
    subprocess.run(["groupdel", name], capture_output=True)
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    try:
        yield grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def test_socket_group_without_cap_chown(socket_group, start_service, daemon_config):
    service = start_service(edited(daemon_config, socket={"group": "flashlexdtest"}))
    running(service)
    assert "Group=flashlexdtest" in service.unit and "RuntimeDirectoryMode=0750" in service.unit
    assert stat(service, "/run/flashlexd") == "750 root flashlexdtest"
    assert stat(service, SOCKET) == "660 root flashlexdtest"
    member = ctl_as(service, NOBODY, NOBODY, socket_group)  # a member of the group: admitted
    assert member.returncode in (0, 1) and member.stdout.startswith("flashlexd "), \
        member.stdout + member.stderr
    outsider = ctl_as(service, NOBODY, NOBODY)
    assert outsider.returncode == 2 and "permission denied" in outsider.stderr, outsider.stderr


def test_socket_group_added_after_install_fails_once(socket_group, start_service, daemon_config):
    """The unit rendered before socket.group was set: the start fails with exit 2 (a config
    problem), which the unit does not restart, instead of the same line again every RestartSec."""
    config = edited(daemon_config)
    service = start_service(config)
    running(service)
    document = yaml.safe_load(config.read_text())
    document["flashlex"]["app"]["socket"] = {"group": "flashlexdtest"}
    config.write_text(yaml.safe_dump(document))
    before = len(service.log.read_text(errors="replace"))
    service.run("systemctl", "restart", UNIT)
    props = wait_for(lambda: service.show() if service.show()["ActiveState"] == "failed" else None,
                     30, "the start to fail for good")
    assert props["Result"] == "exit-code" and props["ExecMainStatus"] == "2", props
    log = service.log.read_text(errors="replace")[before:]
    assert log.count("the service is not in group 'flashlexdtest'") == 1, log


def test_systemctl_reload_refuses_a_socket_group_the_next_start_would_fail_on(socket_group, start_service,
                                                                               daemon_config):
    """Found by review: a reload setting a socket.group the service is not in was accepted in
    silence, and the next `systemctl restart` failed for good (exit 2). The reload refuses it
    now with start's reason, and the service keeps running."""
    config = edited(daemon_config)
    service = start_service(config)
    first = running(service)
    document = yaml.safe_load(config.read_text())
    document["flashlex"]["app"]["socket"] = {"group": "flashlexdtest"}
    config.write_text(yaml.safe_dump(document))
    refused = service.run("systemctl", "reload", UNIT)
    assert refused.returncode != 0, refused
    # found by re-read: it said to run --install again to an operator who had, and then reloaded
    line = ("flashlexd reload: refused, still running the previous config: the running service is not in"
            " group 'flashlexdtest' (flashlex.app.socket.group): a new socket group takes a restart, after"
            " `flashlexd service ... --install` has put the unit in it")
    wait_for(lambda: line in service.log.read_text(errors="replace"), 10, "the reload command's line")
    assert active(service)["MainPID"] == first["MainPID"]
    status = service.run(FLASHLEXCTL, "--socket", SOCKET, "status")
    assert status.returncode != 0 and "degraded" in status.stdout, status


def test_allow_uids_reach_the_socket(start_service, daemon_config):
    service = start_service(edited(daemon_config, socket={"allowUids": [NOBODY]}))
    running(service)
    assert "RuntimeDirectoryMode=0755" in service.unit
    assert stat(service, "/run/flashlexd") == "755 root root"
    assert stat(service, SOCKET) == "666 root root"  # SO_PEERCRED decides who may talk
    allowed = ctl_as(service, NOBODY, NOBODY)
    assert allowed.returncode in (0, 1) and "ingress" in allowed.stdout, allowed.stderr
    other = ctl_as(service, NOBODY - 1, NOBODY - 1)
    assert other.returncode != 0 and "may not use flashlexd" in other.stderr, other.stderr


def test_allow_uids_added_after_install_say_render_the_unit_again(start_service, daemon_config):
    """The unit rendered before allowUids were set keeps the runtime dir 0750: the reload, the
    start and the refused user's flashlexctl say that the unit must be rendered again, and once
    it is, the user gets in."""
    config = edited(daemon_config)
    service = start_service(config)
    running(service)
    document = yaml.safe_load(config.read_text())
    document["flashlex"]["app"]["socket"] = {"allowUids": [NOBODY]}
    config.write_text(yaml.safe_dump(document))
    render_again = "render the unit again (`flashlexd service ... --install`"
    service.run("systemctl", "reload", UNIT, check=True)
    wait_for(lambda: render_again in service.log.read_text(errors="replace"), 10, "the reload's line")
    before = len(service.log.read_text(errors="replace"))
    service.run("systemctl", "restart", UNIT, check=True)
    wait_for(lambda: render_again in service.log.read_text(errors="replace")[before:], 10,
             "the start's line")
    assert stat(service, "/run/flashlexd") == "750 root root"
    refused = ctl_as(service, NOBODY, NOBODY)
    assert refused.returncode == 2 and "flashlex.app.socket.allowUids" in refused.stderr \
        and "--install" in refused.stderr, refused.stderr
    places, _ = read_places(config)
    (service.units / UNIT).write_text(render_unit(venv=sys.prefix, config=str(config), places=places))
    service.run("systemctl", "daemon-reload", check=True)
    before = len(service.log.read_text(errors="replace"))
    service.run("systemctl", "restart", UNIT, check=True)
    allowed = wait_for(lambda: _admitted(ctl_as(service, NOBODY, NOBODY)), 30, "the uid let in")
    assert "ingress" in allowed.stdout
    assert render_again not in service.log.read_text(errors="replace")[before:]


def _admitted(result: subprocess.CompletedProcess) -> Optional[subprocess.CompletedProcess]:
    return result if result.returncode in (0, 1) else None


def test_the_sandbox_leaves_only_its_own_directories_writable(systemd):
    """ProtectSystem=strict with the API file systems mounted (ProtectKernelTunables= and kin)
    left /run writable: a daemon running as root could plant a unit in /run/systemd/system,
    loaded at the next daemon-reload (review "systemd")."""
    props = running(systemd)
    inside = ("nsenter", "-t", props["MainPID"], "-m", "--")
    for place in ("/run", "/run/systemd", "/etc", "/var/lib", "/usr"):
        probe = systemd.run(*inside, "touch", f"{place}/flashlexd-probe")
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, (place, probe)
    ours = systemd.run(*inside, "touch", "/run/flashlexd/probe")
    assert ours.returncode == 0, ours
    systemd.run(*inside, "rm", "/run/flashlexd/probe", check=True)


def test_custom_data_path_and_socket_dir_are_writable_in_the_sandbox(start_service, daemon_config,
                                                                    tmp_path):
    data_dir, socket = tmp_path / "custom" / "store", tmp_path / "sockets" / "api.sock"
    config = edited(daemon_config, db={"dataPath": str(data_dir)})
    document = yaml.safe_load(config.read_text())
    document["flashlex"]["app"]["socket"] = {"path": str(socket)}
    config.write_text(yaml.safe_dump(document))
    service = start_service(config)
    running(service, str(socket))
    assert f"ReadWritePaths=-{socket.parent} -{data_dir}\n" in service.unit
    assert "StateDirectory" not in service.unit and "RuntimeDirectory" not in service.unit
    status = json.loads(service.run(FLASHLEXCTL, "--socket", str(socket), "--json", "status").stdout)
    assert status["store"]["path"] == str(data_dir)
    assert (data_dir / "data.mdb").is_file() and socket.is_socket()


@pytest.fixture
def service_user() -> Iterator[str]:
    """A system user for the test; requested before `start_service`, so that it is removed
    after the service (running as it) is gone."""
    name = "flashlexdtest"
    subprocess.run(["userdel", name], capture_output=True)  # left by a run killed mid-test
    subprocess.run(["groupdel", name], capture_output=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.mark.parametrize("data_dir", ["state-directory", "left-by-root"])
def test_service_user_other_than_root(service_user, start_service, daemon_config, data_dir):
    """`flashlexd service --user U`: the daemon runs as U, systemd makes its directories U's.
    `left-by-root`: a dataPath a first `sudo flashlexd run` made (root's) was left as it was by
    `--install`, and the service restarted for good on "cannot open lock file ...: Permission
    denied" (found by review): `--install` now takes it over when it holds only a store."""
    install = Path(tempfile.mkdtemp(prefix="flashlexd-user-"))  # reachable by U, unlike tmp_path
    try:
        install.chmod(0o755)
        keys = install / "keys"
        shutil.copytree(daemon_config.parent, keys, ignore=shutil.ignore_patterns("data"))
        config = yaml.safe_load((keys / daemon_config.name).read_text())
        data = "/var/lib/flashlexd"
        if data_dir == "left-by-root":
            data = str(install / "data")
            config["flashlex"]["app"]["db"]["dataPath"] = data
            (install / "data").mkdir(mode=0o700)
            (install / "data" / "flashlexd.lock").write_text("")
        else:
            del config["flashlex"]["app"]["db"]["dataPath"]
        (keys / daemon_config.name).write_text(yaml.safe_dump(config))
        user = pwd.getpwnam(service_user)
        for path in [keys, *keys.iterdir()]:
            os.chown(path, user.pw_uid, user.pw_gid)
        service = start_service(edited(keys / daemon_config.name), user=service_user)
        props = running(service)
        assert f"User={service_user}" in service.unit
        assert stat(service, data) == f"700 {service_user} {service_user}"
        assert stat(service, SOCKET) == f"660 {service_user} {service_user}"
        main = _host_pid(service, props["MainPID"])
        uid_line = next(line for line in open(f"/proc/{main}/status") if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(user.pw_uid)] * 4
        out = service.run(FLASHLEXCTL, "status")  # root may always talk to it
        assert out.returncode in (0, 1) and "ingress" in out.stdout, out.stderr
        reload = service.run("systemctl", "reload", UNIT)  # ExecReload as U, in the sandbox
        assert reload.returncode == 0, service.log.read_text(errors="replace")
        workers = _workers(main)  # each raised its oom_score_adj, as U
        assert len(workers) == 3 and all(_oom_adj(pid) == min(1000, _oom_adj(main) + 500) for pid in workers)
    finally:
        shutil.rmtree(install, ignore_errors=True)


def _workers(pid: int) -> List[int]:
    """The supervisor's children but the fork server."""
    children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [child for child in children if b"forkserver" not in Path(f"/proc/{child}/cmdline").read_bytes()]


def _oom_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def _host_pid(systemd: RealSystemd, namespace_pid: str) -> int:
    """Translate a pid inside the namespace to the host's (from /proc/PID/status NSpid)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("NSpid:"):
                        pids = line.split()[1:]
                        if len(pids) == 2 and pids[1] == namespace_pid and _in_namespace(entry, systemd):
                            return int(entry)
        except OSError:
            continue
    raise AssertionError(f"no host pid for namespace pid {namespace_pid}")


def _in_namespace(pid: str, systemd: RealSystemd) -> bool:
    return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{systemd.pid}/ns/pid")
