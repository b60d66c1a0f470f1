"""The three presets: what the auto fields aim for, and how long they may take."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    budget_s: float  # the time budget when the spec sets no time_budget_s
    finetune: bool  # a second stage that trains the top backbone stages
    extra_stages: int  # stages unfrozen beyond what the dataset size asks for
    epoch_scale: float  # on the fine-tuning epochs the dataset size asks for
    augment: str  # augmentation while backbone stages train
    head_max_epochs: int  # head-only epochs on cached features, early stopping decides
    head_patience: int
    finetune_patience: int


PRESETS: dict[str, Preset] = {
    "fast": Preset("fast", 300, False, 0, 0.0, "none", 40, 4, 0),
    # Fine-tuning follows a cosine schedule whose last epochs, at the lowest rates, are often
    # the best: patience covers the few planned epochs.
    # Crops without flips: a mirrored digit or letter is another class (on digits, crops
    # without flips gave {} 1 to 2 points more than light).
    "balanced": Preset("balanced", 1800, True, 0, 1.0, "crop", 40, 4, 3),
    "best": Preset("best", 7200, True, 1, 2.0, "strong", 60, 6, 4),
}
