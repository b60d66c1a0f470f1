"""The sweep's picture: the objective of each trial against time (with the best so far), and
the objective against the parameters that matter most."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from ftune.service.plots import LITERAL, figure_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TOP_PARAMS = 3
COLOURS = {"succeeded": "tab:blue", "pruned": "tab:orange", "running": "tab:green"}


def importance(trials: list[dict], path: str) -> float:
    """How much the objective moves with a parameter, 0 to 1: for numbers the rank
    correlation's size, for choices the spread of the group means over the objective's."""
    pairs = [(t["params"].get(path), t["value"]) for t in trials if t["value"] is not None]
    if len(pairs) < 3:
        return 0.0
    values = [v for _, v in pairs]
    spread = max(values) - min(values)
    if spread == 0:
        return 0.0
    if all(isinstance(p, (int, float)) and not isinstance(p, bool) for p, _ in pairs):
        return abs(_spearman([float(p) for p, _ in pairs], values))
    groups: dict[str, list[float]] = {}
    for p, v in pairs:
        groups.setdefault(repr(p), []).append(v)
    means = [sum(g) / len(g) for g in groups.values()]
    return (max(means) - min(means)) / spread


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def _spearman(xs: list[float], ys: list[float]) -> float:
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else 0.0


def sweep_png(view: dict, finished_s: dict[int, float]) -> bytes:
    """``view``: the sweep's view; ``finished_s``: trial number -> seconds from the sweep's
    start to the trial's end (or to now, while it runs)."""
    trials = view["trials"]
    params = sorted(view["space"], key=lambda p: -importance(trials, p))[:TOP_PARAMS]
    figure = Figure(figsize=(4.5 * (1 + len(params)), 4))
    axes = figure.subplots(1, 1 + len(params), squeeze=False)[0]
    _over_time(axes[0], trials, finished_s, view)
    for ax, path in zip(axes[1:], params, strict=True):
        _against(ax, trials, path, view["objective"], importance(trials, path))
        if "log_uniform" in view["space"][path]:
            ax.set_xscale("log")
    figure.suptitle(f"sweep {view['id'][:8]}: {view['status']}, "
                    f"{len(trials)} of {view['n_trials']} trials", **LITERAL)
    return figure_png(figure)


def _over_time(ax: Axes, trials: list[dict], finished_s: dict[int, float],
               view: dict) -> None:
    maximise = view["direction"] == "maximize"
    points = sorted((finished_s.get(t["number"], 0.0), t["value"], t["status"])
                    for t in trials if t["value"] is not None)
    for status, colour in COLOURS.items():
        mine = [(x, y) for x, y, s in points if s == status]
        if mine:
            xs, ys = zip(*mine, strict=True)
            ax.scatter(xs, ys, color=colour, label=status, s=18)
    best, line = None, []
    for x, y, status in points:
        if status == "succeeded" and (best is None or (y > best if maximise else y < best)):
            best = y
        if best is not None:
            line.append((x, best))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="black", label="best so far")
    ax.set_xlabel("seconds since the sweep started")
    ax.set_ylabel(view["objective"])
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)


def _against(ax: Axes, trials: list[dict], path: str, objective: str,
             weight: float) -> None:
    pairs = [(t["params"].get(path), t["value"], t["status"]) for t in trials
             if t["value"] is not None]
    numeric = all(isinstance(p, (int, float)) and not isinstance(p, bool) for p, _, _ in pairs)
    labels = sorted({repr(p) for p, _, _ in pairs}) if not numeric else []
    for p, y, status in pairs:
        x = p if numeric else labels.index(repr(p))
        ax.scatter([x], [y], color=COLOURS.get(status, "grey"), s=18)
    if labels:
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_xlabel(f"{path} (importance {weight:.2f})", **LITERAL)
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
