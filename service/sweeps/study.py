"""An in-memory Optuna study rebuilt from our tables, each time it is needed.

Nothing about a sweep lives in a process: the controller rebuilds the study to ask the
sampler for a trial's parameters, and a worker rebuilds it to ask the pruner about its trial
after each epoch. Optuna's own storage is never used, so its schema never meets ours.

A trial's Optuna state follows its job: succeeded is COMPLETE (the best epoch's objective),
pruned is PRUNED, failed and cancelled are FAIL, anything else RUNNING. Intermediate values
are the objective of each epoch the job recorded. The sampler is seeded from the sweep's seed
and the trial's number, so the same history always gives the same parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftune.service.job_status import JobStatus
from ftune.service.sweeps.space import Param

if TYPE_CHECKING:
    pass

DIRECTIONS = {"val_accuracy": "maximize", "val_loss": "minimize", "val_map": "maximize"}
# Median: a trial is compared with finished ones at the same epoch, once this many finished.
MEDIAN_STARTUP_TRIALS = 2
# Successive halving: rungs at epochs 1, 3, 9...; a third go on from each.
ASHA_REDUCTION = 3


@dataclass(frozen=True)
class TrialRecord:
    """What the study needs to know about one trial, read from its row and its job."""

    number: int
    params: dict[str, Any]
    status: str  # the job's
    best: float | None  # the objective at the job's best epoch
    intermediate: dict[int, float]  # epoch -> objective
    system_attrs: dict[str, Any]


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(params: list[Param]) -> dict[str, Any]:
    dist = _optuna().distributions
    made: dict[str, Any] = {}
    for p in params:
        if p.kind == "choice":
            made[p.path] = dist.CategoricalDistribution(list(p.values))
        elif p.kind == "int":
            made[p.path] = dist.IntDistribution(p.values[0], p.values[1])
        else:
            made[p.path] = dist.FloatDistribution(float(p.values[0]), float(p.values[1]),
                                                  log=p.kind == "log_uniform")
    return made


def grid_size(params: list[Param]) -> int | None:
    """How many points a grid over the space has; None when a parameter is continuous."""
    sizes = []
    for param in params:
        grid = param.grid
        if grid is None:
            return None
        sizes.append(len(grid))
    return math.prod(sizes)


def _sampler(kind: str, params: list[Param], seed: int, number: int, n_trials: int) -> Any:
    """Seeded by the sweep's seed and the trial's number: a sampler rebuilt for each trial
    with the sweep's seed alone would draw the same first values every time. The grid keeps
    the sweep's seed: it fixes the order of the points, which every rebuild must share."""
    samplers = _optuna().samplers
    if kind == "grid":
        return samplers.GridSampler({p.path: p.grid for p in params}, seed=seed)
    seed = (seed * 1_000_003 + number) % 2**32
    if kind == "random":
        return samplers.RandomSampler(seed=seed)
    # TPE models the good and the bad trials; before it has enough, it samples at random.
    startup = min(10, max(2, n_trials // 3))
    return samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _pruner(kind: str) -> Any:
    pruners = _optuna().pruners
    if kind == "median":
        return pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    if kind == "asha":
        return pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=ASHA_REDUCTION)
    return pruners.NopPruner()


def _frozen(record: TrialRecord, dists: dict[str, Any]) -> Any:
    optuna = _optuna()
    state = optuna.trial.TrialState
    params = {k: v for k, v in record.params.items() if k in dists}
    common = {"params": params, "distributions": {k: dists[k] for k in params},
              "intermediate_values": record.intermediate,
              "system_attrs": record.system_attrs}
    if record.status == JobStatus.SUCCEEDED and record.best is not None:
        return optuna.trial.create_trial(state=state.COMPLETE, value=record.best, **common)
    if record.status == JobStatus.PRUNED:
        last = record.intermediate[max(record.intermediate)] if record.intermediate else None
        return optuna.trial.create_trial(state=state.PRUNED, value=last, **common)
    if record.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return optuna.trial.create_trial(state=state.FAIL, **common)
    return optuna.trial.create_trial(state=state.RUNNING, **common)


def build_study(*, objective: str, sampler: str, pruner: str, params: list[Param],
                seed: int, n_trials: int, records: list[TrialRecord]) -> Any:
    optuna = _optuna()
    study = optuna.create_study(direction=DIRECTIONS[objective],
                                sampler=_sampler(sampler, params, seed, len(records),
                                                 n_trials),
                                pruner=_pruner(pruner))
    dists = distributions(params)
    for record in sorted(records, key=lambda r: r.number):
        study.add_trial(_frozen(record, dists))
    return study


def next_params(study: Any, params: list[Param]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampler's choice for the next trial, and the system attributes the sampler gave
    it (the grid sampler's point: kept, so the next rebuild knows it was visited)."""
    trial = study.ask(distributions(params))
    frozen = study.get_trials(deepcopy=False)[trial.number]
    return dict(trial.params), dict(frozen.system_attrs)


def should_prune(study: Any, number: int) -> tuple[bool, dict[str, Any]]:
    """The pruner's verdict on trial ``number`` (already in the study as RUNNING, with its
    intermediate values), and its system attributes afterwards (the rungs it reached)."""
    trial = study.get_trials(deepcopy=False)[number]
    verdict = bool(study.pruner.prune(study, trial))
    return verdict, dict(study.get_trials(deepcopy=False)[number].system_attrs)
