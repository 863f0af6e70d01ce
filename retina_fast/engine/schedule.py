"""Learning-rate schedules as picklable callables for ``LambdaLR`` (so ``--resume`` restores them).

Both start with a linear warmup from ``warmup_factor`` to 1 over ``warmup_iters`` iterations
(torchvision's reference recipe). ``cosine`` then decays to ``min_factor`` at ``total_iters``;
``step`` multiplies by ``gamma`` at each milestone iteration. ``total_iters`` may be changed
while training (the time-budgeted demo re-estimates it from the measured speed).
"""

from __future__ import annotations

import math


class WarmupSchedule:
    def __init__(self, kind: str, total_iters: int, warmup_iters: int = 0,
                 warmup_factor: float = 0.001, milestones=(), gamma: float = 0.1,
                 min_factor: float = 0.0, max_warmup_frac: float | None = None):
        if kind not in ("cosine", "step", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind = kind
        self.total_iters = max(1, int(total_iters))
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = warmup_factor
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.min_factor = min_factor
        # Time-budgeted runs do not know their length in advance: cap the warmup at this
        # fraction of the (re-estimated) total, so a short budget still reaches the peak lr.
        self.max_warmup_frac = max_warmup_frac

    def _warmup(self) -> int:
        if self.max_warmup_frac is None:
            return self.warmup_iters
        return min(self.warmup_iters, int(self.max_warmup_frac * self.total_iters))

    def __call__(self, it: int) -> float:
        f = 1.0
        warmup = self._warmup()
        if it < warmup:
            a = it / warmup
            f = self.warmup_factor * (1 - a) + a
        if self.kind == "cosine":
            span = max(1, self.total_iters - warmup)
            p = min(1.0, max(0.0, (it - warmup) / span))
            f *= self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * p))
        elif self.kind == "step":
            f *= self.gamma ** sum(it >= m for m in self.milestones)
        return f
