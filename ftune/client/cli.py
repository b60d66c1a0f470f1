"""``ftune remote ...``: the API from the command line, through the Python client.

Reads ``FTUNE_URL`` and ``FTUNE_API_KEY``, or the file ``ftune remote login`` writes. Needs
only httpx, so it works from the light install (``pip install ftune``)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftune.client import sweep_commands
from ftune.client.client import Client
from ftune.client.config import save_login
from ftune.client.errors import ApiError, FtuneError
from ftune.client.watch import watch_job

# The API's download formats (the server's table is ftune.models.export_formats, which this
# light install cannot import; tests/models/test_export_formats.py keeps the two equal).
DOWNLOAD_FORMATS = ("safetensors", "onnx", "torchscript", "triton", "onnx-int8")

Handler = Callable[[Client, argparse.Namespace], int]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict], columns: list[str]) -> None:
    """Aligned columns, a header line, one row per item."""
    cells = [[str(row.get(c, "") if row.get(c) is not None else "") for c in columns]
             for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _spec(args: argparse.Namespace) -> dict:
    """``--spec`` (JSON, or @file) with ``--set path=value`` on top (values parsed as JSON
    where they are JSON: numbers, true, null)."""
    text = args.spec or "{}"
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    spec = json.loads(text)
    if not isinstance(spec, dict):
        raise FtuneError("--spec: must be a JSON object")
    for item in args.set or []:
        path, sep, raw = item.partition("=")
        if not sep:
            raise FtuneError(f"--set {item}: write it as path=value, e.g. optimizer.lr=0.001")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = path.split(".")
        target = spec
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return spec


def datasets_upload(client: Client, args: argparse.Namespace) -> int:
    dataset = client.datasets.upload(args.path, name=args.name, dedupe=not args.no_dedupe,
                                     progress=not args.json, kind=args.kind)
    if args.json:
        _print_json(dataset.raw)
        return 0
    note = " (already uploaded: the existing dataset)" if dataset.raw.get("deduplicated") \
        else ""
    print(f"dataset {dataset.id}: {dataset.name}, {dataset.num_images} images, "
          f"{len(dataset.classes)} classes{note}")
    _print_report_summary(dataset.report or {})
    return 0


def _print_report_summary(report: dict) -> None:
    """Errors first, each with what to do; then warnings."""
    for level in ("errors", "warnings"):
        for finding in report.get(level, []):
            print(f"  {level[:-1]}: {finding.get('message')}")
            if finding.get("action"):
                print(f"    -> {finding['action']}")


def datasets_list(client: Client, args: argparse.Namespace) -> int:
    items = [d.raw for d in client.datasets.list()]
    if args.json:
        _print_json(items)
    else:
        _table(items, ["id", "name", "num_images", "created_at"])
    return 0


def datasets_report(client: Client, args: argparse.Namespace) -> int:
    report = client.datasets.report(args.dataset)
    if args.json:
        _print_json(report)
    else:
        print(f"{report.get('num_images')} images, {report.get('num_classes')} classes, "
              f"layout {report.get('layout')}: {'ok' if report.get('ok') else 'NOT usable'}")
        _print_report_summary(report)
        for split, counts in (report.get("splits") or {}).items():
            print(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in
                                            counts.get("per_class", {}).items()))
    return 0


def jobs_submit(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.create(args.dataset, _spec(args), priority=args.priority,
                             unlabeled_dataset=args.unlabeled_dataset)
    if args.json and not args.watch:
        _print_json(job.raw)
        return 0
    print(f"job {job.id}: {job.status}")
    return watch_job(job) if args.watch else 0


def jobs_list(client: Client, args: argparse.Namespace) -> int:
    items = [j.raw for j in client.jobs.list(status=args.status)]
    if args.json:
        _print_json(items)
        return 0
    for item in items:
        item["stage"] = (item.get("progress") or {}).get("stage")
        item["epoch"] = (item.get("progress") or {}).get("epoch")
    _table(items, ["id", "status", "stage", "epoch", "dataset_id", "created_at"])
    return 0


def jobs_watch(client: Client, args: argparse.Namespace) -> int:
    return watch_job(client.jobs.get(args.job))


def jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.get(args.job).cancel()
    print(f"job {job.id}: {job.status}")
    return 0


def models_list(client: Client, args: argparse.Namespace) -> int:
    items = [m.raw for m in client.models.list()]
    if args.json:
        _print_json(items)
        return 0
    for item in items:
        item["aliases"] = ",".join(item.get("aliases") or [])
    _table(items, ["id", "name", "version", "aliases", "backbone", "created_at"])
    return 0


def models_download(client: Client, args: argparse.Namespace) -> int:
    path = client.models.get(args.model).download(args.path, format=args.format)
    print(f"saved {path} ({path.stat().st_size} bytes)")
    return 0


def models_predict(client: Client, args: argparse.Namespace) -> int:
    if args.explain:
        return _explain(client, args)
    predictions = client.models.get(args.model).predict([Path(p) for p in args.images],
                                                        top_k=args.top_k)
    if args.json:
        _print_json(predictions)
        return 0
    for image, top in zip(args.images, predictions, strict=True):
        if isinstance(top, dict):  # a multi-label model: its labels, then the scores
            scores = ", ".join(f"{p['label']} {p['score']:.3f}" for p in top["scores"])
            print(f"{image}: [{', '.join(top['labels'])}] {scores}")
        else:
            print(f"{image}: " + ", ".join(f"{p['label']} {p['score']:.3f}" for p in top))
    return 0


def _explain(client: Client, args: argparse.Namespace) -> int:
    """Each image's overlay saved as OUT/<image name>.explain.png; the top class printed."""
    out = Path(args.explain)
    out.mkdir(parents=True, exist_ok=True)
    explained = client.models.get(args.model).explain([Path(p) for p in args.images])
    for image, why in zip(args.images, explained, strict=True):
        target = out / f"{Path(image).stem}.explain.png"
        target.write_bytes(why["overlay_png"])
        if not args.json:
            print(f"{image}: {why['label']} -> {target}")
    if args.json:
        _print_json([{k: v for k, v in why.items() if k != "overlay_png"}
                     for why in explained])
    return 0


