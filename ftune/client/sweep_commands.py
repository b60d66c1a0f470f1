"""``ftune remote sweeps ...``: start, follow, cancel and promote hyperparameter sweeps."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftune.client.client import Client
from ftune.client.errors import FtuneError
from ftune.client.resources import Sweep

Add = Callable[..., argparse.ArgumentParser]


def _json_arg(text: str | None, name: str) -> dict:
    text = text or "{}"
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    value = json.loads(text)
    if not isinstance(value, dict):
        raise FtuneError(f"{name}: must be a JSON object")
    return value


def _summary(sweep: Sweep) -> str:
    best = sweep.best_trial
    shown = (f"best trial {best['number']}: {best['value']} {best['params']}" if best
             else "no finished trial yet")
    return f"sweep {sweep.id}: {sweep.status}, {len(sweep.trials)} trial(s); {shown}"


def start(client: Client, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"objective": args.objective, "n_trials": args.trials,
                               "parallelism": args.parallelism, "pruner": args.pruner,
                               "sampler": args.sampler}
    if args.max_total_s is not None:
        options["max_total_s"] = args.max_total_s
    sweep = client.sweeps.create(args.dataset, _json_arg(args.space, "--space"),
                                 _json_arg(args.base, "--base"), **options)
    print(_summary(sweep))
    return watch(client, argparse.Namespace(sweep=sweep.id, json=False)) if args.watch else 0


def listing(client: Client, args: argparse.Namespace) -> int:
    for sweep in client.sweeps.list():
        print(_summary(sweep))
    return 0


def show(client: Client, args: argparse.Namespace) -> int:
    sweep = client.sweeps.get(args.sweep)
    print(_summary(sweep))
    for trial in sweep.trials:
        print(f"  trial {trial['number']}: {trial['status']:<9} epochs {trial['epoch']}/"
              f"{trial['epochs']}  value {trial['value']}  {trial['params']}")
    return 0


def watch(client: Client, args: argparse.Namespace) -> int:
    """Each trial's start and end as they happen; exit 0 when the sweep succeeds."""
    sweep = client.sweeps.get(args.sweep)
    for event in sweep.stream():
        data = event.data
        if event.kind == "trial":
            best = data.get("best") or {}
            print(f"trial {data.get('number')}: {data.get('status')}"
                  + (f" {data.get('params')}" if data.get("params") else "")
                  + (f" best {best}" if best else ""), flush=True)
        elif event.kind in ("status", "note"):
            print(f"sweep: {data.get('status') or data.get('message')}"
                  + (f" ({data['reason']})" if data.get("reason") else ""), flush=True)
    sweep.refresh()
    print(_summary(sweep))
    return 0 if sweep.status == "succeeded" else 1


def cancel(client: Client, args: argparse.Namespace) -> int:
    print(_summary(client.sweeps.get(args.sweep).cancel()))
    return 0


def promote(client: Client, args: argparse.Namespace) -> int:
    done = client.sweeps.get(args.sweep).promote(args.alias)
    print(f"{done['alias']} -> model {done['model_id']} (trial {done['trial']})")
    return 0


def add_commands(groups: argparse._SubParsersAction, add: Add) -> None:
    sweeps = groups.add_parser("sweeps", help="search hyperparameters: trials are jobs")
    sub = sweeps.add_subparsers(dest="command", required=True)
    add(sub, "start", start, "start a sweep", ("dataset", {}),
        ("--space", {"required": True, "help": "JSON (or @file): spec path -> distribution, "
                     "e.g. {\"optimizer.lr\": {\"log_uniform\": [1e-4, 1e-2]}}"}),
        ("--base", {"help": "the spec every trial starts from: JSON, or @file.json"}),
        ("--objective", {"default": "val_accuracy",
                         "choices": ["val_accuracy", "val_loss", "val_map"]}),
        ("--trials", {"type": int, "default": 10}), ("--parallelism", {"type": int, "default": 2}),
        ("--pruner", {"default": "median", "choices": ["median", "asha", "none"]}),
        ("--sampler", {"default": "tpe", "choices": ["tpe", "random", "grid"]}),
        ("--max-total-s", {"type": float}),
        ("--watch", {"action": "store_true", "help": "follow it until it ends"}))
    add(sub, "list", listing, "your sweeps")
    add(sub, "show", show, "a sweep and its trials", ("sweep", {}))
    add(sub, "watch", watch, "follow a sweep live; exit 0 when it succeeds", ("sweep", {}))
    add(sub, "cancel", cancel, "cancel a sweep and its trials", ("sweep", {}))
    add(sub, "promote", promote, "point name:ALIAS at the best trial's model", ("sweep", {}),
        ("--alias", {"default": "best"}))
