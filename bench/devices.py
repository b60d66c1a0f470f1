"""Data-parallel training (``fit_on_devices``) against one process on the same job.

Usage: ``.venv/bin/python bench/devices.py [--blocks 2] [--epochs 4] [--skip-cpu] ...``

* CPU (always): 2 gloo ranks of 1 thread each (``fit_on_devices(Devices(2, "cpu"))`` from
  this process with ``--threads`` 2: each rank gets half) against 1 process of 2 threads, a
  full fine-tune on real animal-mnist images with image batches (every step is sharded, its
  gradients all-reduced; BatchNorm as ``sync_batchnorm`` auto does on CPU ranks: each rank's
  statistics, running ones averaged every epoch; ``--sync-batchnorm true`` measures the exact
  mode, whose two gloo all-reduces per layer and step halved the ranks' speed here). On 2
  cores the ranks cannot gain, so this measures what the distributed path costs: ``ratio`` =
  two_ranks / one_process training images/s, target >= 0.9.
* GPU (with 2 or more CUDA devices, else printed as skipped): a full fine-tune at 224 px of the
  default backbone with the precision auto picks (bf16), on 1 GPU, 2 and all of them;
  ``efficiency_k`` = images/s on k / (k x images/s on 1), target >= 0.85 on 2. The images are
  the animal-mnist silhouettes (800 a class: 8000, none repeated), upsampled to 224 px by the
  input pipeline; the global batch (``--gpu-batch-size`` 256) is the same at every count.

The one-device baseline runs ``fit`` in a fresh process, not in this one: the ranks are fresh
processes at every launch, so a baseline in this long-lived process would gain warm oneDNN /
cuDNN caches and imports from the earlier blocks, and a fresh process's wall time is the
like-for-like start-up to subtract from a launch's. The paths alternate in blocks (A B A B),
as the machine is shared and noisy: the ratios are the result, not the absolute times.

Other processes matter more here than elsewhere: while one takes a core, a process of 2
threads on 2 cores trains 2-20x slower (its threads wait for each other at every op) and
1-thread ranks barely slow down, so the ratio would measure the neighbours. Each epoch's
``others_cores`` (CPU time of every process not this bench's, from /proc/stat, per second) is
printed; the medians are over the epochs where it stayed under 0.2 (``quiet_epochs``), over all
when none did (``trustworthy=False``: rerun on a quiet machine). Each run waits up to
``--quiet-wait-s`` for a quiet second first.

Images/s are the median over the training epochs after the first (which decodes the images) of
training images / the epoch row's ``seconds`` (its validation pass included, sharded on the
ranks too). ``other_s`` is a run's wall time less its epochs' seconds: start-up (interpreter,
imports, rendezvous), model building, checkpoints and the final evaluation; neighbours only add
to it, so the summary takes each path's smallest, and ``launch_overhead_s`` is the ranks' minus
the one process's, what a launch adds. The final val accuracies of both paths are printed and
compared: ranks compute what one process computes, but a full fine-tune's float32 gradients are
ill-conditioned (each path's are ~1% off a float64 reference, in different directions), so the
two runs drift apart over the epochs like reruns with another seed; ``--cpu-tolerance``
(``--gpu-tolerance`` with bf16) bounds the final gap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ftune.models.parallel.launch import Devices, fit_on_devices
from ftune.models.spec import parse_spec
from ftune.models.training.fit import Callbacks, FitResult, fit
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

CPU_TARGET = 0.9  # two ranks / one process on 2 cores: the distributed path costs little
GPU_TARGET = 0.85  # scaling efficiency on 2 GPUs
# Largest final val accuracy gap of k GPUs to 1: bf16, cuDNN's kernel choices and sums in
# another order make two runs drift apart like reruns with another seed (CPU: --cpu-tolerance).
GPU_TOLERANCE = 0.03
# Cores other processes may use during an epoch before it is left out: on 2 cores a process of
# 2 threads then runs 2-20x slower (its threads wait for each other at every op), 1-thread ranks
# barely notice, and the ratio says more about the neighbours than about the code.
CONTENDED_CORES = 0.2


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (Linux's /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    """CPU seconds of this process and its descendants: those still running (torchrun and
    its ranks, a child fit) and those their parents reaped (a rank that ended before torchrun
    counts in torchrun's children's times, torchrun in ours)."""
    times = os.times()
    live = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            cpu = process.cpu_times()
            live += cpu.user + cpu.system + cpu.children_user + cpu.children_system
        except psutil.Error:  # it ended meanwhile: reaped, so its parent counts it next time
            pass
    return times.user + times.system + times.children_user + times.children_system + live


class Neighbours:
    """Cores other processes used since the last ``lap`` (None off Linux)."""

    def __init__(self) -> None:
        self.mark = self._now()

    @staticmethod
    def _now() -> tuple[float | None, float, float]:
        return _machine_busy_s(), _own_s(), time.perf_counter()

    def lap(self) -> float | None:
        (busy0, own0, t0), now = self.mark, self._now()
        self.mark = now
        busy1, own1, t1 = now
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


def wait_for_quiet(limit_s: float) -> tuple[float, float | None]:
    """Wait (up to ``limit_s``) until other processes use under ``CONTENDED_CORES`` for a
    second; returns the seconds waited and their last use."""
    started = time.perf_counter()
    neighbours = Neighbours()
    others = None
    while time.perf_counter() - started < limit_s:
        time.sleep(1.0)
        others = neighbours.lap()
        if others is None or others < CONTENDED_CORES:
            break
    return time.perf_counter() - started, others


@dataclass(frozen=True)
class Run:
    """What the bench keeps of one training run."""

    label: str
    epoch_s: list[float]
    train_loss: list[float]
    val_accuracy: float | None  # the final evaluation's
    num_train: int
    precision: str
    others: list[float | None]  # cores other processes used during each epoch
    wall_s: float  # measured here, around the whole run (process start-up included)

    @property
    def other_s(self) -> float:
        return self.wall_s - sum(self.epoch_s)

    def rates(self, batch_size: int, *, quiet_only: bool = False) -> list[float]:
        """Training images/s of each epoch after the first (which decodes the images), only
        those other processes left alone with ``quiet_only``."""
        per_epoch = per_epoch_samples(self.num_train, batch_size)
        return [per_epoch / s for s, others in zip(self.epoch_s[1:], self.others[1:],
                                                    strict=True)
                if not quiet_only or others is None or others < CONTENDED_CORES]


def per_epoch_samples(n: int, batch_size: int) -> int:
    """Samples fit trains on per epoch: it drops a final batch of one (BatchNorm)."""
    return n - 1 if n % batch_size == 1 and n > 1 else n


def image_folder(root: Path, per_class: int) -> Path:
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, per_class)
    return write_image_folder(root, images[idx], labels[idx])


def job_spec(*, image_size: int, batch_size: int, epochs: int, mixed_precision: str,
             sync_batchnorm: str = "auto") -> dict:
    """A full fine-tune on images, so every step is sharded; a fixed epoch count."""
    return {
        "sync_batchnorm": {"auto": "auto", "true": True, "false": False}[sync_batchnorm],
        "freeze": {"strategy": "none"}, "image_size": image_size, "batch_size": batch_size,
        "epochs": epochs, "augment": "none", "mixed_precision": mixed_precision,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "early_stopping": {"patience": epochs},  # never stop inside the timed epochs
    }


def _summary(result: FitResult, others: list[float | None]) -> dict:
    assert len(others) == len(result.history), (len(others), len(result.history))
    return {"epoch_s": [row["seconds"] for row in result.history],
            "train_loss": [row["train_loss"] for row in result.history],
            "val_accuracy": ((result.evaluation or {}).get("val") or {}).get("accuracy"),
            "num_train": result.num_train, "precision": str(result.precision),
            "others": others}


def _watching() -> tuple[Callbacks, list[float | None]]:
    """Callbacks that note other processes' CPU use over each epoch (from the previous
    epoch's end: checkpoint writing included, which is brief)."""
    neighbours, others = Neighbours(), []
    return Callbacks(on_epoch_end=lambda _row: others.append(neighbours.lap())), others


