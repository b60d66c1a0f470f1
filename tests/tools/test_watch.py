"""``ftune remote jobs watch``'s lines and progress label, from a job's events (the events as
the API sends them; the live path is covered by test_remote_cli.py)."""

from __future__ import annotations

import io

from ftune.client.events import Event
from ftune.client.watch import JobWatcher


def test_progress_counts_the_stage_s_own_epochs_not_the_job_s():
    out = io.StringIO()
    watcher = JobWatcher(out)
    watcher.show(Event(1, "stage", {"stage": "head", "epochs": 52, "stage_epochs": 40}))
    assert watcher._label(3) == "head epoch 3/40"
    for epoch in range(1, 41):
        watcher.show(Event(1 + epoch, "epoch", {"epoch": epoch, "stage": "head"}))
    watcher.show(Event(50, "stage", {"stage": "finetune", "epochs": 52, "stage_epochs": 12}))
    # Epoch 41 of the job is the fine-tuning stage's first: "epoch 41/52" said nothing of it.
    assert watcher._label(41) == "finetune epoch 1/12"
    watcher.show(Event(51, "stage", {"stage": "evaluate", "epochs": 52}))
    assert watcher._label(52) == "epoch 52"
    lines = out.getvalue().splitlines()
    assert "stage: finetune (up to 12 epochs)" in lines and "stage: evaluate" in lines
