"""What the daemon does not load or keep, to stay small (README, Processes and memory): paho
without urllib.request (http.client, email), no concurrent.futures, no shutil; threads share
one malloc arena; a name lookup's thread ends with it. Fresh interpreters, real threads."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from flashlexd.dialer import Lookup
from flashlexd.mallocs import QuietTrim

NOT_LOADED = ("urllib.request", "http.client", "email.message", "concurrent.futures", "shutil")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)


def test_the_daemons_imports_leave_out_what_no_process_uses():
    out = run("import sys\n"
              "import flashlexd.cli, flashlexd.supervisor\n"
              "from flashlexd import forkworker\n"
              "forkworker.preload()\n"
              f"print([m for m in {NOT_LOADED!r} if type(sys.modules.get(m)).__name__ == 'module'])").stdout
    assert out.strip() == "[]"


def test_urllib_request_is_the_real_module_once_used():
    out = run("import flashlexd.mqttclient, paho.mqtt.client as paho\n"
              "from urllib.request import getproxies\n"
              "import urllib.request, sys\n"
              "print(callable(getproxies), paho.urllib.request is sys.modules['urllib.request'],"
              " type(urllib.request).__name__, 'http.client' in sys.modules)").stdout
    assert out.split() == ["True", "True", "module", "True"]


@pytest.mark.parametrize("one_arena, arenas", [(True, 0), (False, 1)])
def test_threads_share_the_main_malloc_arena(one_arena: bool, arenas: int):
    out = run("import ctypes, threading\n"
              "from flashlexd import mallocs\n"
              f"assert mallocs.one_arena() if {one_arena} else True\n"
              "thread = threading.Thread(target=lambda: [bytearray(2000) for _ in range(2000)])\n"
              "thread.start(); thread.join()\n"
              "ctypes.CDLL(None).malloc_stats()")
    assert out.stderr.count("Arena 1:") == arenas, out.stderr


def wait_done(lookup: Lookup) -> None:
    deadline = time.monotonic() + 30
    while not lookup.done():
        assert time.monotonic() < deadline, "lookup still running"
        time.sleep(0.01)


def test_a_lookup_answers_and_its_thread_ends():
    lookup = Lookup("127.0.0.1", 8883)
    wait_done(lookup)
    assert ("127.0.0.1", 8883) in [address[4] for address in lookup.result()]
    assert not lookup._thread.is_alive()


def test_a_failed_lookup_raises_its_error():
    lookup = Lookup("no-such-host.invalid", 8883)
    wait_done(lookup)
    with pytest.raises(socket.gaierror):
        lookup.result()


def test_the_heap_is_trimmed_once_after_a_quiet_second_following_traffic():
    quiet = QuietTrim(now=100.0)
    assert quiet.tick(100.4) == pytest.approx(0.6)  # start-up's garbage: trimmed once quiet
    quiet.busy(100.5)
    assert quiet.tick(101.2) == pytest.approx(0.3)
    assert quiet.tick(101.5) == float("inf") and not quiet.pending  # trimmed
    assert quiet.tick(500.0) == float("inf")  # nothing new to give back
    quiet.busy(500.0)
    assert quiet.pending and quiet.tick(500.5) == pytest.approx(0.5)
