"""A worker the kernel's OOM killer takes is named so in the supervisor's line: "died (signal
SIGKILL)" left an operator under a memory limit to find the cause in the kernel's log. Run in a
memory cgroup of its own (v1 or v2, made under this process's), with a process beside the
daemon that allocates until a worker is taken (not itself: the workers' oom_score_adj is raised
to 1000, counting them as large as the whole limit; lowering the allocator's is not allowed in
every container)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.broker import INGRESS_TOPIC, Broker, publish, wait_for, write_config
from tests.daemon import Daemon, NotifyListener

LIMIT = 160 * 1024 * 1024
HOG = """
import os, sys, time
held = []
while not os.path.exists(sys.argv[1]):
    held.append(b"\\1" * (1 << 20))  # written: charged to the cgroup
    time.sleep(0.005)
"""


def _memory_cgroup() -> Path:
    """A new memory cgroup under this process's, limited to LIMIT (cgroup v1 or v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            made = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / f"flashlexd-oom-{os.getpid()}"
            made.mkdir()
            (made / "memory.limit_in_bytes").write_text(str(LIMIT))
            return made
        if hierarchy == "0" and not controllers and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            made = Path("/sys/fs/cgroup") / path.lstrip("/") / f"flashlexd-oom-{os.getpid()}"
            made.mkdir()
            (made / "memory.max").write_text(str(LIMIT))
            (made / "memory.swap.max").write_text("0")
            return made
    raise AssertionError("no memory cgroup on this machine")


@pytest.fixture
def cgroup() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("needs root: it makes a memory cgroup")
    made = _memory_cgroup()
    try:
        yield made
    finally:
        wait_for(lambda: not (made / "cgroup.procs").read_text().strip(), 10, "the cgroup emptied")
        made.rmdir()


def test_a_worker_taken_by_the_oom_killer_is_named_so(broker: Broker, tmp_path: Path, cgroup: Path) -> None:
    def join() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    config = write_config(tmp_path / "config", broker)
    daemon = Daemon(config, tmp_path, preexec=join).start()
    stop = tmp_path / "stop-allocating"
    hog = None
    try:
        workers = daemon.wait_workers()
        for pid in workers.values():
            Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(stop)], preexec_fn=join)
        wait_for(lambda: "died (signal SIGKILL" in daemon.output(), 60, "a worker killed")
        stop.touch()
        assert hog.wait(timeout=30) == 0
        line = next(line for line in daemon.output().splitlines() if "died (signal SIGKILL" in line)
        assert "died (signal SIGKILL, by the kernel's OOM killer: out of memory) after" in line, line
        assert any(f" {name} died" in line for name in workers), line
        wait_for(lambda: len(daemon.children()) == 3, 30, "the worker replaced")
        # and `status` says so: its restart count alone left the cause to the log (review "lowmem")
        shown = subprocess.run([str(Path(sys.executable).parent / "flashlexctl"), "--socket", str(daemon.socket_path),
                                "status"], capture_output=True, text=True, timeout=30)
        assert "last died " in shown.stdout and ": signal SIGKILL, by the kernel's OOM killer" in shown.stdout, shown
    finally:
        stop.touch()
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait()
        daemon.stop()


def test_a_kill_after_another_process_was_oom_killed_is_not_blamed_on_it(
        broker: Broker, tmp_path: Path, cgroup: Path) -> None:
    """The count is the cgroup's: a process of its own the OOM killer took (an app run in the
    unit, a hook) was counted to the next worker SIGKILLed by hand (found by re-read)."""
    def join() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    notify = NotifyListener(tmp_path / "notify.sock")
    config = write_config(tmp_path / "config", broker)
    daemon = Daemon(config, tmp_path, preexec=join, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        workers = daemon.wait_workers()
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(tmp_path / "never")], preexec_fn=join)
        assert hog.wait(timeout=60) == -signal.SIGKILL  # the largest, with the workers' 500 counted
        publish(broker, INGRESS_TOPIC, b"after the kill")  # the next STATUS= line says so
        wait_for(lambda: any("inbox 1" in line for _, line in notify.lines()), 15, "a status tick after it")
        os.kill(workers["egress"], signal.SIGKILL)
        line = wait_for(lambda: next((line for line in daemon.output().splitlines()
                                      if "egress died" in line), None), 15, "the death told")
        assert "died (signal SIGKILL) after" in line, line
        assert "OOM" not in daemon.output(), daemon.output()[-2000:]
    finally:
        daemon.stop()
        notify.close()


def test_the_count_is_read_from_cgroup_v2_or_v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The line above runs where this machine's cgroups are; each layout's file, here."""
    from flashlexd import oomkills
    monkeypatch.setattr(oomkills, "CGROUP_ROOT", tmp_path)
    unified = tmp_path / "system.slice" / "flashlexd.service"
    unified.mkdir(parents=True)
    (unified / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    assert oomkills._counter_file("0::/system.slice/flashlexd.service\n") == unified / "memory.events"
    v1 = "12:pids:/x\n4:memory:/system.slice/flashlexd.service\n0::/system.slice/flashlexd.service\n"
    assert oomkills._counter_file(v1) == tmp_path / "memory/system.slice/flashlexd.service/memory.oom_control"
    assert oomkills._counter_file("1:name=systemd:/\n") is None


def test_a_look_between_a_workers_kill_and_its_reap_leaves_the_kill_to_it(tmp_path: Path) -> None:
    """The supervisor's look every second took a new kill for another process's while the
    worker it had taken was still on its way out: reaped after the look, it was "died (signal
    SIGKILL)" without the OOM killer named (seen in CI). A dying worker (here a zombie, not
    reaped) keeps the kill for its reap; a live one does not (test above: another process's)."""
    from flashlexd.oomkills import OomKills, dying
    counter = tmp_path / "memory.oom_control"
    counter.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    kills = OomKills()
    kills.path, kills.seen = counter, 3
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] == "Z", 10, "a zombie")
        assert dying(zombie.pid) and not dying(live.pid)
        counter.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
        kills.look([live.pid, zombie.pid])
        assert not kills.took_one(live.pid + zombie.pid)  # another child reaped first: not its kill
        assert kills.took_one(zombie.pid)  # the reap of the zombie: its kill
        counter.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
        kills.look([live.pid])
        assert not kills.took_one(live.pid)  # taken by the look: another process's
    finally:
        live.kill()
        live.wait()
        zombie.wait()
    assert not dying(zombie.pid)  # reaped: gone
