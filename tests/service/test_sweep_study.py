"""The sweep's pure parts, without a stack: the space's checks, and the study rebuilt from
rows (same history, same parameters; a pruner's verdict and its records survive a rebuild)."""

from __future__ import annotations

import pytest

from ftune.service.errors import InvalidInput
from ftune.service.sweeps.space import apply_params, check_space, parse_space
from ftune.service.sweeps.study import (
    TrialRecord,
    build_study,
    grid_size,
    next_params,
    should_prune,
)

SPACE = {"optimizer.lr": {"log_uniform": [1e-4, 1e-2]},
         "freeze.strategy": {"choice": ["head_only", "last_n_blocks", "gradual"]},
         "freeze.n_blocks": {"int": [1, 4]}, "head.dropout": {"uniform": [0, 0.5]},
         "optimizer.name": {"choice": ["adam", "adamw", "nesterov"]},
         "image_size": {"choice": [64, 96, 128]}}


def _study(records, sampler="tpe", pruner="median", space=SPACE, objective="val_accuracy"):
    return build_study(objective=objective, sampler=sampler, pruner=pruner,
                       params=parse_space(space), seed=11, n_trials=12, records=records)


def test_the_issues_space_is_accepted_and_sampled_specs_validate():
    params = parse_space(SPACE)
    check_space({}, params, lambda spec: None)
    values, _ = next_params(_study([]), params)
    assert set(values) == set(SPACE)
    spec = apply_params({"epochs": 4}, values)
    assert spec["optimizer"]["lr"] == values["optimizer.lr"] and spec["epochs"] == 4


@pytest.mark.parametrize(("space", "words"), [
    ({}, "non-empty"),
    ({"optimizer.lr": {"log_uniform": [1e-2, 1e-4]}}, "below high"),
    ({"optimizer.lr": {"uniform": [0, 1], "choice": [1]}}, "one distribution"),
    ({"freeze.n_blocks": {"int": [1.5, 4]}}, "two integers"),
    ({"seed": {"choice": [1, 1]}}, "different"),
    ({"freeze.strategy": {"choice": ["head_only", "sideways"]}}, "sideways"),
    ({"time_budget_s": {"uniform": [1, 2]}}, "cannot be searched"),
])
def test_bad_spaces_name_what_is_wrong(space, words):
    with pytest.raises(InvalidInput) as bad:
        check_space({}, parse_space(space), lambda spec: None)
    assert words in bad.value.detail


def test_the_same_history_gives_the_same_next_trial_and_a_new_one_differs():
    params = parse_space(SPACE)
    first, _ = next_params(_study([]), params)
    assert next_params(_study([]), params)[0] == first
    done = [TrialRecord(0, first, "succeeded", 0.9, {1: 0.8, 2: 0.9}, {})]
    second, _ = next_params(_study(done), params)
    assert second != first
    assert next_params(_study(done), params)[0] == second


def test_a_grid_visits_every_point_once_across_rebuilds():
    space = {"optimizer.lr": {"choice": [0.01, 0.1]}, "seed": {"int": [0, 2]}}
    params = parse_space(space)
    assert grid_size(params) == 6 and grid_size(parse_space(SPACE)) is None
    records: list[TrialRecord] = []
    for number in range(6):
        values, attrs = next_params(_study(records, "grid", space=space), params)
        records.append(TrialRecord(number, values, "running", None, {}, attrs))
    assert len({tuple(sorted(r.params.items())) for r in records}) == 6


def test_the_median_pruner_stops_a_trial_worse_than_the_finished_ones():
    params = {"optimizer.lr": 1e-3}
    good = [TrialRecord(i, params, "succeeded", 0.9, {1: 0.85, 2: 0.9}, {}) for i in range(2)]
    bad = TrialRecord(2, params, "running", None, {1: 0.2}, {})
    fine = TrialRecord(2, params, "running", None, {1: 0.88}, {})
    assert should_prune(_study([*good, bad]), 2)[0] is True
    assert should_prune(_study([*good, fine]), 2)[0] is False
    # Fewer than two finished trials: no verdict yet.
    assert should_prune(_study([good[0], TrialRecord(1, params, "running", None, {1: 0.2},
                                                      {})]), 1)[0] is False


def test_successive_halving_keeps_its_rungs_across_rebuilds():
    params = {"optimizer.lr": 1e-3}
    first = TrialRecord(0, params, "running", None, {1: 0.9}, {})
    verdict, attrs = should_prune(_study([first], pruner="asha"), 0)
    assert verdict is False and attrs == {"completed_rung_0": 0.9}
    # Rebuilt with the rung recorded, a worse trial at epoch 1 is not promoted.
    first = TrialRecord(0, params, "running", None, {1: 0.9}, attrs)
    worse = TrialRecord(1, params, "running", None, {1: 0.5}, {})
    third = TrialRecord(2, params, "running", None, {1: 0.7}, {"completed_rung_0": 0.7})
    assert should_prune(_study([first, third, worse], pruner="asha"), 1)[0] is True