def one_device(data: Path, spec: dict, device: str, threads: int | None, work: Path,
               label: str) -> Run:
    """``fit`` on one device in a fresh process (this script with ``--child``)."""
    job = work / "child.json"
    job.write_text(json.dumps({"data": str(data), "spec": spec, "device": device,
                               "threads": threads, "checkpoint_dir": str(work / "ckpt")}))
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", str(job)], check=True)
    wall = time.perf_counter() - started
    return Run(label=label, wall_s=wall, **json.loads(job.read_text())["result"])


def child(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    callbacks, others = _watching()
    # A checkpoint as the ranks write one, so the runs' other_s compare like for like.
    result = fit(job["data"], job["spec"], device=job["device"], callbacks=callbacks,
                 checkpoint_dir=job["checkpoint_dir"])
    Path(job_file).write_text(json.dumps(job | {"result": _summary(result, others)}))
    return 0


def on_devices(data: Path, spec: dict, devices: Devices, work: Path, label: str) -> Run:
    """``fit_on_devices``: torchrun and its ranks start fresh at every launch."""
    callbacks, others = _watching()
    started = time.perf_counter()
    result = fit_on_devices(devices, data, parse_spec(spec), folder=work / "ranks",
                            checkpoint_dir=work / "ckpt", callbacks=callbacks)
    wall = time.perf_counter() - started
    return Run(label=label, wall_s=wall, **_summary(result, others))


def fresh(work: Path, name: str) -> Path:
    folder = work / name
    folder.mkdir(parents=True)
    return folder


def fmt(values: list[float], digits: int = 3) -> str:
    return ",".join(f"{v:.{digits}f}" for v in values)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


@dataclass(frozen=True)
class Rate:
    """Median training images/s over the runs' timed epochs that other processes left alone
    (over all of them when none was: ``quiet`` false)."""

    img_s: float
    quiet_epochs: int  # timed epochs other processes left alone
    timed: int  # epochs after the first, in all

    @property
    def quiet(self) -> bool:
        return self.quiet_epochs > 0

    @classmethod
    def of(cls, runs: list[Run], batch_size: int) -> Rate:
        every = [r for run in runs for r in run.rates(batch_size)]
        calm = [r for run in runs for r in run.rates(batch_size, quiet_only=True)]
        return cls(statistics.median(calm or every), len(calm), len(every))

    @property
    def epochs(self) -> str:
        return f"{self.quiet_epochs}/{self.timed}"


def accuracy_gap(a: Run, b: Run) -> float:
    if a.val_accuracy is None or b.val_accuracy is None:
        return float("nan")
    return abs(a.val_accuracy - b.val_accuracy)


def print_run(section: str, block: int, run: Run, batch_size: int, waited: str,
              extra: str = "") -> None:
    others = ",".join("?" if o is None else f"{o:.2f}" for o in run.others)
    print(f"{section}_run block={block} path={run.label} {extra}"
          f"epoch_s={fmt(run.epoch_s)} img_s={fmt(run.rates(batch_size), 1)} "
          f"others_cores={others} train_loss={fmt(run.train_loss, 4)} "
          f"val_accuracy={run.val_accuracy} precision={run.precision} "
          f"wall_s={run.wall_s:.1f} other_s={run.other_s:.1f} {waited} load1={load()}",
          flush=True)


def settle(limit_s: float) -> str:
    """Wait for other processes to quieten (see ``wait_for_quiet``); what to print of it."""
    waited, others = wait_for_quiet(limit_s)
    return f"waited_s={waited:.0f} others_before={'?' if others is None else f'{others:.2f}'}"


def cpu_section(args: argparse.Namespace, work: Path) -> None:
    # What fit_on_devices splits among CPU ranks; the GPU section keeps torch's default.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        cpu_blocks(args, work)
    finally:
        torch.set_num_threads(threads)


def cpu_blocks(args: argparse.Namespace, work: Path) -> None:
    data = image_folder(work / "cpu-data", args.per_class)
    spec = job_spec(image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                    mixed_precision="off", sync_batchnorm=args.sync_batchnorm)
    two = Devices(2, "cpu")
    one_runs: list[Run] = []
    two_runs: list[Run] = []
    load_before = load()
    for block in range(1, args.blocks + 1):
        waited = settle(args.quiet_wait_s)
        one = one_device(data, spec, "cpu", args.threads, fresh(work, f"cpu-one-{block}"),
                         "one_process")
        print_run("devices_cpu", block, one, args.batch_size, waited, f"threads={args.threads} ")
        waited = settle(args.quiet_wait_s)
        ranks = on_devices(data, spec, two, fresh(work, f"cpu-two-{block}"), "two_ranks")
        print_run("devices_cpu", block, ranks, args.batch_size, waited,
                  f"threads_per_rank={max(1, args.threads // two.count)} ")
        one_runs.append(one)
        two_runs.append(ranks)
    one_img_s = Rate.of(one_runs, args.batch_size)
    two_img_s = Rate.of(two_runs, args.batch_size)
    ratio = two_img_s.img_s / one_img_s.img_s
    # Fixed costs: other processes only ever add to them, so the least disturbed run's.
    one_other = min(r.other_s for r in one_runs)
    two_other = min(r.other_s for r in two_runs)
    gap = max(accuracy_gap(a, b) for a, b in zip(one_runs, two_runs, strict=True))
    print(f"devices_cpu one_process_img_s={one_img_s.img_s:.2f} "
          f"two_ranks_img_s={two_img_s.img_s:.2f} "
          f"ratio={ratio:.3f} target={CPU_TARGET} met={ratio >= CPU_TARGET} "
          f"quiet_epochs_one={one_img_s.epochs} quiet_epochs_two={two_img_s.epochs} "
          f"trustworthy={one_img_s.quiet and two_img_s.quiet} "
          f"one_process_other_s_min={one_other:.1f} two_ranks_other_s_min={two_other:.1f} "
          f"launch_overhead_s={two_other - one_other:.1f} "
          f"val_accuracy_one={fmt([r.val_accuracy or 0.0 for r in one_runs], 4)} "
          f"val_accuracy_two={fmt([r.val_accuracy or 0.0 for r in two_runs], 4)} "
          f"val_gap={gap:.4f} tolerance={args.cpu_tolerance} "
          f"agree={gap <= args.cpu_tolerance} sync_batchnorm={args.sync_batchnorm} "
          f"train_images={one_runs[0].num_train} "
          f"image_size={args.image_size} batch_size={args.batch_size} epochs={args.epochs} "
          f"blocks={args.blocks} threads={args.threads} load1_before={load_before} "
          f"load1_after={load()}", flush=True)


@dataclass(frozen=True)
class Scaling:
    """Images/s on 1 GPU and on each larger count; the runs, for their accuracies."""

    img_s: dict[int, Rate]
    runs: dict[int, list[Run]]

    def efficiency(self, count: int) -> float:
        return self.img_s[count].img_s / (count * self.img_s[1].img_s)

    @property
    def trustworthy(self) -> bool:
        return all(rate.quiet for rate in self.img_s.values())

    def accuracy_gap(self, count: int) -> float:
        """The largest val accuracy gap of ``count`` GPUs to 1, block by block."""
        return max(accuracy_gap(a, b)
                   for a, b in zip(self.runs[1], self.runs[count], strict=True))


def gpu_counts() -> list[int]:
    """1, 2 and all visible GPUs (fewer with fewer)."""
    return sorted({1, 2, torch.cuda.device_count()})


def gpu_scaling(work: Path, *, per_class: int, image_size: int, batch_size: int, epochs: int,
                blocks: int, section: str, quiet_wait_s: float = 0.0, kind: str = "cuda",
                counts: list[int] | None = None) -> Scaling:
    """Alternating blocks of 1 GPU (``fit`` in a fresh process), 2 and all (``fit_on_devices``),
    the same job in each; prints a line per run. ``kind`` and ``counts``: to try the code
    on CPU ranks."""
    data = image_folder(work / f"{section}-data", per_class)
    spec = job_spec(image_size=image_size, batch_size=batch_size, epochs=epochs,
                    mixed_precision="auto")
    runs: dict[int, list[Run]] = {count: [] for count in counts or gpu_counts()}
    for block in range(1, blocks + 1):
        for count in runs:
            folder = fresh(work, f"{section}-{count}-{block}")
            waited = settle(quiet_wait_s)
            run = (one_device(data, spec, kind, None, folder, "gpus_1") if count == 1
                   else on_devices(data, spec, Devices(count, kind), folder, f"gpus_{count}"))
            print_run(section, block, run, batch_size, waited, f"gpus={count} ")
            runs[count].append(run)
    return Scaling({count: Rate.of(r, batch_size) for count, r in runs.items()}, runs)


def gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.device_count() < 2:
        return f"{torch.cuda.device_count()} CUDA device, data parallelism needs 2 or more"
    return None


def gpu_section(args: argparse.Namespace, work: Path) -> None:
    reason = gpu_skip_reason()
    if reason is not None:
        print(f"devices_gpu skipped=true reason={reason!r}", flush=True)
        return
    scaling = gpu_scaling(work, per_class=args.gpu_per_class, image_size=args.gpu_image_size,
                          batch_size=args.gpu_batch_size, epochs=args.epochs,
                          blocks=args.blocks, section="devices_gpu",
                          quiet_wait_s=args.quiet_wait_s)
    parts = [f"img_s_{count}={rate.img_s:.1f}" for count, rate in scaling.img_s.items()]
    for count in scaling.img_s:
        if count > 1:
            parts.append(f"efficiency_{count}={scaling.efficiency(count):.3f} "
                         f"val_gap_{count}={scaling.accuracy_gap(count):.4f}")
    runs = scaling.runs
    other = {count: min(r.other_s for r in rs) for count, rs in runs.items()}
    efficiency = scaling.efficiency(2)
    print(f"devices_gpu {' '.join(parts)} target={GPU_TARGET} met={efficiency >= GPU_TARGET} "
          f"trustworthy={scaling.trustworthy} "
          f"tolerance={args.gpu_tolerance} "
          f"agree={all(scaling.accuracy_gap(c) <= args.gpu_tolerance for c in runs if c > 1)} "
          + " ".join(f"other_s_min_{count}={s:.1f}" for count, s in other.items())
          + f" precision={runs[1][0].precision} name={torch.cuda.get_device_name(0)!r} "
          f"train_images={runs[1][0].num_train} image_size={args.gpu_image_size} "
          f"batch_size={args.gpu_batch_size} epochs={args.epochs} blocks={args.blocks}",
          flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2,
                        help="alternating rounds of each path (at least 2 for a median)")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per run; epochs 2..E are timed")
    parser.add_argument("--per-class", type=int, default=60,
                        help="CPU: images a class (20%% of them held out for val)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU: the one process's threads, split among the ranks")
    parser.add_argument("--cpu-tolerance", type=float, default=0.05,
                        help="CPU: largest final val accuracy gap (6 of 120 images)")
    parser.add_argument("--gpu-per-class", type=int, default=800)
    parser.add_argument("--gpu-image-size", type=int, default=224)
    parser.add_argument("--gpu-batch-size", type=int, default=256)
    parser.add_argument("--gpu-tolerance", type=float, default=GPU_TOLERANCE,
                        help="GPU: largest final val accuracy gap (bf16, cuDNN's choices)")
    parser.add_argument("--quiet-wait-s", type=float, default=10.0,
                        help="before each run, wait up to this long for other processes to "
                        f"use under {CONTENDED_CORES} cores")
    parser.add_argument("--sync-batchnorm", choices=("auto", "true", "false"), default="auto",
                        help="the CPU job's sync_batchnorm (auto: false on CPU ranks)")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one_device's fresh process
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not timed)")
    if args.blocks < 1:
        parser.error("--blocks must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    if args.child:
        return child(args.child)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_devices_") as tmp:
        if not args.skip_cpu:
            cpu_section(args, Path(tmp))
        if not args.skip_gpu:
            gpu_section(args, Path(tmp))
    print(f"devices total_s={time.perf_counter() - started:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
