"""`make demo`, the README's first command, works and leaves nothing running."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(Path(sys.prefix) != ROOT / ".venv", reason="the demo uses the repo's .venv (make test)")
def test_demo_shows_messages_flowing_both_ways_and_stops_everything():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not JSON at all" in result.stdout  # stored and listed by flashlexctl messages
    assert 'received: {"hello": "cloud"}' in result.stdout
    leftovers = subprocess.run(["pgrep", "-f", str(ROOT / ".demo")], capture_output=True, text=True)
    assert leftovers.stdout == ""
