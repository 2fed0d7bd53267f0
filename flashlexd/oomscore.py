"""Which of the daemon's processes the kernel's OOM killer takes first. A worker dies and is
replaced in ~0.1 s, losing nothing (its work is in the store or still with the broker); the
supervisor's death stops the whole daemon until systemd starts it again. By the kernel's own
choice the supervisor, the largest, went first (a review under a 45-60 MB memory limit: 3 of 3
runs), so each worker raises its own oom_score_adj, which any process may do."""
from __future__ import annotations

from typing import Optional

WORKER_BONUS = 500  # added to the supervisor's (inherited) value; 1000 at most
MAX_ADJ = 1000


def prefer_for_oom(bonus: int = WORKER_BONUS) -> Optional[str]:
    """Raise this process's oom_score_adj by `bonus`; why it could not be, or None."""
    try:
        with open("/proc/self/oom_score_adj", "r+", encoding="ascii") as adj:
            current = int(adj.read())
            adj.seek(0)
            adj.write(str(min(MAX_ADJ, current + bonus)))
    except (OSError, ValueError) as exc:
        return f"oom_score_adj not raised: {exc}"
    return None
