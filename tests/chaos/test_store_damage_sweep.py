"""Every page of a real store damaged in turn, used the way the daemon uses it, then verified
and recovered (tests/damage.py: a subprocess that forks a child per case, so a SIGBUS or
SIGSEGV is a recorded outcome, not pytest's death). Short: 1 seed per page of a 400-message
store; full (make chaos): 6 seeds per page of a 3,000-message store."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from tests.chaos.conftest import chaos_timeout, scale
from tests.chaos.results import Result

REPO = Path(__file__).resolve().parent.parent.parent
SEEDS = scale(1, 6)
MESSAGES = scale(400, 3000)


def damage_outcomes(tmp_path: Path, seeds: int, patterns: str) -> List[dict]:
    run = subprocess.run([sys.executable, "-m", "tests.damage", str(tmp_path), str(seeds), patterns,
                          str(MESSAGES)], capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def summary(outcomes: List[dict]) -> Dict[str, int]:
    """Outcome -> cases: refused (at open), read_only (damage met in use), unnoticed (a page
    nothing read), crash_SIGSEGV...; verify_flagged and recovered count the tools' verdicts."""
    counts: Dict[str, int] = {}
    for case in outcomes:
        kind = case.get("error") or case["daemon"].split(":")[0]
        kind = {"damaged": "read_only", "ok": "unnoticed"}.get(kind, kind).replace(":", "_")
        counts[kind] = counts.get(kind, 0) + 1
    counts["refused_at_start"] = sum(1 for c in outcomes if c.get("start", "").startswith("refused"))
    counts["verify_flagged"] = sum(1 for c in outcomes if c.get("verify", "ok") != "ok")
    counts["recovered"] = sum(1 for c in outcomes if (c.get("recover") or [""])[-1]
                              == "recovered store verifies")
    return counts


@chaos_timeout(300, 1800)
def test_every_page_garbled_or_rotted_and_truncations_are_refusals_or_survived(tmp_path):
    """Every page of a real store overwritten with garbage, and separately with 8 flipped
    bytes (SEEDS seeds each), and three truncations: each outcome is a one-line refusal, a store
    gone read-only, or nothing noticed (a page nothing read); never a crash or a traceback.
    verify flags every damage the daemon met, and recover always writes a store that
    verifies."""
    result = Result("store damage: garbage pages, flipped bytes, truncations")
    outcomes = damage_outcomes(tmp_path, SEEDS, "garbled,rotted")
    result.set(tried=len(outcomes), **summary(outcomes)).emit()
    assert len(outcomes) > 100 * SEEDS  # both patterns on every page (over 50), SEEDS times
    for case in outcomes:
        assert not {"error", "start_error", "tools_error"} & set(case), case  # crash or traceback
        assert case["start"] == "ok" or case["start"].endswith("see flashlexd store recover"), case
        daemon = case["daemon"]
        kind = daemon.split(":")[0]
        assert kind in ("refused", "damaged", "ok"), case
        if kind != "ok":
            assert "\n" not in daemon and " is damaged: " in daemon, case
            assert case["verify"] != "ok", case  # what the daemon met, verify finds
        if kind == "refused":
            assert daemon.endswith("see flashlexd store recover"), case
        assert case["recover"][-1] == "recovered store verifies", case
    truncated = [c for c in outcomes if c["case"].startswith("truncated")]
    assert [c["daemon"].split(":")[0] for c in truncated] == ["refused"] * 3


@chaos_timeout(300, 1800)
def test_garbage_under_an_intact_page_header_never_sigbus(tmp_path):
    """The hardest case: a page's header left intact and the rest garbage, so LMDB's page
    checks pass and it follows the garbage. Present at the start, `run` refuses it (it reads
    every page first). Appearing while the store is in use: no SIGBUS (data.mdb is backed as
    far as the map reaches), no traceback; LMDB itself can still crash on some garbage nodes
    (SIGSEGV): those stay rare, `run` refuses each of them at the next start, `store verify`
    names them and `recover` rescues the rest."""
    result = Result("store damage: garbage under an intact page header")
    outcomes = damage_outcomes(tmp_path, SEEDS, "body-garbled")
    result.set(tried=len(outcomes), **summary(outcomes)).emit()
    crashed = [case for case in outcomes if "error" in case]
    for case in crashed:  # damage appearing after the start; `run` refuses it at the start
        assert case["error"] == "crash:SIGSEGV" and case["verify"] != "ok", case
        assert case["start"].startswith("refused"), case
    assert len(crashed) <= len(outcomes) // 20, summary(outcomes)
    for case in outcomes:
        assert "start_error" not in case and "tools_error" not in case, case
        assert case["recover"][-1] == "recovered store verifies", case
        if "error" not in case:
            assert case["daemon"].split(":")[0] in ("refused", "damaged", "ok"), case
