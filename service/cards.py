"""The model card: what a reviewer needs to trust and reproduce a tuned model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import ValidationError

from ftune.models.spec import FineTuneSpec
from ftune.service.db.tables import Dataset, Job, TunedModel

CURVE_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_map",
              "lr", "seconds")
# A split's headline numbers: single-label ones, then multi-label ones; each has its own.
SUMMARY_KEYS = ("num_images", "accuracy", "top_k", "top_k_accuracy", "macro_f1", "loss",
                "expected_calibration_error", "expected_calibration_error_uncalibrated",
                "mean_average_precision", "micro_f1", "exact_match")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


_ABSOLUTE_PATH = re.compile(r"/\S*/")


def public_source(source: str | None) -> str | None:
    """Where the weights came from, without server folders (models made before sources
    were recorded by file name only carry full paths)."""
    return None if source is None else _ABSOLUTE_PATH.sub("", source)


def resolved_spec(spec: dict, resolved: dict) -> tuple[dict, list[str]]:
    """The spec with each "auto" field the run decided set to its value (what the job used),
    and the dotted fields still "auto": decided afresh, the same way, by a run of this spec.
    Left "auto" too: a choice that is no value of its field, and those that, written out,
    would change the run (see ``_pinnable``)."""
    filled = json.loads(json.dumps(spec))
    checks = _validates(filled)
    for name, choice in resolved.items():
        parent, leaf = _field(filled, name)
        if (parent is None or parent.get(leaf) != "auto" or not isinstance(choice, dict)
                or not _pinnable(name, resolved)):
            continue
        parent[leaf] = choice.get("value")
        if checks and not _validates(filled):
            parent[leaf] = "auto"
    return filled, sorted(_autos(filled))


def _pinnable(name: str, resolved: dict) -> bool:
    """Whether writing this choice into the spec trains the same way. freeze.strategy's
    "auto" asks for the recipe's plan (head stage, then fine-tuning; a fixed strategy has
    other stages and patience); with two stages, one explicit optimizer.lr would replace
    both stages' rates (the head's, and finetune.lr derived from it)."""
    if name == "freeze.strategy":
        return False
    return not (name == "optimizer.lr" and "finetune.lr" in resolved)


def _field(spec: dict, dotted: str) -> tuple[dict | None, str]:
    *parents, leaf = dotted.split(".")
    node: object = spec
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def _validates(spec: dict) -> bool:
    try:
        FineTuneSpec.model_validate(spec)
    except ValidationError:
        return False
    return True


def _autos(spec: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in spec.items():
        if isinstance(value, dict):
            found += _autos(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(f"{prefix}{key}")
    return found


def build_card(*, model: TunedModel, job: Job | None, dataset: Dataset | None, config: dict,
               evaluation: dict, history: list[dict]) -> dict:
    """The card's content; ``resolved_spec`` is the spec with the run's choices in place of
    "auto" (``still_auto``: the fields it did not decide)."""
    val = evaluation.get("val", {})
    resolved = config.get("resolved") or (job.resolved if job else None) or {}
    filled, still_auto = resolved_spec(config.get("spec", model.spec), resolved)
    summary = {split: {k: result.get(k) for k in SUMMARY_KEYS if k in result}
               | {"most_confused": result.get("most_confused", [])[:5],
                  "worst_explained": _worst_explained(result)}
               for split, result in evaluation.items()}
    return {
        "model": {"id": model.id, "name": model.name, "version": model.version,
                  "created_at": model.created_at.isoformat(), "classes": model.classes,
                  "task": model.task},
        "calibration": config.get("calibration"),
        "serving": (model.serving or {}).get("report"),
        "backbone": {"name": config.get("backbone"), "architecture": config.get("architecture"),
                     "pretrained_weights_from": public_source(config.get("weights_source")),
                     "preprocessing": config.get("preprocessing")},
        "spec": config.get("spec", model.spec),
        "resolved": resolved,
        "resolved_spec": filled,
        "still_auto": still_auto,
        "diagnosis": config.get("diagnosis", job.diagnosis if job else None),
        "lr_range_test": config.get("lr_range_test", []),
        "seed": config.get("spec", model.spec).get("seed"),
        "dataset": {"id": model.dataset_id, "name": dataset.name if dataset else None,
                    "content_hash": model.dataset_hash,
                    "class_counts": dataset.class_counts if dataset else None,
                    "num_train": config.get("num_train"), "num_val": config.get("num_val"),
                    "skipped_files": len(config.get("skipped", [])),
                    # Lineage: the exact version trained on, and what it added to its parent.
                    "version": dataset.version if dataset else None,
                    "parent_id": dataset.parent_id if dataset else None,
                    "added": dataset.added if dataset else None},
        "metrics": {"best_epoch": config.get("best_epoch"),
                    "best": config.get("best_metrics"),
                    "stopped_early": config.get("stopped_early"),
                    "epochs_run": config.get("epochs_run")},
        "evaluation": summary,
        "per_class": val.get("per_class", []),
        "training_curve": [{k: row.get(k) for k in CURVE_KEYS} for row in history],
        "environment": {"versions": config.get("versions"), "device": config.get("device"),
                        "precision": config.get("precision")},
        "timings": {"train_seconds": config.get("train_seconds"),
                    "job_created_at": job.created_at.isoformat() if job else None,
                    "job_started_at": job.started_at.isoformat() if job and job.started_at
                    else None,
                    "job_finished_at": job.finished_at.isoformat() if job and job.finished_at
                    else None},
    }


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _choice_value(value: object) -> str:
    """A choice as a reader wants it: None (optimizer.layer_decay) means the option is off."""
    return "not used" if value is None else f"`{json.dumps(value)}`" if isinstance(
        value, (bool, list, dict)) else f"`{value}`"


def _recipe_lines(card: dict) -> list[str]:
    lines = ["", "## Choices made for you", ""]
    resolved = card.get("resolved") or {}
    lines += ([f"- **{field}** = {_choice_value(choice['value'])}: {choice['why']}"
               for field, choice in resolved.items()] or ["Every field was set in the spec."])
    lines += ["", "## Diagnosis", ""]
    diagnosis = card.get("diagnosis")
    if diagnosis is None:
        lines.append("Not diagnosed (a model from an earlier release).")
    else:
        lines += ([f"- **{f['message']}** {f['evidence']}. Try: {f['action']}"
                   for f in diagnosis] or ["Nothing found: the run looks healthy."])
    return lines


def _still_auto_line(fields: list[str]) -> str:
    if not fields:
        return "Every field holds the value the run used."
    return ("Still \"auto\" (not needed by this run, or decided the same way again from "
            f"the same data and seed): {', '.join(fields)}.")


def _results_table(evaluation: dict, *, multi: bool) -> list[str]:
    """Each split's headline numbers; ECE before → after calibration."""
    def ece(result: dict) -> str:
        before = result.get("expected_calibration_error_uncalibrated")
        after = _fmt(result.get("expected_calibration_error"))
        return after if before is None else f"{_fmt(before)} → {after}"

    if multi:
        lines = ["| split | images | mAP | micro F1 | macro F1 | exact match | ECE |",
                 "|---|---|---|---|---|---|---|"]
        return lines + [f"| {split} | {r['num_images']} | {_fmt(r.get('mean_average_precision'))} "
                        f"| {_fmt(r.get('micro_f1'))} | {_fmt(r.get('macro_f1'))} | "
                        f"{_fmt(r.get('exact_match'))} | {ece(r)} |"
                        for split, r in evaluation.items()]
    lines = ["| split | images | accuracy | top-k accuracy | macro F1 | loss | ECE |",
             "|---|---|---|---|---|---|---|"]
    return lines + [f"| {split} | {r['num_images']} | {_fmt(r.get('accuracy'))} | "
                    f"{_fmt(r.get('top_k_accuracy'))} (k={r.get('top_k')}) | "
                    f"{_fmt(r.get('macro_f1'))} | {_fmt(r.get('loss'))} | {ece(r)} |"
                    for split, r in evaluation.items()]


