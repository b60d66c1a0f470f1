"""Channels-last against the default (contiguous) memory layout, on this machine's device.

Usage: ``.venv/bin/python bench/layout.py [--image-size 96] [--batch-size 32] [--rounds 3]``

``fit`` stores the model's weights and every image batch channels last on every device
(``models/training/runtime.py``). This measures why, for each packaged backbone: the
seconds of one training step (forward, backward) with the top 2 stages training (the default
recipe's fine-tuning stage) and with every stage training (a full fine-tune), and of one
inference batch (features, evaluation, serving). The two layouts alternate, ``--rounds``
times; the fastest of each is kept. ``speedup`` is contiguous / channels-last seconds.
Random weights: the layout's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import time

import torch

from ftune.models.backbones import create_backbone
from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.network import FineTuneModel, build_head
from ftune.models.spec import HeadSpec
from ftune.models.training.runtime import resolve_device
from ftune.models.tuning.freezing import apply_freezing, set_train_mode

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def train_step(model: FineTuneModel, batch: torch.Tensor, labels: torch.Tensor) -> None:
    torch.nn.functional.cross_entropy(model(batch), labels).backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def inference_step(model: FineTuneModel, batch: torch.Tensor, _: torch.Tensor) -> None:
    model(batch)


def seconds(step, *args: object, repeats: int = 3) -> float:
    step(*args)  # warm-up: oneDNN picks its kernels on the first call
    started = time.perf_counter()
    for _ in range(repeats):
        step(*args)
    return (time.perf_counter() - started) / repeats


def measure(name: str, args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False, image_size=args.image_size)
    model = FineTuneModel(backbone.model, build_head(backbone.num_features, 10, HeadSpec()))
    model = model.to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for layout, memory_format in LAYOUTS.items():
            model = model.to(memory_format=memory_format)
            batch = images.contiguous(memory_format=memory_format)
            for what, trainable in (("top2", 2), ("all", len(backbone.stages))):
                apply_freezing(model, backbone.stages, trainable)
                set_train_mode(model, trainable, "frozen")
                taken = seconds(train_step, model, batch, labels)
                best[(layout, what)] = min(best.get((layout, what), taken), taken)
            model.eval()
            taken = seconds(inference_step, model, batch, labels)
            best[(layout, "inference")] = min(best.get((layout, "inference"), taken), taken)
    parts = []
    for what in ("top2", "all", "inference"):
        slow, fast = best[("contiguous", what)], best[("channels_last", what)]
        parts.append(f"{what}_contiguous_s={slow:.3f} {what}_channels_last_s={fast:.3f} "
                     f"{what}_speedup={slow / fast:.2f}")
    print(f"layout backbone={name} device={device.type} image_size={args.image_size} "
          f"batch={args.batch_size} " + " ".join(parts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=[*PACKAGED_BACKBONES, "resnet18"])
    args = parser.parse_args()
    device = resolve_device()
    for name in args.backbones:
        measure(name, args, device)


if __name__ == "__main__":
    main()
