"""The training loop on real images: learning, freezing, resume, feature cache, stopping."""

import pytest
import torch

from ftune.models.errors import NonFiniteLossError, TrainingCancelled
from ftune.models.training.checkpoint import load_checkpoint
from ftune.models.training.fit import Callbacks, fit

FAST = {"image_size": 64, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.003},
        "freeze": {"strategy": "head_only"}}


def _spec(**overrides):
    spec = {**FAST, **overrides}
    return spec


def test_head_only_learns_and_pretrained_beats_random(animal_folder):
    pretrained = fit(animal_folder, _spec(epochs=3))
    random_init = fit(animal_folder, _spec(epochs=3, pretrained=False))
    assert pretrained.weights_source and "package" in pretrained.weights_source
    assert random_init.weights_source is None
    acc, acc_random = (r.history[-1]["val_accuracy"] for r in (pretrained, random_init))
    assert acc > 0.6  # chance is 0.1
    assert acc > acc_random + 0.1
    assert all(row["feature_cache"] for row in pretrained.history)
    assert pretrained.num_train + pretrained.num_val == 400 and pretrained.num_val == 80
    row = pretrained.history[0]
    assert set(row) >= {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                        "lr", "seconds", "grad_norm", "stage_grad_norms"}
    assert row["stage_grad_norms"].keys() == {"head"} and row["grad_norm"] > 0


def test_frozen_weights_and_batchnorm_stats_are_untouched(tiny_folder):
    def run(batchnorm):
        spec = _spec(epochs=1, freeze={"strategy": "last_n_blocks", "n_blocks": 1,
                                       "batchnorm": batchnorm})
        from ftune.models.backbones import create_backbone

        before = create_backbone("tf_efficientnet_lite0").model.state_dict()
        after = fit(tiny_folder, spec).model.backbone.state_dict()
        stages = create_backbone("tf_efficientnet_lite0").stages
        last = {n.rsplit(".", 1)[0] for n in stages[-1]}
        frozen = [k for k in before if k.rsplit(".", 1)[0] not in last]
        changed = [k for k in frozen if not torch.equal(before[k], after[k])]
        last_changed = [k for k in before if k not in frozen and not torch.equal(before[k],
                                                                                  after[k])]
        return changed, last_changed

    changed, last_changed = run("frozen")
    assert changed == []
    assert any(k.endswith("weight") for k in last_changed)
    assert any(k.endswith("running_mean") for k in last_changed)
    changed, _ = run("train")  # frozen weights, but BatchNorm statistics keep updating
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                           for k in changed)


def test_gradual_unfreezing_grows_the_trainable_set(tiny_folder):
    result = fit(tiny_folder, _spec(epochs=3, freeze={"strategy": "gradual"}))
    counts = [row["trainable_params"] for row in result.history]
    assert counts[0] < counts[1] < counts[2]
    assert [row["trainable_stages"] for row in result.history] == [0, 1, 2]
    assert len(result.history[2]["stage_grad_norms"]) == 3  # head + two stages


class _Interrupt(Exception):
    pass


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_folder, tmp_path):
    # gradual unfreezing (groups join mid-run), augmentation and dropout (RNG state) all matter.
    spec = _spec(epochs=3, augment="light", freeze={"strategy": "gradual"},
                 schedule={"name": "cosine", "warmup_epochs": 1},
                 early_stopping={"patience": 5})
    whole = fit(tiny_folder, spec, checkpoint_dir=tmp_path / "a")

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(tiny_folder, spec, checkpoint_dir=tmp_path / "b",
            callbacks=Callbacks(on_epoch_end=stop_after_two))
    assert load_checkpoint(tmp_path / "b")["epoch"] == 2
    resumed = fit(tiny_folder, spec, checkpoint_dir=tmp_path / "b", resume=tmp_path / "b")
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    for a, b in zip(whole.history, resumed.history, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert resumed.best_epoch == whole.best_epoch


def test_feature_cache_gives_the_same_results(animal_folder):
    spec = _spec(epochs=3)
    cached = fit(animal_folder, spec)
    recomputed = fit(animal_folder, spec, cache_features=False)
    assert all(r["feature_cache"] for r in cached.history)
    assert not any(r["feature_cache"] for r in recomputed.history)
    for a, b in zip(cached.history, recomputed.history, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "mobilenet_v2"])