def _per_class_lines(rows: list[dict], *, multi: bool) -> list[str]:
    lines = ["", "## Per class (val)", ""]
    if multi:
        return lines + ["| class | AP | precision | recall | F1 | positives |",
                        "|---|---|---|---|---|---|"] + [
            f"| {row['class']} | {_fmt(row['average_precision'])} | {_fmt(row['precision'])} "
            f"| {_fmt(row['recall'])} | {_fmt(row['f1'])} | {row['support']} |" for row in rows]
    return lines + ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"] + [
        f"| {row['class']} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
        f"{_fmt(row['f1'])} | {row['support']} |" for row in rows]


def _curve_lines(rows: list[dict], *, multi: bool) -> list[str]:
    """The epochs' table; a multi-label run's val mAP beside its label-wise accuracy."""
    extra = " val mAP |" if multi else ""
    lines = ["", "## Training curve", "", "| epoch | train loss | train acc | val loss | "
             f"val acc |{extra} lr | seconds |", "|---" * (8 if multi else 7) + "|"]
    return lines + [
        f"| {r['epoch']} | {_fmt(r['train_loss'])} | {_fmt(r['train_accuracy'])} | "
        f"{_fmt(r['val_loss'])} | {_fmt(r['val_accuracy'])} | "
        + (f"{_fmt(r.get('val_map'))} | " if multi else "")
        + f"{_fmt(r['lr'])} | {_fmt(r['seconds'])} |" for r in rows]


