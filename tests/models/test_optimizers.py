"""The optimizer table is the one list of optimizers: the spec's names, the factory and the
memory estimate all read it, and what it says about each optimizer is true of torch's."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
import torch
from torch import nn

from ftune.models import memory
from ftune.models.spec import OptimizerSpec
from ftune.models.tuning.optimizers import (
    OPTIMIZERS,
    OptimizerName,
    create_optimizer,
    optimizer_info,
)


def test_the_names_and_the_table_cannot_drift():
    assert list(get_args(OptimizerName)) == list(OPTIMIZERS)
    spec_names = OptimizerSpec.model_json_schema()["properties"]["name"]["enum"]
    assert spec_names == ["auto", *OPTIMIZERS]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_row_builds_and_keeps_the_state_it_claims(name):
    layer = nn.Linear(3, 2)
    optimizer = create_optimizer([{"params": list(layer.parameters()), "weight_decay": 0.0}],
                                 OptimizerSpec(name=name, lr=0.1, momentum=0.8))
    assert type(optimizer) is getattr(torch.optim, OPTIMIZERS[name].torch_class)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state[layer.weight]
    per_parameter = [v for v in state.values()
                     if isinstance(v, torch.Tensor) and v.shape == layer.weight.shape]
    assert len(per_parameter) == OPTIMIZERS[name].state_tensors


def test_an_unknown_name_is_an_error_everywhere():
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        optimizer_info("lbfgs")
    with pytest.raises(ValueError, match="unknown optimizer"):
        memory.optimizer_states("lbfgs")
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer([], OptimizerSpec.model_construct(name="lbfgs", lr=0.1, momentum=0.0))


def test_auto_is_estimated_as_the_optimizer_the_recipe_picks():
    assert memory.optimizer_states("auto") == OPTIMIZERS["adam"].state_tensors


def test_the_table_loads_without_torch():
    code = ("import sys\nimport ftune.models.tuning.optimizers, ftune.models.memory\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.strip() == "False"