def test_frozen_stages_run_once_per_image_with_the_same_results(tiny_folder, backbone):
    """With the top stages training on images not augmented, the frozen stages' outputs are
    computed once and reused: the same losses, accuracies and weights as running them every
    step (gradual unfreezing: the cache follows the stages as they join)."""
    spec = _spec(backbone=backbone, epochs=3, augment="none", val_fraction=0.25,
                 freeze={"strategy": "gradual", "unfreeze_every": 1, "batchnorm": "frozen"})
    cached = fit(tiny_folder, spec)
    whole = fit(tiny_folder, spec, cache_features=False)
    assert [r["frozen_stage_cache"] for r in cached.history] == [False, True, True]
    assert not any(r["frozen_stage_cache"] for r in whole.history)
    for a, b in zip(cached.history, whole.history, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
    for (name, a), b in zip(cached.model.state_dict().items(),
                            whole.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name


def test_early_stopping_restores_the_best_weights(tiny_folder, tmp_path):
    # A learning rate far too high makes val loss bounce, so patience runs out early.
    # No refit: the returned model is then the best epoch's, not one trained again on train+val.
    spec = _spec(epochs=12, optimizer={"name": "sgd", "lr": 3.0}, refit=False,
                 early_stopping={"monitor": "val_loss", "patience": 2})
    result = fit(tiny_folder, spec, checkpoint_dir=tmp_path)
    losses = [row["val_loss"] for row in result.history]
    assert result.stopped_early and len(losses) < 12
    assert result.best_epoch == losses.index(min(losses)) + 1
    assert len(losses) == result.best_epoch + 2
    assert result.best_metrics["val_loss"] == min(losses)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = load_checkpoint(tmp_path)["model"]
    returned = result.model.state_dict()
    assert all(torch.equal(returned[k], best[k]) for k in best)
    assert not all(torch.equal(returned[k], last[k]) for k in last)


def test_non_finite_loss_stops_with_a_clear_error():
    from ftune.models.training.loop import train_one_epoch
    from ftune.models.training.runtime import Precision

    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    optimizer = torch.optim.SGD([{"params": list(layer.parameters()), "lr": 0.1,
                                  "base_lr": 0.1}])
    batches = [(torch.ones(2, 4), torch.tensor([0, 1]))]
    with pytest.raises(NonFiniteLossError, match=r"lower optimizer\.lr"):
        train_one_epoch(layer, batches, optimizer, loss_fn=torch.nn.CrossEntropyLoss(),
                        precision=Precision(torch.device("cpu"), None),
                        scaler=torch.amp.GradScaler("cpu", enabled=False), first_step=0,
                        lr_at_step=lambda s: 1.0, grad_groups={"head": list(layer.parameters())})


def test_cancel_stops_at_a_batch_boundary(tiny_folder):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(TrainingCancelled):
        fit(tiny_folder, _spec(epochs=3), callbacks=Callbacks(should_stop=should_stop))
    assert len(calls) == 3


def test_full_fine_tune_with_every_option(tiny_folder):
    spec = {
        "backbone": "mobilenet_v2", "image_size": 48, "epochs": 2, "batch_size": 8,
        "freeze": {"strategy": "none"},
        "head": {"dropout": 0.1, "hidden": [32], "activation": "elu", "batchnorm": True,
                 "init": "glorot"},
        "optimizer": {"name": "nesterov", "lr": 0.01, "weight_decay": 1e-4,
                      "layer_decay": 0.8},
        "schedule": {"name": "onecycle"}, "label_smoothing": 0.1, "grad_clip_norm": 1.0,
        "augment": "strong", "mixed_precision": "bf16",
    }
    result = fit(tiny_folder, spec)
    assert result.precision == "bf16" and result.device == "cpu"
    assert len(result.history) == 2 and not result.history[0]["feature_cache"]
    assert len(result.history[0]["stage_grad_norms"]) > 5
    assert all(row["train_loss"] == row["train_loss"] for row in result.history)  # finite


def test_cancel_is_seen_while_features_are_cached(tiny_folder):
    # Caching frozen features (a forward over every image) comes before the first step; a
    # stop asked for then must not wait for it to finish.
    calls, steps = [], []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 2  # the second check, one cached batch in

    with pytest.raises(TrainingCancelled):
        fit(tiny_folder, {"image_size": 32, "epochs": 1, "batch_size": 4},
            callbacks=Callbacks(should_stop=should_stop,
                                on_batch_end=lambda *args: steps.append(args)))
    assert steps == []  # stopped inside the caching, before any training step


def test_cancel_is_seen_during_the_final_evaluation(tiny_folder):
    finished = []
    with pytest.raises(TrainingCancelled):
        fit(tiny_folder, {"image_size": 32, "epochs": 1, "batch_size": 4},
            callbacks=Callbacks(on_epoch_end=finished.append,
                                should_stop=lambda: bool(finished)))
    assert len(finished) == 1  # training was done: the stop came in the evaluation
