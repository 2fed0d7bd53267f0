"""Safe by construction outside systemd: directories made with explicit modes whatever the
umask, unsafe directories refused in one line (exit 1), one daemon per data dir."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from flashlexd import paths
from tests.broker import wait_for
from tests.daemon import Daemon, NotifyListener, under_the_unit
from tests.tmpfs import fill, mounted_tmpfs

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(os.stat(path).st_mode))


def run_daemon(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlexd", "run", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_make_dir_ignores_the_umask(tmp_path):
    old = os.umask(0)
    try:
        paths.make_dir(tmp_path / "a" / "b" / "data", 0o700)
    finally:
        os.umask(old)
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == oct(0o755)
    assert mode(tmp_path / "a" / "b" / "data") == oct(0o700)


@pytest.mark.parametrize("setup, expected", [
    (lambda d: d.chmod(0o770), "writable by group or others (mode 0770)"),
    (lambda d: d.chmod(0o707), "writable by group or others (mode 0707)"),
    (lambda d: os.chown(d, NOBODY, -1), f"is owned by uid {NOBODY}"),
    (lambda d: d.parent.chmod(0o777), "the directory above it"),
    (lambda d: (d.unlink() if d.is_symlink() else d.rmdir(), d.write_text("")), "is not a directory"),
])
def test_check_dir_refuses_what_others_could_change(tmp_path, setup, expected):
    directory = tmp_path / "parent" / "dir"
    paths.make_dir(directory, 0o700)
    setup(directory)
    with pytest.raises(paths.UnsafePath) as refused:
        paths.check_dir(directory, "data dir")
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_check_dir_accepts_a_sticky_world_writable_parent_and_own_dirs(tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp
    paths.make_dir(sticky / "mine", 0o700)
    paths.check_dir(sticky / "mine", "data dir")
    os.symlink(sticky / "mine", tmp_path / "link")  # judged by where it leads
    paths.check_dir(tmp_path / "link", "data dir")


def test_a_symlink_another_user_owns_is_refused_wherever_it_leads(tmp_path):
    """The daemon binds (and apps connect to) the configured path, not where a link led when it
    was checked: a link that another user owns in a sticky /tmp can be re-pointed after the
    check at that user's own socket (a reviewer captured a root client's request so, with
    fs.protected_symlinks=0). A link of ours, or one behind it, is followed one level at a time."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp
    paths.make_dir(tmp_path / "safe", 0o755)
    os.symlink(tmp_path / "safe", sticky / "theirs")
    os.lchown(sticky / "theirs", NOBODY, NOBODY)
    os.symlink("theirs", sticky / "ours")  # relative, to their link
    for path in (sticky / "theirs", sticky / "ours", sticky / "ours" / "."):
        with pytest.raises(paths.UnsafePath) as refused:
            paths.check_dir(path, "socket dir")
        assert f"{sticky / 'theirs'} is a symlink owned by uid {NOBODY}" in str(refused.value)
    os.lchown(sticky / "theirs", 0, 0)
    paths.check_dir(sticky / "ours", "socket dir")


def test_run_refuses_a_socket_dir_behind_another_users_symlink(daemon_config, tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    paths.make_dir(tmp_path / "run", 0o755)
    os.symlink(tmp_path / "run", sticky / "sock")
    os.lchown(sticky / "sock", NOBODY, NOBODY)
    done = run_daemon(daemon_config, "--socket", str(sticky / "sock" / "api.sock"))
    assert done.returncode == 1
    assert f"{sticky / 'sock'} is a symlink owned by uid {NOBODY}" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "api.sock").exists()


def test_a_start_failure_under_systemd_carries_the_error_priority(daemon_config, tmp_path):
    """Under systemd every line carries its syslog priority; the one line saying why the
    daemon cannot start had none, so journald filed it at info and `journalctl -p err -u
    flashlexd` did not show why the service was down (found by review)."""
    not_a_dir = tmp_path / "not-a-dir"
    not_a_dir.write_text("")
    done = subprocess.run([sys.executable, "-m", "flashlexd", "run", "--config", str(daemon_config),
                           "--data-dir", str(not_a_dir)], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **under_the_unit()})
    assert done.returncode == 1 and done.stderr.startswith("<3>flashlexd: cannot start:"), done.stderr
    assert all(line.startswith("<") for line in done.stderr.splitlines()), done.stderr


