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
