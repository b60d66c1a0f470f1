"""The model card's Reproduce spec holds the values the run used, not "auto", and its choices
read plainly (an unset option says so, never "None")."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ftune.models.spec import FineTuneSpec
from ftune.service.cards import build_card, card_markdown, resolved_spec
from ftune.service.db.tables import TunedModel

# A two-stage run (preset balanced) as the engine records it: the spec with the static choices
# applied, and every choice with its reason.
RESOLVED = {
    "image_size": {"value": 64, "why": "the images' median short side"},
    "optimizer.name": {"value": "adamw", "why": "the default"},
    "freeze.strategy": {"value": "two_stage", "why": "the head, then the top stages"},
    "freeze.n_blocks": {"value": 2, "why": "small data"},
    "epochs": {"value": 6, "why": "the preset's plan"},
    "optimizer.lr": {"value": 0.01, "why": "the range test"},
    "finetune.lr": {"value": 0.001, "why": "a tenth of the head's"},
    "augment": {"value": "light", "why": "few epochs"},
    "schedule.name": {"value": "cosine", "why": "with warmup"},
    "optimizer.layer_decay": {"value": None, "why": "one rate for the stages that train"},
    "refit": {"value": True, "why": "val came out of train"},  # invalid in this spec
}


def _engine_spec() -> dict:
    spec = FineTuneSpec.model_validate({"preset": "balanced"}).model_dump(mode="json")
    spec["image_size"], spec["optimizer"]["name"], spec["epochs"] = 64, "adamw", 6
    return spec


def test_the_resolved_spec_holds_the_run_s_values_and_names_what_stays_auto():
    filled, still_auto = resolved_spec(_engine_spec(), RESOLVED)
    assert filled["augment"] == "light" and filled["schedule"]["name"] == "cosine"
    assert filled["optimizer"]["layer_decay"] is None
    assert filled["refit"] == "auto"  # true needs a head-only spec: the value would not validate
    # "auto" is how a spec asks for the two-stage plan, and one explicit rate would replace
    # both stages' rates: both stay auto, and are listed as such.
    assert filled["freeze"]["strategy"] == "auto" and filled["optimizer"]["lr"] == "auto"
    assert {"freeze.strategy", "optimizer.lr"} <= set(still_auto)
    assert "augment" not in still_auto and "schedule.name" not in still_auto
    FineTuneSpec.model_validate(filled)  # still a spec one can submit


def test_a_single_stage_run_pins_its_learning_rate_and_skips_unknown_choices():
    spec = FineTuneSpec.model_validate({"preset": "fast"}).model_dump(mode="json")
    filled, _ = resolved_spec(spec, {"optimizer.lr": {"value": 0.0118, "why": "range test"},
                                     "refit": {"value": True, "why": "val from train"},
                                     "unlabeled": {"value": "none", "why": "no images"},
                                     "schedule.name": {"value": "nonsense", "why": "?"}})
    assert filled["optimizer"]["lr"] == 0.0118 and filled["refit"] is True
    assert filled["schedule"]["name"] == "auto"  # not a value the field takes: left auto
    assert "unlabeled" not in filled


def _card(spec: dict, resolved: dict) -> dict:
    model = TunedModel(id="m" * 32, tenant_id="t", name="flowers", version=3, job_id="j" * 32,
                       dataset_id="d" * 32, dataset_hash="h", backbone="b", classes=["a", "b"],
                       metrics={}, spec=spec, created_at=datetime(2026, 1, 2, tzinfo=UTC))
    return build_card(model=model, job=None, dataset=None,
                      config={"spec": spec, "resolved": resolved, "versions": {"torch": "2"}},
                      evaluation={}, history=[])


def test_the_markdown_reproduce_block_is_the_resolved_spec_and_has_no_none():
    card = _card(_engine_spec(), RESOLVED)
    markdown = card_markdown(card)
    block = markdown.split("## Reproduce")[1].split("```json\n")[1].split("\n```")[0]
    shown = json.loads(block)
    assert shown == card["resolved_spec"] and shown["schedule"]["name"] == "cosine"
    choices = markdown.split("## Choices made for you")[1].split("## Diagnosis")[0]
    assert "None" not in choices  # (this config lacks backbone and counts: those are "None")
    assert "**optimizer.layer_decay** = not used" in markdown
    assert "**refit** = `true`" in markdown and "**augment** = `light`" in markdown
    assert "Still \"auto\"" in markdown and "optimizer.lr" in markdown.split("Still")[1]
    assert card["spec"]["augment"] == "auto"  # the engine's record is kept as it was


def test_a_card_whose_spec_has_no_auto_left_says_so():
    spec = FineTuneSpec.model_validate({"preset": "fast"}).model_dump(mode="json")
    resolved = {"value": 1}
    filled = json.loads(json.dumps(spec).replace('"auto"', "null"))
    card = _card(filled, {"epochs": {**resolved, "why": "set"}})
    assert card["still_auto"] == []
    assert "Every field holds the value the run used." in card_markdown(card)
