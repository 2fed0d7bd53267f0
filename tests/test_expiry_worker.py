"""The expiry worker against a store on a disk gone read-only (a real ext4 on a loop device)."""
from __future__ import annotations

import time
from pathlib import Path

from flashlexd.store import Incoming
from tests.broker import Broker, open_store, wait_for, write_config
from tests.tmpfs import mounted_ext4, read_only


def test_a_sweep_refused_at_every_try_is_one_line_not_one_a_sweep(broker: Broker, tmp_path: Path,
                                                                 start_worker) -> None:
    """Review "clock": on an SD card gone read-only, each sweep that had something to write
    (after a clock step, every sweep) logged an ERROR: one a sweep for as long as it lasted."""
    with mounted_ext4(tmp_path / "sd") as device:
        config = write_config(tmp_path / "config", broker, db={"dataPath": str(tmp_path / "sd" / "data"),
                                                               "expireSeconds": 10, "sweepSeconds": 0.2})
        store = open_store(config)
        try:
            store.append([Incoming("t", b"due in 2 s")], now=time.time() - 8)
            worker = start_worker("expiry", config)
            worker.wait(lambda w: "expired" in w.counters, 10, "the worker sweeping")
            Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("1")
            wait_for(lambda: read_only(tmp_path / "sd"), 10, "the remount read-only")
            worker.wait(lambda w: "expiry sweep failed" in w.log_text(), 10, "a refused sweep")
            sweeps_until = time.monotonic() + 2  # ten sweeps more, each refused
            worker.wait(lambda w: time.monotonic() > sweeps_until, 5, "more sweeps")
            assert worker.log_text().count("expiry sweep failed") == 1, worker.log_text()[-3000:]
            worker.kill()
        finally:
            store.close()
