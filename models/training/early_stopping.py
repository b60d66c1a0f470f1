"""Stop when the monitored metric stops improving; remember the best epoch."""

from __future__ import annotations

import math

MAXIMISED = ("accuracy", "map")  # metric names ending so are better higher; losses lower


def maximised(metric: str) -> bool:
    return metric.endswith(MAXIMISED)


class EarlyStopping:
    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0) -> None:
        self.mode = "max" if maximised(monitor) else "min"
        self.patience, self.min_delta = patience, min_delta
        self.best: float = -math.inf if self.mode == "max" else math.inf
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; True when it is the new best."""
        better = (value > self.best + self.min_delta if self.mode == "max"
                  else value < self.best - self.min_delta)
        if better or self.best_epoch is None:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def restart(self) -> None:
        """Forget the best so far: the next value is the new best (a new stage whose metric
        is not comparable with the last one's)."""
        self.best = -math.inf if self.mode == "max" else math.inf
        self.best_epoch, self.bad_epochs = None, 0

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