def test_a_socket_group_the_service_is_not_in_names_the_setting_to_render_again(daemon_config, tmp_path):
    """`socket.group` added after the install: the unit (no capabilities, not in the group)
    cannot give the socket that group, and the service restarted on "Operation not permitted"
    alone (found by review under real systemd; here setpriv drops the capabilities as the unit
    does, and INVOCATION_ID stands in for systemd)."""
    subprocess.run(["groupdel", "flashlexdpaths"], capture_output=True)  # left by a run killed mid-test
    subprocess.run(["groupadd", "--system", "flashlexdpaths"], check=True, capture_output=True)
    try:
        document = yaml.safe_load(daemon_config.read_text())
        document["flashlex"]["app"]["socket"] = {"path": str(tmp_path / "run" / "api.sock"), "group": "flashlexdpaths"}
        daemon_config.write_text(yaml.safe_dump(document))
        done = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m",
                               "flashlexd", "run", "--config", str(daemon_config)], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env={**os.environ, **under_the_unit()})
    finally:
        subprocess.run(["groupdel", "flashlexdpaths"], capture_output=True)
    assert done.returncode == 2 and "Operation not permitted" in done.stderr, done.stderr  # not restarted
    assert "not in group 'flashlexdpaths' (flashlex.app.socket.group)" in done.stderr
    assert "run `flashlexd service ... --install` again" in done.stderr, done.stderr


