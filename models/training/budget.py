"""The time budget a run plans within: from the spec, else the preset, capped by the job's
run-time limit. Runs end with their best weights when it is spent, never with a failure."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ftune.models.recipe import rules
from ftune.models.recipe.choices import Choices
from ftune.models.recipe.presets import PRESETS
from ftune.models.spec import FineTuneSpec

# Kept back for evaluating and saving the model once training ends.
RESERVE_SHARE = 0.1


@dataclass
class Budget:
    seconds: float | None  # None: no budget (explicit epochs and no time_budget_s)
    started: float  # time.perf_counter() when this attempt started
    spent_before: float = 0.0  # by earlier attempts of the run (from its checkpoint)

    @classmethod
    def start(cls, spec: FineTuneSpec, choices: Choices, limit_s: float | None,
              started: float, spent_before: float = 0.0) -> Budget:
        """The budget applies to auto epochs, and always when time_budget_s is given. A
        resumed run counts what its earlier attempts spent, unless the budget is the job's
        remaining run time (which already leaves them out). Records the choice."""
        if spec.time_budget_s is None and "epochs" not in choices:
            return cls(None, started)
        preset = PRESETS[spec.preset]
        choice = rules.time_budget(preset, spec.time_budget_s, limit_s)
        uncapped = rules.time_budget(preset, spec.time_budget_s, None).value
        choices.record("time_budget_s", choice)
        return cls(float(choice.value), started,
                   spent_before if choice.value == uncapped else 0.0)

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def left(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds * (1 - RESERVE_SHARE) - self.spent()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()
