"""The lint report's checks and figures for a multi-label dataset: how many labels an image
carries, which labels come together, and which classes have too few positives (or negatives)
to learn or to evaluate."""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import TYPE_CHECKING

from ftune.models.data.findings import Finding, add

if TYPE_CHECKING:
    from ftune.models.data.inspect import FileFacts
    from ftune.models.data.layout import Listing

TOP_PAIRS = 10  # co-occurring label pairs listed in the report


def check(findings: list[Finding], listing: Listing, facts: list[FileFacts],
          classes: list[str], counts: dict[str, dict[str, int]], labelled: list, *,
          min_per_class: int, checked: bool) -> dict:
    """Add the multi-label findings; return the label-set figures for the report."""
    if not classes:
        add(findings, "too_few_classes", "error", "found no labels: no image in train has one",
            "Give the training images their labels in labels.csv ('path,labels', labels "
            "separated by ';' or '|').")
    if listing.candidates and checked and all(f.error is not None for f in facts):
        add(findings, "nothing_decodable", "error", "none of the images could be decoded",
            "Check that the files are real images (JPEG, PNG, BMP, GIF, WebP, TIFF).")
    train = counts.get("train", {})
    train_images = sum(1 for c, _ in labelled if c.split == "train")
    _positives(findings, train, train_images, min_per_class)
    unknown = sorted({f"{c.split}/{name}" for c in listing.candidates if c.split != "train"
                      for name in c.names if name not in classes})
    if unknown:
        add(findings, "classes_missing_from_train", "warning",
            f"{len(unknown)} label(s) appear in val/test but not in train; they are not "
            "learned or evaluated", "Label training images with them, or remove them from "
            "val/test.", unknown)
    for split in ("val", "test"):
        images = sum(1 for c, _ in labelled if c.split == split)
        if images and not any(counts.get(split, {}).values()):
            add(findings, f"{split}_without_labels", "error" if split == "val" else "warning",
                f"the {split} split's {images} image(s) carry no label known to train",
                "Label them (a multi-label model is validated and its thresholds chosen on "
                "val), or leave the split out: val is then carved from train."
                if split == "val" else "Label them, or leave the split out: its metrics "
                "would be empty.")
    empty = [c.rel for c, _ in labelled if not c.names]
    if empty:
        add(findings, "images_without_labels", "info",
            f"{len(empty)} image(s) carry no label: each is a negative for every class",
            "Nothing to do if that is right; otherwise give them their labels.", empty)
    return figures(labelled)


def _positives(findings: list[Finding], train: dict[str, int], train_images: int,
               min_per_class: int) -> None:
    few = [{"class": c, "positives": n} for c, n in train.items() if n < min_per_class]
    if few:
        add(findings, "too_few_positives", "error",
            f"{len(few)} label(s) are on fewer than {min_per_class} usable training images",
            f"Label at least {min_per_class} training images with each, or remove the label "
            "from labels.csv.", few)
    everywhere = [{"class": c, "negatives": train_images - n} for c, n in train.items()
                  if n >= min_per_class and train_images - n < min_per_class]
    if everywhere:
        add(findings, "too_few_negatives", "warning",
            f"{len(everywhere)} label(s) are on nearly every training image, so there is "
            "little to tell them apart from", "Add training images without these labels, or "
            "drop labels that are always true.", everywhere)


def figures(labelled: list) -> dict:
    """Labels per image (mean and histogram) and the most frequent pairs of labels."""
    sizes = Counter(len(c.names) for c, _ in labelled)
    pairs: Counter[tuple[str, str]] = Counter()
    for cand, _ in labelled:
        pairs.update(combinations(cand.names, 2))
    images = sum(sizes.values())
    return {"cardinality": round(sum(k * n for k, n in sizes.items()) / images, 3)
            if images else 0.0,
            "labels_per_image": {str(k): sizes[k] for k in sorted(sizes)},
            "co_occurrence": [{"labels": list(pair), "images": n}
                              for pair, n in pairs.most_common(TOP_PAIRS)]}
