"""Follow a job in a terminal: a live progress bar, a line per stage and choice, and the epoch
table, from its event stream. Exit status 0 when it succeeds, 1 otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from ftune.client.events import Event
from ftune.client.progress import ProgressBar
from ftune.client.resources import Job

COLUMNS = ("epoch", "stage", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
           "seconds")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


class JobWatcher:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.bar: ProgressBar | None = None
        self.header_shown = False
        self.status = ""
        self.choices: dict[str, object] = {}  # resolved events repeat earlier choices
        self.epochs_done = 0  # the last epoch finished
        # The training stage being run: its name, the epochs done when it began, its own.
        self.stage: tuple[str, int, int] | None = None

    def _label(self, epoch: int) -> str:
        """``finetune epoch 2/12``: the stage's own epochs (the job's count when unknown)."""
        if self.stage is None:
            return f"epoch {epoch}"
        name, start, epochs = self.stage
        return f"{name} epoch {epoch - start}/{epochs}"

    def show(self, event: Event) -> None:
        data = event.data
        if event.kind == "progress":
            label = self._label(int(data["epoch"]))
            if self.bar is None:
                self.bar = ProgressBar(label, None, stream=sys.stderr)
            self.bar.label, self.bar.total = label, data.get("steps")
            self.bar.update(data.get("step", 0))
            return
        self._end_bar()
        if event.kind == "epoch":
            self.epochs_done = int(data.get("epoch", self.epochs_done))
            if not self.header_shown:
                self._line("  ".join(f"{c:>14}" for c in COLUMNS))
                self.header_shown = True
            self._line("  ".join(f"{_cell(data.get(c)):>14}" for c in COLUMNS))
        elif event.kind == "status":
            self.status = data.get("status", "")
            reason = data.get("reason") or data.get("error") or ""
            self._line(f"status: {self.status}" + (f" ({reason})" if reason else ""))
        elif event.kind == "stage":
            own = data.get("stage_epochs")
            self.stage = (data["stage"], self.epochs_done, own) if own else None
            self._line(f"stage: {data.get('stage')}" + (f" (up to {own} epochs)" if own else ""))
        elif event.kind == "resolved":
            for name, choice in data.items():
                if isinstance(choice, dict) and self.choices.get(name) != choice.get("value"):
                    self.choices[name] = choice.get("value")
                    self._line(f"auto {name} = {choice['value']}: {choice.get('why', '')}")
        elif event.kind == "note":
            self._line(f"note: {data.get('message', data)}")

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _end_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def watch_job(job: Job, out: TextIO | None = None) -> int:
    watcher = JobWatcher(out or sys.stdout)
    for event in job.stream():
        watcher.show(event)
    watcher._end_bar()
    job.refresh()
    if job.status == "succeeded":
        watcher._line(f"model: {job.model_id}")
        return 0
    watcher._line(f"job {job.id} {job.status}" + (f": {job.error}" if job.error else ""))
    return 1
