"""`flashlexd service` output is accepted by the tools that will read it on a device."""
from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import pytest

from flashlexd.config import ConfigError
from flashlexd.configsection import Section
from flashlexd.service import render_unit, template
from flashlexd.unitplaces import read_places
from tests.broker import wait_for

FLASHLEXD = str(Path(sys.executable).parent / "flashlexd")


def service(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLASHLEXD, "service", *args], capture_output=True, text=True, timeout=30)


def test_rendered_unit_passes_systemd_analyze_verify(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text("flashlex: {}\n")
    rendered = service("--dir", str(tmp_path), "--venv", sys.prefix, "--config", str(config),
                       "--user", "root")
    assert rendered.returncode == 0 and rendered.stderr == ""
    unit = tmp_path / "flashlexd.service"
    unit.write_text(rendered.stdout)
    assert f"ExecStart={sys.prefix}/bin/flashlexd run --config {config}" in rendered.stdout
    assert "{{" not in rendered.stdout
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"})
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


@pytest.mark.skipif(not shutil.which("rsyslogd"), reason="rsyslog is installed by make test")
def test_rsyslog_rule_is_valid(tmp_path):
    rule = tmp_path / "flashlexd.conf"
    rule.write_text(service("--dir", str(tmp_path), "--rsyslog").stdout)
    check = subprocess.run(["rsyslogd", "-N1", "-f", str(rule)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "/var/log/flashlexd.log" in rule.read_text() and "stop" in rule.read_text()


DEBIAN_FILES = "$FileOwner root\n$FileGroup adm\n$FileCreateMode 0640\n$Umask 0022\n"  # /etc/rsyslog.conf
UBUNTU_FILES = "$FileOwner nobody\n$FileGroup adm\n$FileCreateMode 0640\n$Umask 0022\n" \
               "$PrivDropToUser nobody\n$PrivDropToGroup adm\n"  # its `syslog` user: here nobody


@contextlib.contextmanager
def running_rsyslogd(top: Path, log: Path,
                     files: str = DEBIAN_FILES) -> Iterator[Tuple[Callable[[str, str], None], int]]:
    """A real rsyslogd with the rule installed (writing `log`) under a distribution's defaults
    (`files`), on a socket of its own; yields `say(priority, text)`, a line as journald
    forwards the daemon's (tag `flashlexd`), and its pid. Stopped on exit."""
    rules, sock = top / "rsyslog.d", top / "log.sock"
    rules.mkdir()
    (rules / "flashlexd.conf").write_text(template("rsyslog").replace("/var/log/flashlexd.log", str(log)))
    conf = top / "rsyslog.conf"
    conf.write_text(f'module(load="imuxsock" SysSock.Use="off")\ninput(type="imuxsock" Socket="{sock}")\n'
                    f'{files}$IncludeConfig {rules}/*.conf\n')
    daemon = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(top / "pid")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, "rsyslogd's socket")
        yield (lambda priority, text: subprocess.run(
            ["logger", "-u", str(sock), "-t", "flashlexd", "-p", priority, text], check=True)), daemon.pid
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


@pytest.mark.skipif(not shutil.which("rsyslogd") or not shutil.which("logger"), reason="rsyslog is installed by make test")
def test_rsyslog_creates_the_log_file_as_logrotate_does(tmp_path):
    """The rule's action() ignored Debian's `$FileGroup adm`: /var/log/flashlexd.log began as
    root:root and became root:adm at the first rotation (logrotate's `create`), so who may read
    the log changed after a day (found by review, with a real rsyslogd). logrotate's plain
    `create` makes the new file as the old one: rsyslogd's, 0640 root adm on Debian."""
    log = tmp_path / "flashlexd.log"
    with running_rsyslogd(tmp_path, log) as (say, _):
        say("daemon.info", "ready")
        wait_for(lambda: log.exists() and "ready" in log.read_text(), 10, "the line in the log file")
    info = log.stat()
    assert (f"0{info.st_mode & 0o777:o}", pwd.getpwuid(info.st_uid).pw_name,
            grp.getgrgid(info.st_gid).gr_name) == ("0640", "root", "adm")


@pytest.mark.skipif(not shutil.which("rsyslogd") or not shutil.which("logger"), reason="rsyslog is installed by make test")
def test_the_log_file_shows_each_lines_severity(tmp_path):
    """Under systemd the daemon's lines carry their level only as the journal priority (`<3>`,
    logs.py), and the rule wrote /var/log/flashlexd.log in rsyslog's default format, which has
    none: an ERROR looked like an INFO line (found by review). The file now says it as a word."""
    log = tmp_path / "flashlexd.log"
    with running_rsyslogd(tmp_path, log) as (say, _):  # as journald forwards <3>... and <6>...
        say("daemon.err", "flashlexd[ingress]: connection refused by host:8883")
        say("daemon.info", "flashlexd: ready: 3 workers up")
        wait_for(lambda: log.exists() and "ready" in log.read_text(), 10, "both lines in the log file")
    lines = log.read_text().splitlines()
    shape = r"\S+ \S+ flashlexd(\[\d+\])?: (ERR flashlexd\[ingress\]: connection refused by host:8883" \
            r"|INFO flashlexd: ready: 3 workers up)"
    assert len(lines) == 2 and all(re.fullmatch(shape, line) for line in lines), lines


@pytest.mark.skipif(not (shutil.which("rsyslogd") and shutil.which("logger") and shutil.which("logrotate"))
                    or os.geteuid() != 0, reason="rsyslog and logrotate are installed by make test, run as root")
def test_no_line_is_lost_after_a_rotation_under_an_rsyslogd_that_drops_privileges():
    """Ubuntu's rsyslogd (and so a Pi's on Ubuntu) drops to user `syslog` in group adm, with
    /var/log root:syslog 0775. The rule forced fileOwner root and logrotate recreated the file
    `create 0640 root adm`: after the first rotation rsyslogd could not open the file and every
    line was lost (found by review). The file is now rsyslogd's own, and stays so."""
    top = Path(tempfile.mkdtemp(prefix="flashlexd-rsyslog-", dir="/tmp"))  # nobody must reach it
    try:
        top.chmod(0o755)
        logdir = top / "log"  # as Ubuntu's /var/log, with adm for the group rsyslogd drops to
        logdir.mkdir()
        os.chown(logdir, 0, grp.getgrnam("adm").gr_gid)
        logdir.chmod(0o775)
        log = logdir / "flashlexd.log"
        with running_rsyslogd(top, log, UBUNTU_FILES) as (say, rsyslogd):
            say("daemon.err", "before")
            wait_for(lambda: log.exists() and "before" in log.read_text(), 10, "the line before the rotation")
            text = template("logrotate").replace("/var/log/flashlexd.log", str(log))
            body = text[text.index("postrotate") + len("postrotate"):text.index("endscript")]  # aimed at ours
            rotate = top / "flashlexd.logrotate"  # Ubuntu's /etc/logrotate.conf says `su root adm`
            rotate.write_text("su root adm\n" + text.replace(body, f"\n        kill -HUP {rsyslogd}\n    "))
            rotated = subprocess.run(["logrotate", "-f", "-s", str(top / "state"), str(rotate)],
                                     capture_output=True, text=True, timeout=30)
            assert rotated.returncode == 0, rotated.stderr
            said = []  # rsyslogd reopens at its HUP's own pace: what it wrote before is in .1

            def reaches_the_new_file() -> bool:
                said.append(f"after {len(said)}.")
                say("daemon.err", said[-1])
                return log.exists() and "after" in log.read_text()

            wait_for(reaches_the_new_file, 10, "a line after the rotation in the new file", interval=0.2)
            rotated_out = logdir / "flashlexd.log.1"
            wait_for(lambda: all(line in log.read_text() + rotated_out.read_text() for line in said), 10,
                     "every line said after the rotation, in one file or the other")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate is installed by make test")
def test_logrotate_file_is_accepted_and_reopens_rsyslog(tmp_path):
    conf = tmp_path / "flashlexd"
    conf.write_text(service("--dir", str(tmp_path), "--logrotate").stdout)
    check = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    text = conf.read_text()
    for directive in ("daily", "rotate 7", "maxage 7", "compress", "postrotate"):
        assert directive in text


def test_install_writes_the_unit_in_place(tmp_path):
    result = service("--dir", "/opt/fx", "--user", "pi", "--install", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "etc/systemd/system/flashlexd.service"
    assert "User=pi" in unit.read_text() and oct(unit.stat().st_mode & 0o777) == "0o644"
    assert "next: systemctl enable --now flashlexd" in result.stderr
    assert result.stdout == ""


def test_install_refuses_to_switch_an_installed_unit_to_another_config(tmp_path):
    """Found by review: a second thing's --install replaced the first one's unit ("wrote ...",
    exit 0), which then started the second thing and left the first one's data dir behind."""
    root = str(tmp_path / "root")
    first = service("--dir", "/opt/fx", "--install", "--root", root)
    assert first.returncode == 0, first.stderr
    unit = tmp_path / "root/etc/systemd/system/flashlexd.service"
    installed = unit.read_text()
    again = service("--dir", "/opt/fx", "--user", "pi", "--install", "--root", root)  # the same config
    assert again.returncode == 0 and "User=pi" in unit.read_text(), again.stderr
    other = service("--dir", "/opt/fx", "--config", "/opt/fx/keys/b.yml", "--install", "--root", root)
    assert other.returncode == 2, other.stderr  # after the note that the config is not there
    assert other.stderr.splitlines()[-1].startswith(f"flashlexd: {unit} runs another config (/opt/fx/keys/config.yml);")
    assert "User=pi" in unit.read_text() and unit.read_text() != installed.replace("/config.yml", "/b.yml")
    named = tmp_path / "root/etc/systemd/system/flashlexd-b.service"  # what the refusal says to do
    assert "(--install --output /etc/systemd/system/flashlexd-NAME.service)" in other.stderr
    second = service("--dir", "/opt/fx", "--config", "/opt/fx/keys/b.yml", "--install", "--output",
                     str(named), "--root", root)
    assert second.returncode == 0 and "/opt/fx/keys/b.yml" in named.read_text(), second.stderr
    assert "next: systemctl enable --now flashlexd-b" in second.stderr  # --install took --output's name
    misnamed = service("--dir", "/opt/fx", "--config", "/opt/fx/keys/b.yml", "--install", "--output",
                       str(named.with_suffix(".unit")), "--root", root)
    assert misnamed.returncode == 2 and "a unit's name ends in .service" in misnamed.stderr, misnamed.stderr
    by_output = service("--dir", "/opt/fx", "--config", "/opt/fx/keys/b.yml", "--output", str(unit))
    assert by_output.returncode == 2 and "User=pi" in unit.read_text(), by_output.stderr  # the same file
    unit.unlink()
    assert service("--dir", "/opt/fx", "--config", "/opt/fx/keys/b.yml", "--install", "--root",
                   root).returncode == 0 and "/opt/fx/keys/b.yml" in unit.read_text()


def test_a_unit_written_without_install_says_which_dirs_it_needs_made(tmp_path):
    """A second thing's unit written with --output alone (as the README said) never started:
    its data dir outside /var/lib was not made, the sandbox kept the daemon from making it,
    and it restarted every 2 s; --install then ignored --output (found by review)."""
    data = tmp_path / "srv" / "b"
    written = _render(tmp_path, {"db": {"dataPath": str(data)}}, "--output", str(tmp_path / "b.service"))
    assert written.returncode == 0, written.stderr
    assert f"note: {data} must exist, owned by the service user, before the service starts:" \
        f" --install (with --output for this name) makes them" in written.stderr
    data.mkdir(parents=True)
    again = _render(tmp_path, {"db": {"dataPath": str(data)}}, "--output", str(tmp_path / "b.service"))
    assert again.returncode == 0 and "note:" not in again.stderr, again.stderr


def _render(tmp_path: Path, app: dict, *args: str, thing: Optional[dict] = None) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yml"
    config.write_text(json.dumps({"flashlex": {"app": app, **({"thing": thing} if thing else {})}}))  # JSON is YAML
    return service("--dir", "/opt/fx", "--config", str(config), "--user", "root", *args)


def _exposure(unit_text: str, tmp_path: Path) -> float:
    unit = tmp_path / "flashlexd.service"
    unit.write_text(unit_text)
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=60)
    line = next(l for l in out.stdout.splitlines() if "Overall exposure level" in l)
    return float(line.split(":")[1].split()[0])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
@pytest.mark.parametrize("app, args", [
    ({}, ()),
    ({"socket": {"group": "adm"}}, ()),
    ({"socket": {"allowUids": [1000]}}, ()),
    ({"db": {"dataPath": "/srv/flashlexd"}, "socket": {"path": "/srv/sock/api.sock"}}, ()),
    ({}, ("--user", "pi")),
])
def test_unit_exposure_is_at_most_2(tmp_path, app, args):
    rendered = _render(tmp_path, app, *args)
    assert rendered.returncode == 0, rendered.stderr
    score = _exposure(rendered.stdout, tmp_path)
    print(f"\nsystemd-analyze security --offline=yes: {score} for {app or 'the defaults'} {args}")
    assert score <= 2.0


def test_unit_renders_the_socket_group_without_cap_chown(tmp_path):
    unit = _render(tmp_path, {"socket": {"group": "adm"}}).stdout
    assert "Group=adm" in unit and "RuntimeDirectoryMode=0750" in unit
    assert "\nSupplementaryGroups=" not in unit and "\nCapabilityBoundingSet=\n" in unit
    other = _render(tmp_path, {"socket": {"group": "adm"}}, "--group", "root").stdout
    assert "Group=root" in other and "SupplementaryGroups=adm" in other
    assert "RuntimeDirectoryMode=0755" in other  # adm members are not in the dir's group


def test_unit_renders_allow_uids_and_paths(tmp_path):
    unit = _render(tmp_path, {"socket": {"allowUids": [1000]}}).stdout
    assert "RuntimeDirectory=flashlexd\nRuntimeDirectoryMode=0755" in unit
    assert "StateDirectory=flashlexd\nStateDirectoryMode=0700" in unit and "ReadWritePaths" not in unit
    custom = _render(tmp_path, {"db": {"dataPath": "/srv/fx/data"},
                                "socket": {"path": "/var/run/fx/api.sock"}}).stdout
    assert "ReadWritePaths=-/srv/fx/data\n" in custom and "StateDirectory" not in custom
    assert "RuntimeDirectory=fx\n" in custom and "ProtectHome=yes" in custom
    elsewhere = _render(tmp_path, {"db": {"dataPath": "/home/pi/fx"},
                                   "socket": {"path": "/srv/sock/api.sock"}}).stdout
    assert "ReadWritePaths=-/srv/sock -/home/pi/fx" in elsewhere and "RuntimeDirectory" not in elsewhere
    assert "ProtectHome=read-only" in elsewhere
    for line in ("Wants=network-online.target time-sync.target",
                 "After=network-online.target time-sync.target", "LimitNOFILE=16384",
                 "LimitCORE=0",  # a hung worker's SIGABRT must not dump the private key
                 "SystemCallFilter=@system-service", "ProtectProc=invisible"):
        assert line in unit


def test_a_state_directory_holding_the_socket_stays_passable(tmp_path):
    """systemd sets StateDirectoryMode= at every start: 0700 shut apps out of a socket placed
    inside the data dir, until the daemon opened it to 0711 again with an INFO line, start
    after start (found by review)."""
    unit = _render(tmp_path, {"db": {"dataPath": "/var/lib/fx"},
                              "socket": {"path": "/var/lib/fx/api.sock"}}).stdout
    assert "StateDirectory=fx\nStateDirectoryMode=0711\n" in unit
    inside = _render(tmp_path, {"db": {"dataPath": "/srv/fx"}, "socket": {"path": "/srv/fx/api.sock"}})
    assert "ReadWritePaths=-/srv/fx\n" in inside.stdout
    from flashlexd.service import make_directories
    from flashlexd.unitplaces import Places
    # a socket dir inside the data dir is the daemon's to make: `--install` made it first, and
    # so the data dir as its parent, root's, 0755
    data = tmp_path / "fx"
    make_directories(Places(data_dir=str(data), socket_path=str(data / "run/api.sock")), "nobody", "nogroup")
    assert (f"0{stat.S_IMODE(data.stat().st_mode):o}", pwd.getpwuid(data.stat().st_uid).pw_name) == ("0711", "nobody")
    assert not (data / "run").exists()
    os.chown(data, 0, 0)  # as a `sudo flashlexd run` leaves it: taken over as any data dir is
    make_directories(Places(data_dir=str(data), socket_path=str(data / "run/api.sock")), "nobody", "nogroup")
    assert pwd.getpwuid(data.stat().st_uid).pw_name == "nobody"
    in_state = _render(tmp_path, {"db": {"dataPath": "/var/lib/fx"}, "socket": {"path": "/var/lib/fx/run/api.sock"}})
    assert "StateDirectoryMode=0711\n" in in_state.stdout and "ReadWritePaths" not in in_state.stdout


def test_unit_refuses_a_bad_allow_uids_with_exit_2(tmp_path):
    rendered = _render(tmp_path, {"socket": {"allowUids": ["pi"]}})
    assert rendered.returncode == 2 and rendered.stdout == ""
    assert rendered.stderr == "flashlexd: flashlex.app.socket.allowUids: expected a list of numeric uids\n"


def test_unit_lets_the_daemon_read_key_files_named_anywhere(tmp_path):
    """Key files named by absolute paths (the old SDK joined names to its keys dir, so these
    worked there): under /home the unit said ProtectHome=yes, under /var/tmp PrivateTmp=yes,
    and the daemon exited 2, "key file ... is missing" (found by review, under real systemd)."""
    def unit(keys: dict) -> str:
        config = tmp_path / "config.yml"
        config.write_text(json.dumps({"flashlex": {"thing": {"keys": keys}}}))
        places, _ = read_places(config)  # rendered as if installed in /opt/fx, not /tmp
        return render_unit(venv="/opt/fx/venv", config="/opt/fx/keys/config.yml", places=places,
                           keys="/opt/fx/keys")
    assert "ProtectHome=yes" in unit({"rootCA": "/opt/fx/keys/root-ca.pem"})
    assert "PrivateTmp=yes" in unit({"rootCA": "/opt/fx/keys/root-ca.pem"})
    assert "ProtectHome=read-only" in unit({"rootCA": "/home/pi/certs/root-ca.pem"})
    assert "PrivateTmp=no" in unit({"cert": "/var/tmp/keys/cert.pem"})


@pytest.mark.parametrize("app, said", [
    ({"socket": {"path": "/run/flashlexd.sock"}},
     "flashlex.app.socket.path: /run/flashlexd.sock needs a directory of its own (e.g."
     " /run/flashlexd/flashlexd.sock): the unit cannot make /run writable"),
    ({"socket": {"path": "/var/run/flashlexd.sock"}},
     "flashlex.app.socket.path: /var/run/flashlexd.sock needs a directory of its own (e.g."
     " /run/flashlexd/flashlexd.sock): the unit cannot make /run writable"),
    ({"db": {"dataPath": "/var/lib"}},
     "flashlex.app.db.dataPath: /var/lib needs a directory of its own (e.g. /var/lib/flashlexd)"),
    # `run` refuses these with exit 2; the unit rendered ReadWritePaths=-data, -5, or a socket
    # dir under the current directory, exit 0 (found by review)
    ({"db": {"dataPath": "data"}}, "flashlex.app.db.dataPath: must be an absolute path, got 'data'"),
    ({"db": {"dataPath": 5}}, "flashlex.app.db.dataPath: must be an absolute path, got '5'"),
    ({"socket": {"path": "run/x.sock"}}, "flashlex.app.socket.path: must be an absolute path, got 'run/x.sock'"),
])
def test_unit_refuses_a_socket_or_data_dir_that_is_a_system_directory(tmp_path, app, said):
    """A socket directly in /run made the unit write `ReadWritePaths=-/run`: all of /run
    writable as root, and for another service user a bind refused for good (found by review)."""
    rendered = _render(tmp_path, app)
    assert rendered.returncode == 2 and rendered.stdout == ""
    assert rendered.stderr == f"flashlexd: {said}\n"


def test_unit_refuses_a_config_with_yaml_anchors_as_run_does(tmp_path):
    """`run` refuses anchors and aliases (exit 2); `service` rendered such a config, exit 0
    (found by review)."""
    config = tmp_path / "config.yml"
    config.write_text("flashlex:\n  app:\n    db: &where {dataPath: /var/lib/fx}\n    other: *where\n")
    rendered = service("--dir", "/opt/fx", "--config", str(config), "--user", "root")
    assert rendered.returncode == 2 and rendered.stdout == ""
    assert "anchor" in rendered.stderr and len(rendered.stderr.splitlines()) == 1, rendered.stderr


@pytest.mark.parametrize("app, holds", [
    ({"socket": {"path": "/opt/fx/keys/flashlexd.sock"}},
     "flashlex.app.socket.path: /opt/fx/keys holds the keys dir (/opt/fx/keys)"),
    ({"db": {"dataPath": "/opt/fx"}}, "flashlex.app.db.dataPath: /opt/fx holds the keys dir (/opt/fx/keys)"),
])
def test_unit_refuses_to_make_the_config_keys_or_program_writable(tmp_path, app, holds):
    """A socket beside the config (as the install's keys/ had it) put the keys dir, config and
    key files in ReadWritePaths=: writable to the daemon, against the sandbox the README
    describes (found by review)."""
    config = tmp_path / "keys" / "config.yml"
    config.parent.mkdir()
    config.write_text(json.dumps({"flashlex": {"app": app}}))
    rendered = service("--dir", "/opt/fx", "--config", str(config), "--keys-dir", "/opt/fx/keys", "--user", "root")
    assert rendered.returncode == 2 and rendered.stdout == "" and rendered.stderr.count("\n") == 1
    assert rendered.stderr.startswith(f"flashlexd: {holds}"), rendered.stderr


def test_install_takes_over_a_data_dir_a_root_run_left_after_storing_a_message(tmp_path):
    """The take-over ("holds only a store") missed space.reserve, which the first append
    makes: a data dir left by a `sudo flashlexd run` that stored anything stayed root's, and
    the service restarted for good on its lock file (found by review)."""
    import os
    import pwd
    from flashlexd import paths
    from flashlexd.service import make_directories
    from flashlexd.store import Incoming, Store
    from flashlexd.unitplaces import Places
    data = tmp_path / "data"
    paths.make_dir(data, paths.DATA_DIR_MODE)
    paths.DataDirLock(data).acquire().release()  # as `sudo flashlexd run` leaves it
    store = Store(data, 64 << 20)
    store.append([Incoming("t", b"x")])
    store.close()
    make_directories(Places(data_dir=str(data)), "nobody", "nogroup")
    nobody = pwd.getpwnam("nobody").pw_uid
    assert {name: os.stat(data / name).st_uid for name in [".", *os.listdir(data)]} == \
        {name: nobody for name in [".", *os.listdir(data)]}


@pytest.mark.parametrize("user, group", [("nobody", "nogroup"), ("flashlexd-no-such-user", "flashlexd-no-such-user")])
def test_the_units_group_is_the_users_primary_group(tmp_path, user, group):
    """`Group=nobody` for `--user nobody` named a group Debian does not have (its nobody is in
    nogroup), and systemd refuses to start such a unit (found by review)."""
    rendered = service("--dir", "/opt/fx", "--user", user)
    assert rendered.returncode == 0 and f"\nUser={user}\nGroup={group}\n" in rendered.stdout, rendered.stdout


@pytest.fixture
def open_dir():
    """A directory every user may search: pytest's own tmp dirs are under a 0700 root one."""
    made = Path(tempfile.mkdtemp(prefix="flashlexd-service-"))
    made.chmod(0o755)
    yield made
    shutil.rmtree(made)


def test_unit_for_a_user_who_cannot_read_the_config_or_a_key_file_warns(open_dir):
    """Found by review: `--user nobody` with a root-owned 0600 private key (or config) rendered a
    unit without a word; the service then exited 2 at every start. Worked out from modes and
    owners (root's too: the unit keeps no capability), one warning per file."""
    keys = open_dir / "keys"
    keys.mkdir(mode=0o755)
    config = keys / "config.yml"
    thing = {"keys": {"rootCA": "root-ca.pem", "cert": "cert.pem", "privateKey": "private.pem"}}
    config.write_text(json.dumps({"flashlex": {"thing": thing}}))
    for name in ("root-ca.pem", "cert.pem", "private.pem"):
        (keys / name).write_text("-----BEGIN DUMMY-----\n")
    (keys / "private.pem").chmod(0o600)
    os.chown(keys / "cert.pem", pwd.getpwnam("nobody").pw_uid, 0)
    (keys / "cert.pem").chmod(0o600)

    def warnings(user: str, *more: str) -> list:
        rendered = service("--dir", str(open_dir), "--venv", sys.prefix, "--user", user, *more)
        assert rendered.returncode == 0 and "\nExecStart=" in rendered.stdout, rendered.stderr
        return [line for line in rendered.stderr.splitlines() if line.startswith("warning:")]

    assert warnings("nobody") == [
        f"warning: nobody cannot read the key file {keys / 'private.pem'}: mode 0600, owner root:root;"
        " the service would not start (chown or chmod it, or give nobody a group that may read it)"]
    assert warnings("root") == [
        f"warning: root cannot read the key file {keys / 'cert.pem'}: mode 0600, owner nobody:root;"
        " the service would not start (chown or chmod it, or give root a group that may read it)"]
    for readable in (keys / "private.pem", config):  # nobody reads them through Group=root
        readable.chmod(0o640)
    assert warnings("nobody", "--group", "root") == []
    keys.chmod(0o700)
    assert [w.split(":")[1] for w in warnings("nobody")] == [
        f" nobody cannot read the {what} {path}" for what, path in
        (("config", config), *(("key file", keys / n) for n in ("root-ca.pem", "cert.pem", "private.pem")))]
    assert f"its directory {keys} is closed to it (mode 0700, owner root:root)" in warnings("nobody")[0]
    keys.chmod(0o755)
    os.chown(keys / "cert.pem", pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    (keys / "cert.pem").chmod(0o640)
    assert len(warnings("root", "--group", "root")) == 1
    config.write_text(json.dumps({"flashlex": {"app": {"socket": {"group": "nogroup"}}, "thing": thing}}))
    assert warnings("root", "--group", "root") == []  # through SupplementaryGroups=nogroup


def test_unit_for_a_user_or_group_that_does_not_exist_warns(open_dir):
    """A `socket.group` (or `--user`, `--group`) naming no account rendered and installed the
    unit without a word; systemd then failed every start with 216/GROUP before the daemon ran,
    restarting it every 2 s for good (found by review)."""
    keys = open_dir / "keys"
    keys.mkdir(mode=0o755)
    config = keys / "config.yml"

    def warnings(socket_group: str, *more: str) -> list:
        app = {"socket": {"group": socket_group}} if socket_group else {}
        config.write_text(json.dumps({"flashlex": {"app": app, "thing": {}}}))
        rendered = service("--dir", str(open_dir), "--venv", sys.prefix, *more)
        assert rendered.returncode == 0 and "\nExecStart=" in rendered.stdout, rendered.stderr
        return [line for line in rendered.stderr.splitlines() if line.startswith("warning:")]

    for socket_group, more, missing in (("flashlexd-no-such-group", ("--user", "root"), "group 'flashlexd-no-such-group'"),
                                        ("", ("--user", "flashlexd-no-such-user"), "user 'flashlexd-no-such-user'"),
                                        ("", ("--user", "root", "--group", "flashlexd-no-such-group"),
                                         "group 'flashlexd-no-such-group'")):
        assert warnings(socket_group, *more) == [
            f"warning: there is no {missing}: systemd would fail the service's every start (216/GROUP"
            " or 217/USER) and restart it every 2 s; create it before `systemctl enable --now`"], more
    assert warnings("nogroup", "--user", "root") == []
    assert warnings("", "--user", "0", "--group", "0") == []  # ids, as systemd takes them too
    assert [w.split(":")[1] for w in warnings("flashlexd-no-such-group", "--user", "flashlexd-no-such-user")] == [
        " there is no user 'flashlexd-no-such-user'", " there is no group 'flashlexd-no-such-group'"]  # both at once


def test_unit_for_a_venv_without_flashlexd_warns(open_dir):
    """The unit runs VENV/bin/flashlexd: rendered for a venv not made (DIR/venv by default),
    systemd failed every start with 203/EXEC and restarted it for good, without a word from
    `service` (found by review)."""
    keys = open_dir / "keys"
    keys.mkdir(mode=0o755)
    (keys / "config.yml").write_text(json.dumps({"flashlex": {"thing": {}}}))
    for venv, said in (((), f"{open_dir}/venv, or name the venv with --venv"),
                       (("--venv", str(open_dir / "elsewhere")), f"{open_dir}/elsewhere"),
                       (("--venv", sys.prefix), None)):
        rendered = service("--dir", str(open_dir), "--user", "root", *venv)
        assert rendered.returncode == 0 and "\nExecStart=" in rendered.stdout, rendered.stderr
        warnings = [line for line in rendered.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == ([] if said is None else [
            f"warning: there is no program {said.split(',')[0]}/bin/flashlexd: systemd would fail the"
            f" service's every start (203/EXEC) and restart it every 2 s; install flashlexd into {said}"]), venv


def test_install_takeover_does_not_follow_a_symlink_in_the_data_dir(tmp_path):
    """The take-over chowned each store file name with shutil.chown, which follows links: a
    `data.mdb -> /etc/shadow` planted by the dir's owner gave the file to the service user
    (found by the re-read)."""
    import os
    import pwd
    from flashlexd import paths
    from flashlexd.service import make_directories
    from flashlexd.unitplaces import Places
    victim = tmp_path / "victim"
    victim.write_text("root's secret")
    victim.chmod(0o600)
    data = tmp_path / "data"
    paths.make_dir(data, paths.DATA_DIR_MODE)
    os.symlink(victim, data / "data.mdb")
    os.chown(data, pwd.getpwnam("daemon").pw_uid, -1)  # another user's dir: it can plant links
    make_directories(Places(data_dir=str(data)), "nobody", "nogroup")
    assert os.stat(victim).st_uid == 0, "the link's target was chowned to the service user"


def test_install_for_a_user_not_made_yet_is_no_traceback(tmp_path, capsys):
    """`--install --user U` wrote the unit, then looked U up first thing: a KeyError traceback
    ended the install before systemd's reload, even with nothing to make (found by review)."""
    from flashlexd.service import make_directories
    from flashlexd.unitplaces import Places
    make_directories(Places(), "flashlexd-no-such-user", "flashlexd-no-such-user")  # nothing to make
    make_directories(Places(data_dir=str(tmp_path / "data")), "flashlexd-no-such-user", "nogroup")
    assert "there is no user 'flashlexd-no-such-user' yet" in capsys.readouterr().err
    make_directories(Places(data_dir=str(tmp_path / "data")), "nobody", "flashlexd-no-such-group")
    assert "there is no group 'flashlexd-no-such-group' yet" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # a LookupError from chown left it made, root's


def test_systemd_waits_longer_than_the_configured_stop_timeout(tmp_path):
    """TimeoutStopSec was 30 whatever stopTimeoutSeconds said: a longer graceful stop (the
    egress reading its PUBACKs, a worker flushing a batch) was cut by systemd's SIGKILL of the
    whole unit (noticed by review)."""
    assert "TimeoutStopSec=30\n" in _render(tmp_path, {}).stdout
    assert "TimeoutStopSec=30\n" in _render(tmp_path, {"supervisor": {"stopTimeoutSeconds": 5}}).stdout
    assert "TimeoutStopSec=80\n" in _render(tmp_path, {"supervisor": {"stopTimeoutSeconds": 59.5}}).stdout


def test_a_stop_timeout_the_unit_cannot_follow_is_refused(tmp_path):
    """`run` took a stopTimeoutSeconds of a day or more while the unit rendered the default
    TimeoutStopSec=30 for it: systemd SIGKILLed the whole unit well inside the stop budget the
    supervisor was given (found by review). The config now refuses it; the unit follows the
    largest value it takes."""
    supervisor = Section({"stopTimeoutSeconds": 86400}, "flashlex.app.supervisor", [])
    with pytest.raises(ConfigError, match=r"stopTimeoutSeconds: must be <= 86399 \(under a day.*got 86400$"):
        supervisor.value("stopTimeoutSeconds")
    assert Section({"stopTimeoutSeconds": 86399}, "flashlex.app.supervisor", []).value("stopTimeoutSeconds") == 86399
    assert "TimeoutStopSec=86419\n" in _render(tmp_path, {"supervisor": {"stopTimeoutSeconds": 86399}}).stdout


def test_unit_files_lines_without_a_priority_as_errors(tmp_path):
    """Found by review: faulthandler's stack dumps (a hung worker's SIGABRT, `systemctl kill -s
    SIGUSR1`) and the interpreter's last words carry no `<N>` prefix, and journald filed them
    at info, below `journalctl -p err`, while the README said every line carries its priority."""
    rendered = _render(tmp_path, {})
    assert rendered.returncode == 0, rendered.stderr
    service_section = rendered.stdout.split("[Service]\n")[1].split("\n[")[0].splitlines()
    assert "SyslogLevel=err" in service_section
    assert "SyslogLevelPrefix=no" not in service_section  # the daemon's own <N> prefixes still win


def test_unit_keeps_retrying_a_start_that_fails(tmp_path):
    """Found by review: a start on a full disk fails within a second, and systemd's default
    start limit (5 starts in 10 s) then left the unit failed for good, while README promises that
    the daemon starts once space is freed."""
    rendered = _render(tmp_path, {})
    assert rendered.returncode == 0, rendered.stderr
    unit_section = rendered.stdout.split("[Unit]\n")[1].split("\n[")[0].splitlines()
    assert "StartLimitIntervalSec=0" in unit_section


def test_unit_keeps_paths_with_spaces_and_percent_signs_whole(tmp_path):
    """An install dir, config and data dir with a space or a `%` in their names: ExecStart split
    the paths into several arguments (systemd ran `.../fx` and passed `--config .../fx`), and
    ReadWritePaths= made `-/srv/flash` writable and ignored `data/...` (not absolute), `%d`
    expanded as a systemd specifier (found by review)."""
    install, program = _install_dir(tmp_path / "fx 100%", {"app": {"db": {"dataPath": "/srv/flash data/100%d"}}})
    exec_start, rendered = _rendered_and_verified(install, tmp_path)
    argv = [word.replace("%%", "%") for word in shlex.split(exec_start[len("ExecStart="):])]
    assert argv == [str(program), "run", "--config", str(install / "keys" / "config.yml"),
                    "--keys-dir", str(install / "keys")]
    assert 'ReadWritePaths="-/srv/flash data/100%%d"\n' in rendered


def _install_dir(install: Path, config: dict) -> Tuple[Path, Path]:
    """An install dir as `flashlexd service --dir` reads it: a venv's program, keys/config.yml."""
    (install / "venv" / "bin").mkdir(parents=True)
    (install / "keys").mkdir()
    program = install / "venv" / "bin" / "flashlexd"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (install / "keys" / "config.yml").write_text(json.dumps({"flashlex": config}))
    return install, program


def _rendered_and_verified(install: Path, tmp_path: Path) -> Tuple[str, str]:
    """(its ExecStart line, the unit) of the unit rendered for `install`, which
    systemd-analyze verify passes without a word."""
    rendered = service("--dir", str(install), "--user", "root")
    assert rendered.returncode == 0, rendered.stderr
    unit = tmp_path / "flashlexd.service"
    unit.write_text(rendered.stdout)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"})
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    exec_start = next(line for line in rendered.stdout.splitlines() if line.startswith("ExecStart="))
    return exec_start, rendered.stdout


@pytest.mark.parametrize("where", ["a directory", "below a file"])
def test_service_output_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, where):
    """`--output` (or `--install`, run without sudo) at a place that cannot be written printed a
    Python traceback (found by review)."""
    (tmp_path / "file").write_text("")
    output = tmp_path if where == "a directory" else tmp_path / "file" / "flashlexd.service"
    rendered = service("--dir", str(tmp_path), "--output", str(output))
    assert rendered.returncode == 1 and rendered.stdout == ""
    assert "Traceback" not in rendered.stderr
    assert rendered.stderr.splitlines()[-1].startswith(f"flashlexd: cannot write {output}: ")


def test_unit_runs_a_program_whose_path_has_a_dollar_sign(tmp_path):
    """systemd expands `$VAR` (and `$$`) in ExecStart's arguments, never in the program's own
    path: `$$` there is two dollar signs, so a venv under `.../fx$1` rendered a program that
    does not exist (systemd-analyze: "is not executable")."""
    install, program = _install_dir(tmp_path / "fx$1", {})
    exec_start, _ = _rendered_and_verified(install, tmp_path)
    assert exec_start.split()[0] == f"ExecStart={program}", exec_start
    assert f" --config {str(install).replace('$', '$$')}/keys/config.yml " in exec_start  # an argument: expanded


# The release each store schema first shipped in: pip installs a wheel (or `pip install -U`)
# over an installed one only when its version differs, so a schema change released under the
# same version was silently not installed (found by review: schema 7 under 0.1.0), and the
# rollback's "upgrade flashlexd" named no version to upgrade to.
SCHEMA_RELEASES = {6: "0.1.0", 7: "0.2.0"}


def _release(version: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_a_new_store_schema_comes_with_a_new_version():
    """A schema missing here is one released under an earlier release's version."""
    import flashlexd
    from flashlexd.storebase import SCHEMA_VERSION
    assert SCHEMA_VERSION in SCHEMA_RELEASES, "record the release the new schema ships in"
    assert _release(SCHEMA_RELEASES[SCHEMA_VERSION]) <= _release(flashlexd.__version__)
    assert _release(SCHEMA_RELEASES[SCHEMA_VERSION - 1]) < _release(SCHEMA_RELEASES[SCHEMA_VERSION])


def test_a_daemon_under_a_unit_another_release_rendered_says_so(daemon_config, tmp_path):
    """Review "upgrade": an upgrade that skipped `flashlexd service --install` ran under the
    earlier unit (without `ReadOnlyPaths=/run`) with no word; the unit now carries its
    template's mark, and a start under systemd compares it with this release's."""
    from flashlexd.service import UNIT_ENV, template, template_digest
    from tests.daemon import Daemon
    current = template_digest(template("unit"))
    bare = tmp_path / "config.yml"
    bare.write_text("flashlex: {}\n")
    rendered = service("--dir", str(tmp_path), "--venv", sys.prefix, "--config", str(bare))
    assert f"\nEnvironment={UNIT_ENV}={current}\n" in rendered.stdout
    line = "<4>flashlexd: the systemd unit was not rendered by this release's `flashlexd service`"  # a WARNING
    for mark, warned in ((None, True), ("0123456789ab", True), (current, False)):
        env = {"INVOCATION_ID": "0" * 32, **({UNIT_ENV: mark} if mark else {})}
        daemon = Daemon(daemon_config, tmp_path / f"run-{mark}", env=env).start()
        try:
            daemon.wait_api()
            assert (line in daemon.log_path.read_text()) is warned, (mark, daemon.log_path.read_text())
        finally:
            daemon.stop()