def _lineage(dataset: dict) -> str:
    """A version's place: its number, its parent and what it added."""
    if not dataset.get("parent_id"):
        return ""
    added = dataset.get("added") or {}
    source = ("labels for images of dataset " + str(added.get("unlabeled_dataset_id"))
              if added.get("from") == "unlabeled_dataset" else "an archive of new images")
    return (f"; version {dataset['version']}, made from dataset {dataset['parent_id']} with "
            f"{added.get('images', 0)} image(s) added from {source}")


def _worst_explained(result: dict) -> list[dict]:
    """The worst files that got a heat map (what the card lists; the picture has them)."""
    return [{"path": row["path"], "true": row["true"], "explained": row["explained"],
             "loss": row.get("loss")}
            for row in result.get("highest_loss") or result.get("worst") or []
            if row.get("explained")]


def _worst_lines(evaluation: dict) -> list[str]:
    split = "test" if evaluation.get("test", {}).get("worst_explained") else "val"
    rows = evaluation.get(split, {}).get("worst_explained") or []
    if not rows:
        return []
    return ["", "## Worst files, explained", "",
            f"The {split} files with the highest loss (the most confident mistakes first), "
            "each with a Grad-CAM heat map of where the model looked for the class it gave, "
            f"are drawn at `worst.png?split={split}`:", ""] + [
        f"- `{row['path']}`: true {_names(row['true'])}, looked for {row['explained']}"
        for row in rows]


def _names(value: str | list[str]) -> str:
    return value if isinstance(value, str) else (", ".join(value) or "none")


def _calibration_lines(calibration: dict | None, *, multi: bool) -> list[str]:
    if not calibration:
        return []
    lines = ["", "## Calibration", "", f"{calibration['why'][0].upper()}"
             f"{calibration['why'][1:]}. Predictions give calibrated probabilities; the "
             "reliability diagram is at `reliability.png`"
             + (", the precision-recall curves at `pr_curves.png`." if multi else ".")]
    if multi and calibration.get("thresholds"):
        lines.append("Decision thresholds (chosen on val for the best F1 of each class): "
                     + ", ".join(f"{t:.3f}" for t in calibration["thresholds"]) + ".")
    lines += [f"Warning: {w}." for w in calibration.get("warnings") or []]
    return lines


