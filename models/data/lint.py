"""The dataset lint report: what is in the data, what is wrong with it, and what to do.

Errors block training (and an upload); warnings never do. Every finding carries an action.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ftune.models.data import multilabel_lint
from ftune.models.data.copies import kept_indices
from ftune.models.data.findings import Finding
from ftune.models.data.findings import add as _add
from ftune.models.data.layout import MULTI_LABEL, SINGLE_LABEL, UNLABELED
from ftune.models.recipe.stats import size_summary

if TYPE_CHECKING:
    from ftune.models.data.inspect import FileFacts
    from ftune.models.data.layout import Listing

IMBALANCE_WARNING = 10.0
SMALL_SIDE = 32
EXTREME_ASPECT = 5.0


@dataclass
class LintReport:
    layout: str
    classes: list[str]
    splits: dict[str, dict[str, int]]  # split -> class -> usable images
    imbalance_ratio: float | None
    ignored: dict[str, int]  # reason -> files
    findings: list[Finding] = field(default_factory=list)
    image_sizes: dict | None = None  # median short side etc. (models.recipe.stats)
    unlabeled: int = 0  # usable unlabelled images, copies of labelled ones not counted
    task: str = SINGLE_LABEL  # or MULTI_LABEL: then splits count each class's positives
    images: dict[str, int] = field(default_factory=dict)  # split -> usable labelled images
    label_sets: dict | None = None  # multi-label: cardinality and co-occurrence

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def num_images(self) -> int:
        if self.images:
            return sum(self.images.values())
        return sum(sum(counts.values()) for counts in self.splits.values())

    def split_images(self, split: str) -> int:
        return self.images.get(split, sum(self.splits.get(split, {}).values()))

    def to_dict(self) -> dict:
        by = defaultdict(list)
        for finding in self.findings:
            by[finding.severity].append(asdict(finding))
        return {"ok": self.ok, "layout": self.layout, "task": self.task,
                "classes": self.classes,
                "num_classes": len(self.classes), "num_images": self.num_images,
                "splits": {s: {"images": self.split_images(s), "per_class": c}
                           for s, c in self.splits.items()},
                "label_sets": self.label_sets,
                "imbalance_ratio": self.imbalance_ratio, "ignored": self.ignored,
                "image_sizes": self.image_sizes, "unlabeled": {"images": self.unlabeled},
                "errors": by["error"], "warnings": by["warning"], "info": by["info"]}


def build_report(listing: Listing, facts: list[FileFacts], classes: list[str], *,
                 min_per_class: int, checked: bool) -> LintReport:
    findings: list[Finding] = []
    pairs = list(zip(listing.candidates, facts, strict=True))
    usable = [(c, f) for c, f in pairs if f.error is None]
    labelled = [(c, f) for c, f in usable if c.split != UNLABELED]
    counts = _count_usable(listing, usable, classes)
    _layout_problems(findings, listing)
    label_sets = None
    if listing.layout == UNLABELED:
        if not usable and checked:
            _add(findings, "no_images", "error", "found no usable image",
                 "Put the unlabelled images in the archive, in any folders.")
    elif listing.task == MULTI_LABEL:
        label_sets = multilabel_lint.check(findings, listing, facts, classes, counts,
                                           labelled, min_per_class=min_per_class,
                                           checked=checked)
    else:
        _structure_errors(findings, listing, facts, classes, counts, min_per_class, checked)
    _corrupt(findings, pairs)
    _duplicates(findings, labelled)
    unlabeled = _unlabeled(findings, usable)
    _names(findings, listing, classes)
    _sizes(findings, usable)
    ratio = _imbalance(findings, counts.get("train", {}))
    _missing_from_splits(findings, counts, classes)
    ignored = _ignored(findings, listing)
    sizes = size_summary([(f.width, f.height) for _, f in usable if f.width and f.height])
    images = dict(Counter(c.split for c, _ in labelled))
    return LintReport(listing.layout, classes, counts, ratio, ignored, findings, sizes,
                      unlabeled, listing.task, {s: images.get(s, 0) for s in counts},
                      label_sets)


def _unlabeled(findings: list[Finding], usable: list) -> int:
    """Unlabelled images that count: copies of labelled ones (or of each other) do not."""
    labelled = {f.sha256: c.rel for c, f in usable if c.split != UNLABELED and f.sha256}
    unlabeled = [(c, f) for c, f in usable if c.split == UNLABELED]
    copies = [[c.rel, labelled[f.sha256]] for c, f in unlabeled if f.sha256 in labelled]
    count = len(kept_indices([f.sha256 for _, f in unlabeled], set(labelled)))
    if copies:
        _add(findings, "unlabeled_copies", "warning",
             f"{len(copies)} unlabelled image(s) are copies of labelled ones and are not used",
             "Remove them from unlabeled/: a copy of a training image adds nothing, and one "
             "of a val or test image would let pretraining see held-out images.", copies)
    if count:
        _add(findings, "unlabeled_images", "info", f"{count} unlabelled image(s)",
             "They can be used by pretraining (spec.pretrain) and pseudo-labels "
             "(spec.pseudo_labels).")
    return count


def _count_usable(listing: Listing, usable: list, classes: list[str]) -> dict[str, dict[str, int]]:
    """Usable images per split and class; classes unknown to train are not counted."""
    counts = {split: {cls: 0 for cls in (classes if split == "train" else
                                         [n for n in names if n in classes])}
              for split, names in listing.declared.items()}
    for cand, _ in usable:
        split_counts = counts.get(cand.split, {})
        for name in cand.names:
            if name in split_counts:
                split_counts[name] += 1
    return counts


_PROBLEM_ACTIONS = {
    "manifest_invalid": "Write labels.csv with a header line 'path,label' (optionally "
                        "',split') and one row per image; for several labels per image, "
                        "'path,labels' with the labels separated by ';' or '|'.",
    "val_without_train": "Put the training images under train/<class>/.",
    "reserved_name": "Rename that class (folder or label); unlabelled images go in an "
                     "unlabeled/ folder beside the class folders or beside train/.",
}


def _layout_problems(findings: list[Finding], listing: Listing) -> None:
    for code, message, items, count in listing.problems:
        blocking = code in _PROBLEM_ACTIONS
        action = _PROBLEM_ACTIONS.get(
            code, "Fix or remove these rows; the files they name were not used.")
        _add(findings, code, "error" if blocking else "warning", message, action, items, count)


def _corrupt(findings: list[Finding], pairs: list) -> None:
    corrupt = [{"path": c.rel, "reason": f.error} for c, f in pairs if f.error is not None]
    if corrupt:
        _add(findings, "corrupt_files", "warning",
             f"{len(corrupt)} file(s) could not be used and were skipped",
             "Re-export or remove them; each entry gives the reason.", corrupt)


def _imbalance(findings: list[Finding], train: dict[str, int]) -> float | None:
    """The largest class over the smallest (ignoring empty ones); a warning from 10:1."""
    nonzero = [n for n in train.values() if n]
    ratio = round(max(nonzero) / min(nonzero), 2) if nonzero else None
    if ratio is not None and ratio >= IMBALANCE_WARNING:
        smallest = sorted(train, key=train.__getitem__)[:5]
        _add(findings, "imbalance", "warning",
             f"classes are imbalanced: the largest has {ratio:g}× the images of the smallest",
             "Collect more images of the small classes (listed), or expect them to be "
             "predicted less often.", [{"class": c, "images": train[c]} for c in smallest])
    return ratio


def _missing_from_splits(findings: list[Finding], counts: dict[str, dict[str, int]],
                         classes: list[str]) -> None:
    for split in ("val", "test"):
        if split not in counts:
            continue
        missing = [c for c in classes if counts[split].get(c, 0) == 0]
        if missing:
            _add(findings, f"{split}_missing_classes", "warning",
                 f"{split}/ has no images of {len(missing)} class(es)",
                 f"Add {split} images of these classes; their {split} metrics are missing.",
                 missing)


def _ignored(findings: list[Finding], listing: Listing) -> dict[str, int]:
    ignored = dict(Counter(reason for _, reason in listing.ignored))
    if listing.ignored:
        summary = ", ".join(f"{n} {reason}" for reason, n in ignored.items())
        _add(findings, "ignored_files", "info",
             f"{len(listing.ignored)} file(s) ignored ({summary})",
             "Nothing to do unless some of them are images that should be used: give them "
             "an image extension and put them in a class folder.",
             [{"path": p, "reason": r} for p, r in listing.ignored])
    return ignored


def _structure_errors(findings: list[Finding], listing: Listing, facts: list[FileFacts],
                      classes: list[str], counts: dict[str, dict[str, int]],
                      min_per_class: int, checked: bool) -> None:
    if len(classes) == 1:
        _add(findings, "too_few_classes", "error",
             f"found one class ({classes[0]}); a classifier needs at least 2 classes",
             "Add at least one more class: a folder of its images next to "
             f"{classes[0]}/ (DATA/<class>/<images>), or rows with another label in "
             "labels.csv.")
    elif not classes:
        _add(findings, "too_few_classes", "error",
             "found no classes; a classifier needs at least 2 classes",
             "Put each class's images in its own folder: DATA/<class>/<images> or "
             "DATA/train/<class>/..., or list them in labels.csv.")
    if listing.candidates and checked and all(f.error is not None for f in facts):
        _add(findings, "nothing_decodable", "error", "none of the images could be decoded",
             "Check that the files are real images (JPEG, PNG, BMP, GIF, WebP, TIFF).")
    few = [{"class": c, "images": n} for c, n in counts.get("train", {}).items()
           if n < min_per_class]
    if few and len(classes) >= 2:
        _add(findings, "too_few_images", "error",
             f"{len(few)} class(es) have fewer than {min_per_class} usable training images",
             f"Add images so each class has at least {min_per_class}, or remove the class "
             "folder.", few)
    unknown = sorted({f"{c.split}/{c.cls}" for c in listing.candidates
                      if c.split != "train" and c.cls not in classes})
    if unknown:
        _add(findings, "classes_missing_from_train", "warning",
             f"{len(unknown)} class(es) appear in val/test but not in train; their images "
             "are not used", "Add training images of these classes, or remove them from "
             "val/test.", unknown)


def _duplicates(findings: list[Finding], usable: list) -> None:
    by_hash = defaultdict(list)
    for cand, fact in usable:
        if fact.sha256:
            by_hash[fact.sha256].append(cand)
    groups = [g for g in by_hash.values() if len(g) > 1]
    same_split = [[c.rel for c in g] for g in groups
                  if len({c.split for c in g}) == 1 and len({c.label_key for c in g}) == 1]
    leaks = [[c.rel for c in g] for g in groups
             if "train" in {c.split for c in g} and len({c.split for c in g}) > 1]
    conflicts = [[f"{c.rel} ({c.label_key})" for c in g] for g in groups
                 if len({c.label_key for c in g}) > 1]
    if same_split:
        _add(findings, "duplicates", "warning",
             f"{sum(len(g) - 1 for g in same_split)} exact duplicate file(s) in "
             f"{len(same_split)} group(s)",
             "Keep one copy of each: duplicates over-weight those images.", same_split)
    if leaks:
        _add(findings, "leakage", "warning",
             f"{len(leaks)} image(s) are in train and also in val/test",
             "Remove them from one side, or validation scores will be too optimistic.", leaks)
    if conflicts:
        _add(findings, "conflicting_labels", "warning",
             f"{len(conflicts)} identical image(s) carry different labels",
             "Decide on one label for each and remove the other copies.", conflicts)


def _names(findings: list[Finding], listing: Listing, classes: list[str]) -> None:
    names = set(classes)
    for declared in listing.declared.values():
        names.update(declared)
    groups = defaultdict(set)
    for name in names:
        groups[name.strip().casefold()].add(name)
    similar = [sorted(g) for g in groups.values() if len(g) > 1]
    if similar:
        _add(findings, "similar_class_names", "warning",
             f"{len(similar)} group(s) of class names differ only by case or spaces, and "
             "are treated as different classes",
             "Merge each group into one folder (or one label) if they mean the same thing.",
             similar)


def _sizes(findings: list[Finding], usable: list) -> None:
    small = [{"path": c.rel, "size": [f.width, f.height]} for c, f in usable
             if f.width and min(f.width, f.height) < SMALL_SIDE]
    stretched = [{"path": c.rel, "size": [f.width, f.height]} for c, f in usable
                 if f.width and max(f.width, f.height) / min(f.width, f.height) > EXTREME_ASPECT]
    if small:
        _add(findings, "small_images", "warning",
             f"{len(small)} image(s) are smaller than {SMALL_SIDE} px on a side",
             "They are upscaled for training and carry little detail; use larger originals "
             "if you have them.", small)
    if stretched:
        _add(findings, "extreme_aspect_ratio", "warning",
             f"{len(stretched)} image(s) are more than {EXTREME_ASPECT:g}× wider than tall or "
             "the reverse", "The centre crop drops most of them; crop them to the subject.",
             stretched)
