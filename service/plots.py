"""Pictures of a run, drawn with matplotlib off-screen: training curves and the confusion
matrix, readable from 2 to 100 classes. Every string a user chose (class names, titles) is
drawn literally: mathtext would parse "$...$" and fail on unknown commands or deep nesting."""

from __future__ import annotations

import io
from typing import TypedDict

# Figure, not pyplot: no global state, so concurrent requests can draw in threads (this is
# matplotlib's recipe for web servers).
from matplotlib.figure import Figure


class _TextOptions(TypedDict):
    parse_math: bool


# Keyword arguments that draw a string as written (typed, so each call's keywords check).
LITERAL: _TextOptions = {"parse_math": False}


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def curves_png(rows: list[dict], title: str) -> bytes:
    """Loss and accuracy against epoch, train and val; works with zero or one epoch too."""
    figure = Figure(figsize=(10, 4))
    loss_ax, acc_ax = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in rows]
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}_{key}") for row in rows]
            points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    acc_ax.set_ylim(0, 1)
    figure.suptitle(title if rows else f"{title} (no finished epoch yet)", **LITERAL)
    return figure_png(figure)


def confusion_png(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    """Rows true, columns predicted, each row normalised; counts written up to 20 classes."""
    n = len(classes)
    side = min(30.0, max(5.0, 0.28 * n + 3))
    figure = Figure(figsize=(side, side))
    ax = figure.subplots()
    totals = [max(1, sum(row)) for row in matrix]
    shares = [[value / total for value in row] for row, total in zip(matrix, totals,
                                                                        strict=True)]
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    font = max(6.0, min(10.0, 300 / max(n, 1)))
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font, **LITERAL)
    ax.set_yticks(range(n), classes, fontsize=font, **LITERAL)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=font,
                            color="white" if shares[i][j] > 0.5 else "black")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title, **LITERAL)
    return figure_png(figure)


def reliability_png(before: list[dict], after: list[dict], title: str) -> bytes:
    """The reliability diagram: how often right against how sure, per confidence bin,
    before and after calibration; the diagonal is perfect calibration."""
    figure = Figure(figsize=(5.5, 5))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
    for bins, style, label in ((before, "-o", "before calibration"),
                               (after, "-s", "after calibration")):
        points = [(b["confidence"], b["accuracy"]) for b in bins if b["count"]]
        if points:
            ax.plot(*zip(*points, strict=True), style, markersize=4, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("how often right")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title, **LITERAL)
    return figure_png(figure)


LEGEND_CLASSES = 12  # more curves than this are drawn without a legend entry each


def pr_curves_png(curves: dict[str, list[list[float]]], title: str) -> bytes:
    """Precision against recall, one curve per class (multi-label models)."""
    figure = Figure(figsize=(6, 5))
    ax = figure.subplots()
    for name, points in curves.items():
        if points:
            label = name if len(curves) <= LEGEND_CLASSES else None
            ax.plot(*zip(*points, strict=True), linewidth=1.2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        legend = ax.legend(loc="lower left", fontsize=8)
        for text in legend.get_texts():
            text.set_parse_math(False)
    ax.set_title(title, **LITERAL)
    return figure_png(figure)


WORST_COLUMNS = 4


def worst_png(rows: list[dict], title: str) -> bytes:
    """The worst files' overlays (their Grad-CAM heat maps over the image), each titled
    with the truth and the class explained."""
    import base64

    from PIL import Image

    shown = [row for row in rows if row.get("overlay_png")]
    columns = min(WORST_COLUMNS, max(1, len(shown)))
    lines = max(1, -(-len(shown) // columns))
    figure = Figure(figsize=(2.4 * columns, 2.7 * lines))
    axes = figure.subplots(lines, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown, strict=False):
        picture = Image.open(io.BytesIO(base64.b64decode(row["overlay_png"])))
        ax.imshow(picture)
        truth = row["true"] if isinstance(row["true"], str) else ", ".join(row["true"]) or "none"
        ax.set_title(f"{row['path'][-28:]}\ntrue: {truth[:28]}\nlooked for: "
                     f"{row['explained'][:24]}", fontsize=7, **LITERAL)
    figure.suptitle(title, **LITERAL)
    return figure_png(figure)
