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
                 min_factor: float = 0.0):
        if kind not in ("cosine", "step", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind = kind
        self.total_iters = max(1, int(total_iters))
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = warmup_factor
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.min_factor = min_factor

    def __call__(self, it: int) -> float:
        f = 1.0
        if it < self.warmup_iters:
            a = it / self.warmup_iters
            f = self.warmup_factor * (1 - a) + a
        if self.kind == "cosine":
            span = max(1, self.total_iters - self.warmup_iters)
            p = min(1.0, max(0.0, (it - self.warmup_iters) / span))
            f *= self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * p))
        elif self.kind == "step":
            f *= self.gamma ** sum(it >= m for m in self.milestones)
        return f
