import json
import subprocess
import sys

import pytest

from ftune.models.spec import FineTuneSpec, SpecError, parse_spec


def test_empty_spec_is_complete_with_documented_defaults():
    spec = parse_spec({})
    assert spec.backbone == "tf_efficientnet_lite0"
    assert spec.pretrained is True and spec.weights_path is None
    # The default recipe: what the data and the preset decide is "auto" (models.recipe).
    assert (spec.preset, spec.time_budget_s, spec.image_size) == ("balanced", None, "auto")
    assert (spec.epochs, spec.batch_size, spec.seed, spec.val_fraction) == ("auto", 32, 0, 0.2)
    assert spec.freeze.model_dump() == {"strategy": "auto", "n_blocks": 1,
                                        "unfreeze_every": 1, "batchnorm": "frozen"}
    assert spec.head.model_dump() == {"dropout": "auto", "hidden": [], "activation": "relu",
                                      "batchnorm": False, "init": "he"}
    assert spec.optimizer.model_dump() == {"name": "auto", "lr": "auto", "momentum": 0.9,
                                           "weight_decay": 0.0, "layer_decay": "auto"}
    assert spec.schedule.model_dump() == {"name": "auto", "warmup_epochs": 0}
    assert spec.early_stopping.model_dump() == {"monitor": "val_loss", "patience": "auto",
                                                "min_delta": 0.0}
    assert (spec.label_smoothing, spec.grad_clip_norm) == (0.0, None)
    assert (spec.augment, spec.class_weights, spec.mixed_precision) == ("auto", "auto", "auto")


def test_devices_must_leave_two_images_per_device_and_no_unlabeled_stage():
    assert parse_spec({"devices": 2, "batch_size": 4}).devices == 2
    assert parse_spec({}).devices == "auto"
    with pytest.raises(SpecError, match=r"batch_size \(3\).*at least 2 per device \(4\)"):
        parse_spec({"devices": 2, "batch_size": 3})
    with pytest.raises(SpecError, match="one device"):
        parse_spec({"devices": 2, "pseudo_labels": {"rounds": 1}})
    with pytest.raises(SpecError, match="devices"):
        parse_spec({"devices": 0})


def test_top_level_shape_is_exactly_the_documented_one():
    assert set(FineTuneSpec.model_fields) == {
        "backbone", "pretrained", "weights_path", "image_size", "epochs", "batch_size", "seed",
        "val_fraction", "freeze", "head", "optimizer", "schedule", "early_stopping",
        "label_smoothing", "grad_clip_norm", "augment", "mixed_precision",
        "oom_retry",  # issue 5: the service's out-of-memory retry, on by default
        "preset", "time_budget_s", "class_weights", "refit",  # issue 15: the default recipe
        "pretrain", "pseudo_labels",  # issue 18: unlabelled images, both off by default
        "devices", "sync_batchnorm",  # issue 30: data-parallel jobs
        "task",  # issue 33: single-label or multi-label
    }
    spec = FineTuneSpec()
    assert spec.pretrain.method == "none" and spec.pseudo_labels.rounds == 0
    assert not spec.uses_unlabeled


def test_round_trips_through_json():
    spec = parse_spec({"optimizer": {"name": "nesterov", "layer_decay": 0.7},
                       "head": {"hidden": [128], "activation": "gelu"}})
    assert parse_spec(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"optimizer": {"name": "lbfgs"}}, "optimizer.name"),
        ({"optimizer": {"lr": 0}}, "optimizer.lr"),
        ({"freeze": {"strategy": "most"}}, "freeze.strategy"),
        ({"head": {"dropout": 1.5}}, "head.dropout"),
        ({"head": {"activation": "tanh"}}, "head.activation"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"augment": "heavy"}, "augment"),
        ({"early_stopping": {"monitor": "loss"}}, "early_stopping.monitor"),
        ({"optimiser": {}}, "optimiser"),  # typo: extra fields are rejected
        ({"freeze": {"stratgy": "none"}}, "freeze.stratgy"),
        ({"epochs": 2, "schedule": {"warmup_epochs": 5}}, "warmup_epochs"),
    ],
)
def test_bad_values_fail_naming_the_field(bad, field):
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert field in str(err.value)


def test_invalid_json_is_a_spec_error():
    with pytest.raises(SpecError):
        parse_spec("{not json")


@pytest.mark.processes
def test_spec_module_does_not_import_torch():
    code = ("import sys, ftune.models.spec as spec; spec.parse_spec({}); "
            "print(json.dumps(sorted(m for m in ('torch', 'timm') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == []
