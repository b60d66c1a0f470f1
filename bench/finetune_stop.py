"""Does stopping a hopeless fine-tuning stage early, or skipping a needless one, cost
accuracy? The default recipe (``{}``) in this process, with the rules
(``models/recipe/rules.py``: ``finetune_futile`` stops a stage that cannot beat the head,
``head_suffices`` skips it when the head gets every val image right) and without them, side
by side on bench/defaults.py's datasets.

Usage: ``.venv/bin/python bench/finetune_stop.py [--datasets faces digits] [--seeds 3]
[--rules finetune_futile head_suffices]`` (``--rules``: those switched off in the runs
without; both by default)

Each seed runs both ways, alternating which goes first. Prints a line per run (held-out
accuracy, wall time, epochs per stage, the stage of the best epoch), then per dataset:
``finetune_stop dataset=… rule_accuracy=… without_accuracy=… time_ratio=…`` (target: the
same accuracy, a time ratio below 1 where fine-tuning does not pay, about 1 elsewhere).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
from defaults import DATASETS, faces

from ftune.models.recipe import rules
from ftune.models.training.fit import fit

RULES = ("finetune_futile", "head_suffices")


def run(root: Path, seed: int, *, off: tuple[str, ...]) -> tuple[float, float, str]:
    never: Callable[..., None] = lambda *args, **kwargs: None  # noqa: E731
    started = time.perf_counter()
    with ExitStack() as patches:
        for name in off:
            patches.enter_context(mock.patch.object(rules, name, never))
        result = fit(root, {"seed": seed} if seed else {})
    wall = time.perf_counter() - started
    stages = [row["stage"] for row in result.history]
    best = stages[result.best_epoch - 1] if stages else "-"
    detail = (f"head_epochs={stages.count('head')} finetune_epochs={stages.count('finetune')} "
              f"best_stage={best}")
    return result.evaluation["test"]["accuracy"], wall, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=["faces", "digits", "animal-mnist"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES),
                        help="the rules switched off in the runs without")
    parser.add_argument("--faces-splits", type=int, default=0, help="also faces with this "
                        "many other held-out draws (faces-split0, ...): where fine-tuning "
                        "helps depends on which 20 images of each class are held out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftune-finetune-stop-"))
    builders = {name: DATASETS[name] for name in args.datasets} | {
        f"faces-split{k}": (lambda root, k=k: faces(root, split_seed=k))
        for k in range(args.faces_splits)}
    for name, build in builders.items():
        root = build(work / name)
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for seed in range(args.seeds):
            for rule in ((True, False) if seed % 2 == 0 else (False, True)):
                accuracy, wall, detail = run(root, seed, off=() if rule else tuple(args.rules))
                results[rule].append((accuracy, wall))
                print(f"finetune_stop dataset={name} seed={seed} rule={'on' if rule else 'off'} "
                      f"accuracy={accuracy:.4f} wall_s={wall:.1f} {detail}", flush=True)
        on, off = results[True], results[False]
        print(f"finetune_stop dataset={name} seeds={args.seeds} "
              f"rule_accuracy={np.mean([a for a, _ in on]):.4f} "
              f"without_accuracy={np.mean([a for a, _ in off]):.4f} "
              f"rule_wall_s={np.mean([w for _, w in on]):.1f} "
              f"without_wall_s={np.mean([w for _, w in off]):.1f} "
              f"time_ratio={np.mean([w for _, w in on]) / np.mean([w for _, w in off]):.2f}",
              flush=True)


if __name__ == "__main__":
    main()
