"""Which task a job trains, and whether its spec fits the dataset: no torch here, so the API
checks a job at submit as the engine does (``models.tasks`` holds what training needs)."""

from __future__ import annotations

from ftune.models.data.layout import MULTI_LABEL, SINGLE_LABEL
from ftune.models.spec import MULTI_LABEL_PSEUDO

__all__ = ["MULTI_LABEL", "SINGLE_LABEL", "task_name", "task_problem"]


def task_name(requested: str, dataset_task: str) -> str:
    """The task a job trains: the spec's, or the dataset's when the spec says ``auto``."""
    return dataset_task if requested == "auto" else requested


def task_problem(requested: str, dataset_task: str, *, monitor: str,
                 pseudo_label_rounds: int) -> str | None:
    """Why a spec cannot train on a dataset of this task (None: it can). A single-label
    dataset may train as multi-label (one label each), not the reverse."""
    name = task_name(requested, dataset_task)
    if name == SINGLE_LABEL and dataset_task == MULTI_LABEL:
        return ("task single_label needs one label per image, and this dataset is multi-label "
                "(some images carry several labels, or none); use task multi_label or auto")
    if name == SINGLE_LABEL and monitor == "val_map":
        return "early_stopping.monitor val_map is for multi-label jobs"
    if name == MULTI_LABEL and pseudo_label_rounds > 0:
        return MULTI_LABEL_PSEUDO
    return None


VAL_WITHOUT_LABELS = ("the val split has no image with a label: a multi-label model cannot be "
                      "validated (nor its thresholds chosen) on it; label some val images, or "
                      "remove val/ so that val is carved from train")
