"""ftune: fine-tune image classifiers; train, predict and list backbones need no server."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ftune.models.errors import FineTuneError
from ftune.models.export_formats import TRACED_FORMATS
from ftune.models.settings import configure, engine_settings
from ftune.models.spec import FineTuneSpec, SpecError, parse_spec

if TYPE_CHECKING:  # imported where used: `ftune --help` must not load torch or tqdm
    from tqdm import tqdm

    from ftune.models.derived.store import DerivedStore
    from ftune.models.training.fit import FitResult
    from ftune.models.training.run_setup import Callbacks

log = logging.getLogger("ftune")


HANDLED_ERRORS: tuple[type[BaseException], ...] = (FineTuneError, SpecError, FileNotFoundError,
                                                   ValueError)

CommandAdder = Callable[["argparse._SubParsersAction"], None]


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None,
        handled: tuple[type[BaseException], ...] = HANDLED_ERRORS) -> int:
    """Parse, set up logging, run the command; a user's mistake exits 2 with one clear line."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        configure(engine_settings())  # a bad FTUNE_* value fails here, naming the variable
        return int(args.run(args) or 0)
    except handled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser(*extra_commands: CommandAdder) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    add_engine_commands(sub)
    for add in extra_commands:
        add(sub)
    return parser


def add_engine_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="fine-tune a backbone on an image folder or archive")
    train.add_argument("data", help="folder or zip/tar/tar.gz: DATA/<class>/<images>, "
                       "DATA/train|val|test/<class>/..., or labels.csv with the images")
    train.add_argument("--spec", help="fine-tuning spec (JSON file); defaults for missing fields")
    train.add_argument("--out", required=True, help="folder for the tuned model (must not exist)")
    train.add_argument("--checkpoint-dir", help="per-epoch checkpoints (default: OUT.partial)")
    train.add_argument("--resume", help="checkpoint file or folder to continue from")
    train.add_argument("--device", help="cpu, cuda, cuda:1 (default: automatic)")
    train.add_argument("--unlabeled", metavar="FOLDER", help="unlabelled images (any folders) "
                       "for the spec's pretrain and pseudo_labels, besides DATA's unlabeled/")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    predict = sub.add_parser("predict", help="classify images with a tuned model")
    predict.add_argument("model", help="folder written by `ftune train`")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--top-k", type=int, default=None,
                         help="scores shown per image (default 5; multi-label: every class)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(run=_predict)

    lint = sub.add_parser("lint", help="check a dataset folder or archive; exit 2 on errors")
    lint.add_argument("data")
    lint.add_argument("--min-per-class", type=int, default=2,
                      help="fewest training images a class may have (default 2)")
    lint.add_argument("--json", action="store_true", help="print the whole report as JSON")
    lint.set_defaults(run=_lint)

    export = sub.add_parser("export", help="export a tuned model as ONNX, TorchScript or a "
                            "Triton model repository")
    export.add_argument("model", help="folder written by `ftune train`")
    export.add_argument("--format", required=True, choices=TRACED_FORMATS)
    export.add_argument("--out", required=True, help="file to write")
    export.add_argument("--name", default="model", help="the model's name in a Triton "
                        "repository (default: model)")
    export.set_defaults(run=_export)

    serving = sub.add_parser("serving-check", help="export a tuned model to ONNX, check it "
                             "against the torch model and make its int8 model where the "
                             "guard passes (what the API's FTUNE_SERVE_ENGINE=auto runs)")
    serving.add_argument("model", help="folder written by `ftune train`")
    serving.add_argument("--data", help="the model's dataset folder (its images are "
                         "checked); without it nothing is offered")
    serving.add_argument("--out", required=True, help="folder for model.onnx, "
                         "model.int8.onnx and serving.json")
    serving.add_argument("--lanes", type=int, default=0, help="forwards the server runs at "
                         "once, which the batch size is measured with (default: one per "
                         "core, at most 4)")
    serving.set_defaults(run=_serving_check)

    backbones = sub.add_parser("backbones", help="list backbones with offline pretrained weights")
    backbones.add_argument("--json", action="store_true", help="print JSON")
    backbones.set_defaults(run=_backbones)


def _load_spec(path: str | None) -> FineTuneSpec:
    if path is None:
        return parse_spec({})
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read spec {path}: {exc.strerror}") from exc
    return parse_spec(text)