def models_alias(client: Client, args: argparse.Namespace) -> int:
    model = client.models.get(args.model).set_alias(args.alias)
    print(f"{model.name}:{args.alias} -> {model.id}")
    return 0


def login(args: argparse.Namespace) -> int:
    url = args.url or input("API address (e.g. http://127.0.0.1:8000): ").strip()
    key = args.key or getpass.getpass("API key: ").strip()
    with Client(url, key) as client:
        next(iter(client.datasets.list(limit=1)), None)  # the key works, or ApiError says why
    print(f"logged in to {url}; saved in {save_login(url, key)} (readable only by you)")
    return 0


def _add(sub: argparse._SubParsersAction, name: str, handler: Handler, help_: str,
         *args: tuple[str, dict]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=plain(help_))
    for flag, options in args:
        parser.add_argument(flag, **options)
    parser.set_defaults(handler=handler)
    return parser


def plain(text: str) -> str:
    """Help text without the docstrings' reStructuredText quotes (``x``): a terminal shows
    them literally."""
    return text.replace("``", "")


def build_parser(prog: str = "ftune remote") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=plain(__doc__.split("\n\n")[0]))
    parser.add_argument("--url", help="API address (default: FTUNE_URL, else the login file)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    groups = parser.add_subparsers(dest="group", required=True)
    log_in = groups.add_parser("login", help="save the API address and key for later commands")
    log_in.add_argument("--url", default=argparse.SUPPRESS, help="API address")
    log_in.add_argument("--key", help="API key (default: asked for, not echoed)")
    log_in.set_defaults(login=True)

    datasets = groups.add_parser("datasets", help="upload, list and check datasets")
    sub = datasets.add_subparsers(dest="command", required=True)
    _add(sub, "upload", datasets_upload, "upload an archive or a folder (zipped as it goes)",
         ("path", {}), ("--name", {}), ("--no-dedupe", {"action": "store_true"}),
         ("--kind", {"choices": ["labeled", "unlabeled"], "default": "labeled",
                     "help": "unlabeled: images without labels, in any folders"}))
    _add(sub, "list", datasets_list, "your datasets")
    _add(sub, "report", datasets_report, "a dataset's lint report", ("dataset", {}))

    jobs = groups.add_parser("jobs", help="submit, follow and cancel fine-tuning jobs")
    sub = jobs.add_subparsers(dest="command", required=True)
    _add(sub, "submit", jobs_submit, "submit a job (every spec field is auto unless set)",
         ("dataset", {}), ("--spec", {"help": "JSON, or @file.json"}),
         ("--set", {"action": "append", "metavar": "PATH=VALUE",
                    "help": "a spec field, e.g. --set preset=fast --set optimizer.lr=0.001"}),
         ("--priority", {"type": int, "default": 5}),
         ("--unlabeled-dataset", {"metavar": "ID", "help": "a dataset uploaded with --kind "
                                  "unlabeled, for the spec's pretrain and pseudo_labels"}),
         ("--watch", {"action": "store_true", "help": "follow it until it ends"}))
    _add(sub, "list", jobs_list, "your jobs", ("--status", {}))
    _add(sub, "watch", jobs_watch, "follow a job live; exit 0 when it succeeds", ("job", {}))
    _add(sub, "cancel", jobs_cancel, "cancel a queued or running job", ("job", {}))

    models = groups.add_parser("models", help="list, download and query tuned models")
    sub = models.add_subparsers(dest="command", required=True)
    _add(sub, "list", models_list, "your models")
    _add(sub, "download", models_download,
         "save a model (safetensors, onnx, torchscript, triton, onnx-int8)",
         ("model", {"help": "id, name (its latest version), name:version or name:alias"}),
         ("path", {}),
         ("--format", {"default": DOWNLOAD_FORMATS[0], "choices": DOWNLOAD_FORMATS}))
    _add(sub, "predict", models_predict, "classify images", ("model", {}),
         ("images", {"nargs": "+"}), ("--top-k", {"type": int}),
         ("--explain", {"metavar": "DIR", "help": "also explain each image's top class: "
                        "save its heat map overlay in DIR"}))
    _add(sub, "alias", models_alias, "point name:ALIAS at a model", ("model", {}),
         ("alias", {}))
    sweep_commands.add_commands(groups, _add)
    return parser


def main(argv: list[str] | None = None, prog: str = "ftune remote") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if getattr(args, "login", False):
            return login(args)
        with Client(args.url) as client:
            return args.handler(client, args)
    except ApiError as exc:
        print(f"error: {exc.detail} (HTTP {exc.status})", file=sys.stderr)
        for item in exc.errors:  # 422: each bad field's path and what is wrong with it
            where = ".".join(str(part) for part in item.get("loc", [])) or "request"
            print(f"  {where}: {item.get('msg', item)}", file=sys.stderr)
        return 1
    except (FtuneError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
