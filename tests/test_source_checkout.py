"""The daemon runs from a source checkout: it never needs `flashlexd.client`, which exists only
once installed (setup.cfg maps `client/` to it). A sitecustomize takes the editable install's
finder away, so these processes see the source tree as an uninstalled checkout does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict

from tests.broker import wait_for
from tests.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
HOOK = """\
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks
                     if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
"""
PROBE = """\
import importlib, importlib.util, pkgutil, sys
import flashlexd
assert importlib.util.find_spec("flashlexd.client") is None, "the installed mapping is visible"
for info in pkgutil.walk_packages(flashlexd.__path__, "flashlexd."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
assert not [m for m in sys.modules if m.startswith("flashlexd.client")], sorted(sys.modules)
print("imported", len([m for m in sys.modules if m.startswith("flashlexd.")]))
"""


def checkout_env(tmp_path: Path) -> Dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    return {"PYTHONPATH": f"{hook}:{ROOT}"}


def test_every_daemon_module_imports_without_the_client_package(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **checkout_env(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[1]) > 30


def test_python_m_flashlexd_run_works_from_a_source_checkout(daemon_config, tmp_path):
    daemon = Daemon(daemon_config, tmp_path / "run", env=checkout_env(tmp_path)).start()
    try:
        wait_for(lambda: "ready: 3 workers up" in daemon.output() or daemon.proc.poll() is not None,
                 20, "the daemon to be ready")
        assert "ready: 3 workers up" in daemon.output(), daemon.output()[-3000:]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(20) == 0
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.output()


def test_the_client_re_exports_the_whole_contract():
    import flashlexd.client.wire as client_wire
    import flashlexd.wire as wire
    assert sorted(client_wire.__all__) == sorted(wire.__all__)
    assert all(getattr(client_wire, name) is getattr(wire, name) for name in wire.__all__)