class _TrainingOutput:
    """A progress bar per epoch on stderr and one line per finished epoch on stdout."""

    def __init__(self, epochs: int | str, *, progress: bool) -> None:
        self.epochs, self.progress = epochs, progress
        self.bar: tqdm | None = None
        self.shown: dict = {}  # auto choices already printed

    def on_stage(self, stage: str, epochs: int, stage_epochs: int) -> None:
        self.close()
        if epochs:
            self.epochs = epochs
        own = f"{stage_epochs} epoch(s) at most, " if stage_epochs else ""
        print(f"stage {stage}" + (f" ({own}up to epoch {epochs} in all)" if epochs else ""),
              flush=True)

    def on_resolved(self, resolved: dict) -> None:
        for field, choice in resolved.items():
            if self.shown.get(field) != choice:
                self.close()
                print(f"auto {field} = {choice['value']}: {choice['why']}", flush=True)
        self.shown = dict(resolved)

    def on_batch(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if not self.progress:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                            file=sys.stderr)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def on_epoch(self, row: dict) -> None:
        self.close()
        print(_format_row(row, self.epochs), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_pretrain_epoch(row: dict) -> None:
    print(f"pretrain epoch {row['epoch']} ({row['method']}): loss {row['pretrain_loss']:.4f} "
          f"in {row['seconds']:.1f} s", flush=True)


def _fit_on_devices(spec: FineTuneSpec, data: Path, ckpt_dir: Path,
                    args: argparse.Namespace, callbacks: Callbacks) -> FitResult:
    """``devices: N``: N ranks here, on the first N GPUs (or N CPU ranks with --device cpu)."""
    from ftune.models.parallel.launch import Devices, fit_on_devices
    from ftune.models.training.runtime import resolve_device

    if args.unlabeled:
        raise ValueError("--unlabeled: pretraining and pseudo-labels run on one device")
    kind = "cuda" if resolve_device(args.device).type == "cuda" else "cpu"
    folder = ckpt_dir.with_name(ckpt_dir.name + ".ranks")
    try:
        return fit_on_devices(Devices(int(spec.devices), kind), data, spec,
                              folder=folder, checkpoint_dir=ckpt_dir,
                              resume=Path(args.resume) if args.resume else None,
                              callbacks=callbacks, derived=_derived_store())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _train(args: argparse.Namespace) -> int:
    from ftune.models.bundle import ensure_output_free, save_bundle
    from ftune.models.training.fit import Callbacks, fit

    spec = _load_spec(args.spec)  # fail fast on bad input: before any output exists
    out = ensure_output_free(args.out)
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(
        out.name + ".partial")
    output = _TrainingOutput(spec.epochs, progress=not args.no_progress)
    with dataset_folder(args.data, near=out) as data:
        callbacks = Callbacks(on_epoch_end=output.on_epoch, on_batch_end=output.on_batch,
                              on_stage=output.on_stage, on_resolved=output.on_resolved,
                              on_pretrain_epoch=_print_pretrain_epoch)
        try:
            if isinstance(spec.devices, int) and spec.devices > 1:
                result = _fit_on_devices(spec, data, ckpt_dir, args, callbacks)
            else:
                result = fit(data, spec, checkpoint_dir=ckpt_dir, resume=args.resume,
                             derived=_derived_store(), callbacks=callbacks,
                             device=args.device, unlabeled=args.unlabeled)
        except BaseException:
            output.close()
            if ckpt_dir.exists():
                print(f"checkpoints kept in {ckpt_dir} (continue with --resume {ckpt_dir})",
                      file=sys.stderr)
            raise
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    save_bundle(result, out)
    if not args.checkpoint_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    best = result.best_metrics
    ranked = f"val_map={_fmt(best.get('val_map'))} " if "val_map" in best else ""
    print(f"best epoch {result.best_epoch}: {ranked}val_accuracy="
          f"{_fmt(best.get('val_accuracy'))} val_loss={_fmt(best.get('val_loss'))}"
          f"{' (stopped early)' if result.stopped_early else ''}; model written to {out}")
    for finding in result.diagnosis:
        print(f"diagnosis {finding['code']}: {finding['message']} {finding['evidence']}. "
              f"Try: {finding['action']}")
    return 0


def _derived_store() -> DerivedStore | None:
    """Decoded images are kept between runs only where FTUNE_CACHE_DIR says."""
    settings = engine_settings()
    if settings.cache_dir is None:
        return None
    from ftune.models.derived.store import DerivedStore

    return DerivedStore(settings.cache_dir, settings.cache_bytes)


@contextmanager
def dataset_folder(data: str, near: Path) -> Iterator[Path]:
    """DATA itself when it is a folder; an archive is unpacked (safely) next to ``near`` and
    removed afterwards."""
    path = Path(data)
    if path.is_dir() or not path.exists():
        yield path
        return
    from ftune.models.data.archives import ArchiveLimits, unpack

    settings = engine_settings()
    limits = ArchiveLimits(max_bytes=int(settings.max_extracted_mb * 2**20),
                           max_files=settings.max_archive_files)
    near.parent.mkdir(parents=True, exist_ok=True)
    folder = near.parent / f".{near.name}.data-{uuid.uuid4().hex[:8]}"
    try:
        unpack(path, folder, limits)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _export(args: argparse.Namespace) -> int:
    from ftune.models.export import export_model

    path = export_model(args.model, args.out, args.format, name=args.name)
    print(f"{args.format} model written to {path} (input: uint8 [N, 3, S, S] RGB; output: "
          "class probabilities; see models/export.py and, for Triton, models/triton.py)")
    return 0


def _serving_check(args: argparse.Namespace) -> int:
    from ftune.models.serving.prepare import prepare_serving

    report = prepare_serving(Path(args.model), Path(args.data) if args.data else None,
                             Path(args.out), max(0, args.lanes))
    print(json.dumps(report, indent=2))
    return 0


def _lint(args: argparse.Namespace) -> int:
    from ftune.models.data.discover import inspect_dataset

    with (tempfile.TemporaryDirectory(prefix="ftune-lint-") as scratch,
          dataset_folder(args.data, near=Path(scratch) / "data") as data):
        report = inspect_dataset(data, min_per_class=args.min_per_class).report
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 2
    print(f"{report.layout}: {len(report.classes)} classes, {report.num_images} images "
          f"({', '.join(f'{s} {sum(c.values())}' for s, c in report.splits.items())}); "
          + (f"; imbalance {report.imbalance_ratio:g}×" if report.imbalance_ratio else ""))
    for finding in report.findings:
        print(f"{finding.severity:7} {finding.code}: {finding.message}\n        → {finding.action}")
        for item in finding.items[:5]:
            print(f"          {item}")
        if finding.count > 5:
            print(f"          … {finding.count - 5} more (--json lists up to 20)")
    return 0 if report.ok else 2


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _format_row(row: dict, epochs: int | str) -> str:
    stage = f"[{row['stage']}] " if row.get("stage") else ""
    return (f"{stage}epoch {row['epoch']}/{epochs}  train_loss={_fmt(row['train_loss'])} "
            f"train_acc={_fmt(row['train_accuracy'])}  val_loss={_fmt(row['val_loss'])} "
            f"val_acc={_fmt(row['val_accuracy'])}  "
            f"{'val_map=' + _fmt(row['val_map']) + '  ' if 'val_map' in row else ''}"
            f"lr={row['lr']:.3g}  "
            f"grad_norm={_fmt(row['grad_norm'])}  {row['seconds']:.1f}s"
            f"{'  (cached features)' if row['feature_cache'] else ''}")


def _predict(args: argparse.Namespace) -> int:
    from ftune.models.predictor import Predictor

    predictor = Predictor.load(args.model)
    results = predictor.predict([Path(p) for p in args.images], top_k=args.top_k)
    if args.json:
        print(json.dumps(dict(zip(args.images, results, strict=True)), indent=2))
        return 0
    for image, preds in zip(args.images, results, strict=True):
        if isinstance(preds, dict):  # multi-label: the labels over their thresholds first
            print(f"{image}: {', '.join(preds['labels']) or '(no label)'}")
            preds = preds["scores"]
        else:
            print(image)
        for pred in preds:
            print(f"  {pred['score']:.4f}  {pred['label']}")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from ftune.models.backbones import list_backbones

    infos = list_backbones()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    print(f"{'name':24} {'offline':8} {'input':6} {'params':>9}  weights from")
    for i in infos:
        print(f"{i.name:24} {'yes' if i.pretrained_offline else 'no':8} {i.input_size:<6} "
              f"{i.num_params / 1e6:8.2f}M  {i.weights_source or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
