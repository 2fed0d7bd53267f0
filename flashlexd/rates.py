"""Ingest and drain rates for `status`, from the store's running totals sampled once a second."""
from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Tuple

WINDOW = 10.0  # seconds the rates are averaged over


class RateMeter:
    def __init__(self, window: float = WINDOW):
        self.window = window
        self.samples: Deque[Tuple[float, int, int]] = deque()

    def sample(self, now: float, received: int, sent: int) -> None:
        self.samples.append((now, received, sent))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rates(self) -> Dict[str, float]:
        """Messages per second into the inbox and out of the outbox over the window."""
        if len(self.samples) < 2:
            return {"ingest_per_s": 0.0, "drain_per_s": 0.0, "window_s": 0.0}
        (t0, in0, out0), (t1, in1, out1) = self.samples[0], self.samples[-1]
        span = max(t1 - t0, 1e-9)
        return {"ingest_per_s": round((in1 - in0) / span, 1),
                "drain_per_s": round((out1 - out0) / span, 1), "window_s": round(span, 1)}
