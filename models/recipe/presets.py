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
    augment: str  # augmentation while backbone stages train...
    augment_from_epochs: int  # ...for at least this many epochs (none for fewer)
    head_max_epochs: int  # head-only epochs on cached features, early stopping decides
    head_patience: int
    finetune_patience: int
    # Fine-tuning is skipped when the head alone gets every val image right (rules.py's
    # head_suffices); preset best, which spends time for the last bit, fine-tunes anyway.
    head_may_suffice: bool


PRESETS: dict[str, Preset] = {
    "fast": Preset("fast", 300, False, 0, 0.0, "none", 0, 40, 4, 0, False),
    # Fine-tuning follows a cosine schedule whose last epochs, at the lowest rates, are often
    # the best: patience covers the few planned epochs.
    # Crops without flips: a mirrored digit or letter is another class (on digits, crops
    # without flips gave {} 1 to 2 points more than light).
    # Augmentation pays when the same images are seen many times. Measured in process on
    # bench/defaults.py's data, crops against none: digits (4 epochs) 0.958/0.966 against the
    # same (seeds 0, 1), animal-mnist (3 epochs) 0.972/0.964 against 0.972/0.967; 300
    # animal-mnist images (9 epochs) 0.897 against 0.892 (3 seeds). Without it the frozen
    # stages' outputs are computed once (models/training/prefix_cache.py): lite0's top 3
    # train an epoch 1.6x as fast (bench/train_throughput.py). Preset best, the longest,
    # always augments.
    "balanced": Preset("balanced", 1800, True, 0, 1.0, "crop", 6, 40, 4, 3, True),
    "best": Preset("best", 7200, True, 1, 2.0, "strong", 0, 60, 6, 4, False),
}
