"""Freezing plans, parameter groups, optimizers, schedules and the head: small pure helpers."""

import math

import pytest
import torch
from torch import nn

from ftune.models.backbones import create_backbone
from ftune.models.network import FineTuneModel, build_head
from ftune.models.spec import FreezeSpec, HeadSpec, OptimizerSpec, parse_spec
from ftune.models.tuning.freezing import apply_freezing, set_train_mode, trainable_stage_count
from ftune.models.tuning.optimizers import create_optimizer
from ftune.models.tuning.param_groups import HEAD, join_order, lr_scale, unit_param_groups
from ftune.models.tuning.schedules import lr_multiplier


@pytest.fixture(scope="module")
def lite0():
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False)
    model = FineTuneModel(backbone.model, build_head(backbone.num_features, 5, HeadSpec()))
    return model, backbone.stages


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_stage_counts_per_strategy():
    assert trainable_stage_count(FreezeSpec(strategy="head_only"), 5, 8) == 0
    assert trainable_stage_count(FreezeSpec(strategy="none"), 0, 8) == 8
    assert trainable_stage_count(FreezeSpec(strategy="last_n_blocks", n_blocks=3), 0, 8) == 3
    assert trainable_stage_count(FreezeSpec(strategy="last_n_blocks", n_blocks=30), 0, 8) == 8
    gradual = FreezeSpec(strategy="gradual", unfreeze_every=2)
    assert [trainable_stage_count(gradual, e, 3) for e in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_trainable_parameter_counts(lite0):
    model, stages = lite0
    params = dict(model.backbone.named_parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 1280 * 5 + 5
    sizes = [sum(params[n].numel() for n in stage) for stage in stages]
    apply_freezing(model, stages, 0)
    assert _trainable(model) == head
    apply_freezing(model, stages, 2)
    assert _trainable(model) == head + sizes[-1] + sizes[-2]
    apply_freezing(model, stages, len(stages))
    assert _trainable(model) == sum(p.numel() for p in model.parameters())
    # every backbone parameter belongs to exactly one stage
    assert sorted(n for s in stages for n in s) == sorted(params)


def test_frozen_batchnorm_stays_in_eval_mode(lite0):
    model, stages = lite0
    apply_freezing(model, stages, 1)
    set_train_mode(model, 1, "frozen")
    last = set(stages[-1])
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.training == (f"{name}.weight" in last), name
    set_train_mode(model, 1, "train")
    assert all(m.training for m in model.backbone.modules())
    apply_freezing(model, stages, 0)
    set_train_mode(model, 0, "frozen")
    assert not any(m.training for m in model.backbone.modules()) and model.head.training


def test_no_weight_decay_on_biases_and_norms(lite0):
    model, stages = lite0
    spec = OptimizerSpec(lr=0.001, weight_decay=0.05, layer_decay=None)
    groups = [g for u in join_order(len(stages), len(stages))
              for g in unit_param_groups(model, stages, u, spec)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    for group in groups:
        if group["name"].endswith("no_decay"):
            assert group["weight_decay"] == 0 and all(p.ndim <= 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.05 and all(p.ndim > 1 for p in group["params"])


def test_layer_decay_gives_discriminative_learning_rates(lite0):
    model, stages = lite0
    spec = OptimizerSpec(lr=0.1, layer_decay=0.5)
    num = len(stages)
    assert lr_scale(HEAD, num, 0.5) == 1.0
    assert lr_scale(num - 1, num, 0.5) == 0.5 and lr_scale(num - 3, num, 0.5) == 0.125
    lrs = {g["name"]: g["lr"] for u in join_order(num, num)
           for g in unit_param_groups(model, stages, u, spec)}
    assert lrs["head"] == 0.1
    assert lrs[f"stage{num - 1}"] == pytest.approx(0.05)
    assert lrs["stage0"] == pytest.approx(0.1 * 0.5 ** num)
    flat_spec = OptimizerSpec(lr=0.1, layer_decay=None)
    flat = {g["name"]: g["lr"] for g in unit_param_groups(model, stages, 0, flat_spec)}
    assert flat["stage0"] == 0.1


@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("sgd", torch.optim.SGD, {"momentum": 0, "nesterov": False}),
        ("momentum", torch.optim.SGD, {"momentum": 0.8, "nesterov": False}),
        ("nesterov", torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
        ("adagrad", torch.optim.Adagrad, {}),
        ("rmsprop", torch.optim.RMSprop, {"momentum": 0.8}),
        ("adam", torch.optim.Adam, {}),
        ("adamw", torch.optim.AdamW, {}),
    ],
)
def test_all_seven_optimizers(name, cls, extra):
    layer = nn.Linear(3, 2)
    groups = [{"params": [layer.weight], "lr": 0.1, "base_lr": 0.1, "weight_decay": 0.01},
              {"params": [layer.bias], "lr": 0.1, "base_lr": 0.1, "weight_decay": 0.0}]
    optimizer = create_optimizer(groups, OptimizerSpec(name=name, lr=0.1, momentum=0.8))
    assert type(optimizer) is cls
    for key, value in extra.items():
        assert optimizer.param_groups[0][key] == value
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    layer(torch.ones(1, 3)).sum().backward()
    before = layer.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, layer.weight)


def test_groups_joining_keep_existing_optimizer_state():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    spec = OptimizerSpec(name="adam", lr=0.001, layer_decay=None)
    optimizer = create_optimizer([{"params": list(first.parameters()), "lr": 0.1,
                                   "base_lr": 0.1, "weight_decay": 0}], spec)
    first(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    moment = optimizer.state[first.weight]["exp_avg"].clone()
    optimizer.add_param_group({"params": list(second.parameters()), "lr": 0.1, "base_lr": 0.1,
                               "weight_decay": 0})
    assert torch.equal(optimizer.state[first.weight]["exp_avg"], moment)


def test_schedules():
    total = 100
    assert all(lr_multiplier("constant", s, total) == 1.0 for s in range(total))
    assert lr_multiplier("cosine", 0, total) == 1.0
    assert lr_multiplier("cosine", 50, total) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 100, total) == pytest.approx(0.0)
    assert [lr_multiplier("step", s, 99) for s in (0, 40, 80)] == pytest.approx([1, 0.1, 0.01])
    onecycle = [lr_multiplier("onecycle", s, total) for s in range(total)]
    peak = max(range(total), key=onecycle.__getitem__)
    assert 25 <= peak <= 32 and onecycle[0] < 0.05 and onecycle[-1] < 1e-3
    warm = [lr_multiplier("cosine", s, total, warmup_steps=10) for s in range(12)]
    assert warm[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert warm[10] == 1.0 and warm[11] < 1.0
    with pytest.raises(ValueError):
        lr_multiplier("exponential", 0, 10)


@pytest.mark.parametrize("init", ["he", "glorot"])
def test_head_layers_and_init(init):
    torch.manual_seed(0)
    spec = HeadSpec(dropout=0.3, hidden=[256, 64], activation="gelu", batchnorm=True, init=init)
    head = build_head(1000, 7, spec)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Dropout", "Linear", "BatchNorm1d", "GELU", "Dropout", "Linear",
                     "BatchNorm1d", "GELU", "Dropout", "Linear"]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [256, 64, 7]
    assert linears[0].bias is None  # BatchNorm follows: its beta is the bias
    assert torch.count_nonzero(linears[-1].bias) == 0
    std = float(linears[0].weight.detach().std())
    expected = math.sqrt(2 / 1000) if init == "he" else math.sqrt(2 / (1000 + 256))
    assert std == pytest.approx(expected, rel=0.05)
    assert head(torch.randn(4, 1000)).shape == (4, 7)
    plain = build_head(10, 2, parse_spec({"head": {"dropout": 0}}).head)
    assert [type(m).__name__ for m in plain] == ["Linear"]
