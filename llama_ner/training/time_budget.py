"""A training time budget (train_minutes): the clock, the learning rate that decays over it, the stop.

    budget = TimeBudget(args.train_minutes)       # 0: no limit
    with budget.paused():                         # validation is not training time
        ...
    scheduler = budget_scheduler(optimizer, budget, warmup_steps)
    if budget.over_everywhere(): stop and save

With a budget the rate warms up over warmup_steps, then falls linearly with the share of the budget spent,
reaching 0 as time runs out: a run cut by the clock ends annealed, as a run that finishes its steps does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class TimeBudget:
    """Seconds of training spent so far (pauses excluded) against `minutes` (0: unlimited)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = float(minutes) * 60
        self.start()

    def start(self) -> None:
        """(Re)start the clock: the first training step, not model loading, starts the budget."""
        self.started = time.monotonic()
        self.paused_s = 0.0

    def spent(self) -> float:
        return time.monotonic() - self.started - self.paused_s

    def share(self) -> float:
        """The spent share of the budget, 0 to 1 (always 0 without a budget)."""
        return min(self.spent() / self.seconds, 1.0) if self.seconds else 0.0

    def over(self) -> bool:
        return bool(self.seconds) and self.spent() >= self.seconds

    def over_everywhere(self) -> bool:
        """over() by rank 0's clock, on every process: all stop at the same step (one stopping alone would hang)."""
        if not self.seconds:
            return False
        over = torch.tensor([1.0 if self.over() else 0.0])
        if torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":  # NCCL sends only GPU tensors
                over = over.cuda()
            torch.distributed.broadcast(over, src=0)
        return bool(over.item())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.paused_s += time.monotonic() - start


def budget_scheduler(
    optimizer: torch.optim.Optimizer, budget: TimeBudget, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_steps, then linear decay with the budget's spent share."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * max(0.0, 1.0 - budget.share())

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