def test_a_data_dir_the_unit_does_not_make_writable_says_to_render_the_unit_again(daemon_config, tmp_path):
    """Under the unit, ProtectSystem=strict leaves only the directories it was rendered with
    writable: a dataPath moved since (a reload says it "takes a restart") failed every restart
    with "Read-only file system" and no word of the unit (found by review, under real systemd;
    here a read-only mount and systemd's INVOCATION_ID stand in for both)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=True)
    try:
        done = subprocess.run([sys.executable, "-m", "flashlexd", "run", "--config", str(daemon_config),
                               "--data-dir", str(read_only / "data")], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env={**os.environ, **under_the_unit()})
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    # exit 1, tried again: a disk mounted late looks the same, and exit 2 left it down (re-read 31)
    assert done.returncode == 1 and "Read-only file system" in done.stderr, done.stderr
    assert "run `flashlexd service ... --install` again" in done.stderr and done.stderr.count("\n") == 1


def test_an_existing_data_dir_the_unit_leaves_read_only_is_not_called_a_failing_disk(daemon_config, tmp_path):
    """dataPath edited to an existing directory, the unit not rendered again: its sandbox mounts
    it read-only, and the start said the SD card was failing, fsck it (re-read 30). Its file
    system is writable: the unit is named."""
    data_dir = tmp_path / "moved" / "data"
    data_dir.mkdir(parents=True, mode=0o700)
    view = tmp_path / "view"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "moved"), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        done = subprocess.run([sys.executable, "-m", "flashlexd", "run", "--config", str(daemon_config),
                               "--data-dir", str(view / "data")], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env={**os.environ, **under_the_unit()})
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert done.returncode == 1, done.stderr
    assert f"data dir {view / 'data'} is read-only here (its mount, not its disk); under systemd" in done.stderr
    assert "SD card" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("leave", [0, 4096])  # 4096: room for the lock file's pid, not LMDB's
def test_run_on_a_full_disk_says_so_in_one_line(daemon_config, tmp_path, leave):
    """`flashlexd run` with a new data dir on a full disk died with a traceback (0 bytes free:
    the pid written into the lock file it had just made found no block) or of SIGBUS with
    nothing in the log (a page free: LMDB writes its sparse lock.mdb through a memory map)
    (found by review). Now one line names the full disk, and a start after space was freed
    takes the lock."""
    with mounted_tmpfs(tmp_path / "disk", 1) as disk:
        junk = fill(disk, leave)
        done = run_daemon(daemon_config, "--data-dir", str(disk / "data"))
        junk.unlink()
        paths.DataDirLock(disk / "data").acquire().release()
    assert done.returncode == 1 and "Traceback" not in done.stderr, f"exit {done.returncode}: {done.stderr}"
    assert "cannot start" in done.stderr and "no space left on device" in done.stderr.lower(), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_run_under_umask_000_creates_every_directory_tight(daemon_config, tmp_path):
    data_dir = tmp_path / "deep" / "er" / "data"
    socket = tmp_path / "run" / "sub" / "api.sock"
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)},
                    args=("--data-dir", str(data_dir)))
    daemon.socket_path = socket
    old = os.umask(0)
    try:
        daemon.start()
    finally:
        os.umask(old)
    try:
        notify.wait_for("READY=1", timeout=15)
        assert mode(tmp_path / "deep") == mode(tmp_path / "deep" / "er") == oct(0o755)
        assert mode(data_dir) == oct(0o700)
        assert mode(tmp_path / "run") == mode(socket.parent) == oct(0o755)
        assert mode(socket) == oct(0o660)
        assert mode(data_dir / "flashlexd.lock") == oct(0o600)
        for name in os.listdir(data_dir):
            assert not os.stat(data_dir / name).st_mode & 0o077, (name, mode(data_dir / name))
    finally:
        daemon.stop()
        notify.close()


def test_run_closes_a_data_dir_restored_open_to_others(daemon_config, tmp_path):
    """Found by review: a store restored by hand (the dir 0755, data.mdb 0644) was used as it was,
    every message readable by any local user, without a word."""
    data_dir = tmp_path / "restored"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)},
                    args=("--data-dir", str(data_dir)))
    try:
        daemon.start()
        notify.wait_for("READY=1", timeout=15)
        assert mode(data_dir) == oct(0o700)
        assert f"data dir {data_dir} was open to group or others (mode 0755, 0 of its files too): closed" \
            in daemon.output()
    finally:
        daemon.stop()
        notify.close()


@pytest.mark.parametrize("mode_before", [0o755, 0o700])  # 0700: found by re-read, left shut
def test_a_data_dir_holding_the_socket_is_closed_but_stays_passable(daemon_config, tmp_path, mode_before):
    """Found by re-read: with the socket inside a data dir restored 0755 (its files 0644), closing
    the dir to others (0700) shut out every app of allowUids. Now it keeps its search bits (0711:
    no listing) and its files are closed instead."""
    from tests.test_ipc_server import run_as_nobody
    outside = Path(tempfile.mkdtemp(prefix="fx-passable-", dir="/tmp"))  # pytest's tmp is closed to nobody
    outside.chmod(0o755)
    data_dir = outside / "restored"
    data_dir.mkdir()
    data_dir.chmod(mode_before)
    (data_dir / "old.json").write_text("{}")
    (data_dir / "old.json").chmod(0o644)
    document = yaml.safe_load(daemon_config.read_text())
    document["flashlex"]["app"]["socket"] = {"allowUids": [NOBODY]}
    daemon_config.write_text(yaml.safe_dump(document))
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)},
                    args=("--data-dir", str(data_dir)))
    daemon.socket_path = data_dir / "api.sock"
    try:
        daemon.start()
        notify.wait_for("READY=1", timeout=15)
        assert (mode(data_dir), mode(data_dir / "old.json")) == (oct(0o711), oct(0o600))

        def status_as_nobody() -> str:
            from flashlexd.client import connect
            with connect(str(data_dir / "api.sock")) as fx:
                return str(fx.status()["pid"])
        assert run_as_nobody(status_as_nobody) == str(daemon.pid)
    finally:
        daemon.stop()
        notify.close()
    # moved out of it: the search bits go, and nothing is said to have been "open" (re-read)
    (tmp_path / "second").mkdir()
    notify = NotifyListener(tmp_path / "second" / "notify.sock")
    daemon = Daemon(daemon_config, tmp_path / "second", env={"NOTIFY_SOCKET": str(notify.path)},
                    args=("--data-dir", str(data_dir)))
    try:
        daemon.start()
        notify.wait_for("READY=1", timeout=15)
        assert mode(data_dir) == oct(0o700)
        assert "was open to group or others" not in daemon.output()
    finally:
        daemon.stop()
        notify.close()
        shutil.rmtree(outside)


@pytest.mark.parametrize("which", ["data dir", "socket dir"])
def test_run_refuses_a_world_writable_or_foreign_directory(daemon_config, tmp_path, which):
    data_dir, socket_dir = tmp_path / "data", tmp_path / "sock"
    for directory in (data_dir, socket_dir):
        paths.make_dir(directory, 0o700)
    target = data_dir if which == "data dir" else socket_dir
    args = ("--data-dir", str(data_dir), "--socket", str(socket_dir / "api.sock"))
    target.chmod(0o777)
    refused = run_daemon(daemon_config, *args)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.count("\n") == 1 and f"{which} {target} is writable by group or others" \
        in refused.stderr, refused.stderr
    target.chmod(0o700)
    os.chown(target, NOBODY, -1)
    refused = run_daemon(daemon_config, *args)
    assert refused.returncode == 1 and f"is owned by uid {NOBODY}" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1


def test_a_second_daemon_on_the_same_data_dir_exits_naming_the_first(daemon_config, tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    first = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        notify.wait_for("READY=1", timeout=15)
        second = run_daemon(daemon_config, "--socket", str(tmp_path / "other.sock"))
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip() == (
            f"flashlexd: cannot start: another flashlexd (pid {first.pid}) is running on data dir"
            f" {daemon_config.parent / 'data'}: stop it first, or use another --data-dir")
        assert not (tmp_path / "other.sock").exists()
        held = subprocess.run([sys.executable, "-m", "flashlexd", "store", "recover", "--data-dir",
                               str(daemon_config.parent / "data"), "--to", str(tmp_path / "new")],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert held.returncode == 1 and f"(pid {first.pid}) is running" in held.stderr
        assert first.proc.poll() is None
    finally:
        first.stop()
        notify.close()
    wait_for(lambda: first.proc.poll() is not None, 10, "the first daemon to stop")
    assert paths.holder(daemon_config.parent / "data") is None  # the lock went with it


def test_no_daemon_starts_on_a_data_dir_while_store_verify_reads_it(daemon_config, tmp_path):
    """`store verify`/`recover` asked whether a daemon held the lock, then read the file without
    holding anything: a daemon started meanwhile wrote under readers that take no LMDB slot."""
    data_dir = daemon_config.parent / "data"
    first = Daemon(daemon_config, tmp_path).start()  # a daemon ran here once: the lock file is there
    wait_for(lambda: paths.holder(data_dir) == str(first.pid), 20, "the daemon's lock")
    first.stop()
    wait_for(lambda: first.proc.poll() is not None, 10, "the daemon to stop")
    with paths.holding_off(data_dir) as running:
        assert running is None
        with pytest.raises(paths.AlreadyRunning) as refused:
            paths.DataDirLock(data_dir).acquire()
    # it named the stopped daemon's pid, left in the lock file, as running
    assert str(first.pid) not in str(refused.value) and "store verify" in str(refused.value)
    paths.DataDirLock(data_dir).acquire().release()  # free again once verify is done


def test_lock_is_not_inherited_by_workers(daemon_config, tmp_path):
    """Only the supervisor holds the lock: a worker surviving it must not keep the data dir."""
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = Daemon(daemon_config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        notify.wait_for("READY=1", timeout=15)
        lock = str(daemon_config.parent / "data" / "flashlexd.lock")
        for name, pid in daemon.children().items():
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert lock not in fds, name
        assert paths.holder(daemon_config.parent / "data") == str(daemon.pid)
    finally:
        daemon.stop()
        notify.close()


def test_config_data_path_is_checked_too(daemon_config, tmp_path):
    document = yaml.safe_load(daemon_config.read_text())
    unsafe = tmp_path / "shared"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    document["flashlex"]["app"]["db"]["dataPath"] = str(unsafe / "data")
    daemon_config.write_text(yaml.safe_dump(document))
    refused = run_daemon(daemon_config, "--socket", str(tmp_path / "api.sock"))
    assert refused.returncode == 1 and "the directory above it" in refused.stderr, refused.stderr


def test_check_fails_on_the_data_dir_run_would_refuse(daemon_config, tmp_path):
    data_dir = tmp_path / "data"
    paths.make_dir(data_dir, 0o700)
    data_dir.chmod(0o777)
    check = subprocess.run([sys.executable, "-m", "flashlexd", "check", "--config", str(daemon_config),
                            "--data-dir", str(data_dir), "--json", "--timeout", "5"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert check.returncode == 1
    store = [s for s in json.loads(check.stdout)["steps"] if s["name"] == "store"][0]
    assert store["status"] == "fail" and "writable by group or others" in store["detail"], store


def test_a_lock_file_planted_as_a_symlink_is_refused_naming_the_symlink(tmp_path):
    """The lock is opened with O_NOFOLLOW: a symlink planted in its place was refused as "Too
    many levels of symbolic links" (found by review), which names no cause a user can act on."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / paths.LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(paths.UnsafePath) as refused:
        paths.DataDirLock(data).acquire()
    assert str(refused.value) == (f"cannot open lock file {data / paths.LOCK_NAME}: it is a symlink (refused:"
                                  " whoever made it chooses what the daemon writes)")
    assert not (tmp_path / "elsewhere").exists()


def test_a_trusted_file_another_user_can_replace_is_warned_of_by_the_way_to_it(tmp_path):
    """`others_can_change` looked at the file alone (found by re-read): a root-owned key in a
    directory anyone may write (any user can replace it), or reached through a symlink another
    user owns (they can re-point it), passed in silence."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky
    key = open_dir / "key.pem"
    key.write_text("k")
    key.chmod(0o600)
    said = paths.others_can_change(key, "privateKey", 0)
    assert said == (f"privateKey {key}: the directory above it {open_dir} is writable by group or others"
                    " (mode 0777): move the file (whoever can change it controls what the daemon does)")
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    (safe / "key.pem").write_text("k")
    assert paths.others_can_change(safe / "key.pem", "privateKey", 0) is None
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "key-link.pem"
    link.symlink_to(safe / "key.pem")
    os.lchown(link, 4242, -1)
    assert paths.others_can_change(link, "privateKey", 0) == (
        f"privateKey {link}: {link} is a symlink owned by uid 4242, who could re-point it: use a path"
        " without it (whoever can change it controls what the daemon does)")
    assert paths.control_warnings([(safe / "key.pem", "privateKey"), (key, "privateKey")], 0) == [said]