def _serving_lines(report: dict | None) -> list[str]:
    """The ONNX export's parity check and the int8 guard, once the model was prepared."""
    lines = ["", "## Serving", ""]
    if not report:
        return [*lines, "Not prepared for ONNX Runtime yet: its first prediction (under "
                "FTUNE_SERVE_ENGINE auto, onnxruntime or int8) prepares it."]
    onnx, int8 = report.get("onnx") or {}, report.get("int8") or {}
    lines.append(f"- **ONNX Runtime (fp32)**: {'passed' if onnx.get('passed') else 'failed'} "
                 f"its parity check against torch, {onnx.get('why')}.{_batch(onnx)}")
    if int8.get("offered"):
        lines.append(f"- **int8**: offered (`format=onnx-int8`). Same answer as fp32 on "
                     f"{_pct(int8.get('agreement'))}, {int8.get('metric')} "
                     f"{_pct(int8.get('quality'))} against fp32's "
                     f"{_pct(int8.get('fp32_quality'))}; {int8.get('why')}.{_batch(int8)}")
    else:
        lines.append(f"- **int8**: not offered: {int8.get('why')}.")
    return lines


def _batch(engine: dict) -> str:
    """The batch size the engine was measured fastest at, and the figures."""
    batch = engine.get("batch")
    if not batch:
        return ""
    rates = ", ".join(f"{size}: {rate:g}" for size, rate in batch["images_per_s"].items())
    return (f" Served {batch['size']} image(s) at a time, the fastest measured with "
            f"{batch['provider']} (images/s by batch size: {rates}).")


def _pct(value: object) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "–"


def card_markdown(card: dict) -> str:
    model, backbone, dataset = card["model"], card["backbone"], card["dataset"]
    lines = [
        f"# Model card: {model['name']} v{model['version']}",
        "",
        f"- **Model id**: `{model['id']}` (created {model['created_at']})",
        f"- **Backbone**: {backbone['name']} (timm `{backbone['architecture']}`), ImageNet "
        f"weights from {backbone['pretrained_weights_from'] or 'none (random init)'}",
        f"- **Dataset**: {dataset['name'] or dataset['id']}, content hash "
        f"`{dataset['content_hash']}`; {dataset['num_train']} training and "
        f"{dataset['num_val']} validation images; {dataset['skipped_files']} files skipped"
        + _lineage(dataset),
        f"- **Classes** ({len(model['classes'])}): {', '.join(model['classes'])}",
        f"- **Seed**: {card['seed']}",
        "",
        "## Results",
        "",
        f"Best epoch {card['metrics']['best_epoch']} of {card['metrics']['epochs_run']}"
        f"{' (stopped early)' if card['metrics']['stopped_early'] else ''}.",
        "",
    ]
    multi = model.get("task") == "multi_label"
    lines += _results_table(card["evaluation"], multi=multi)
    confused = card["evaluation"].get("val", {}).get("most_confused", [])
    if confused:
        said = "missed, said instead" if multi else "true → predicted"
        lines += ["", f"Most confused (val, {said}): " + "; ".join(
            f"{p['true']} → {p['predicted']} ×{p['count']}" for p in confused)]
    lines += _worst_lines(card["evaluation"])
    lines += _calibration_lines(card.get("calibration"), multi=multi)
    lines += _serving_lines(card.get("serving"))
    lines += _recipe_lines(card)
    lines += _per_class_lines(card["per_class"], multi=multi)
    lines += _curve_lines(card["training_curve"], multi=multi)
    env = card["environment"]
    lines += ["", "## Reproduce", "", "Spec (resolved: the values this run used in place of "
              "\"auto\"):", "", "```json", json.dumps(card["resolved_spec"], indent=2), "```",
              "", _still_auto_line(card.get("still_auto") or []), "",
              f"Environment: device {env['device']}, precision {env['precision']}; "
              + ", ".join(f"{k} {v}" for k, v in (env["versions"] or {}).items()),
              f"Timings: trained in {_fmt(card['timings']['train_seconds'])} s; job "
              f"{card['timings']['job_started_at']} → {card['timings']['job_finished_at']}.", ""]
    return "\n".join(lines)
