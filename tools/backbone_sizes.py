"""Write models/backbones/sizes.py: parameter counts, feature widths and activation sizes of
the backbones the service accepts, measured on torch's meta device (nothing is allocated or
downloaded). The API checks specs against this table without importing torch; a test checks
the table still matches timm. Run: .venv/bin/python tools/backbone_sizes.py"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ftune.models.backbones.catalog import PACKAGED_BACKBONES

OUT = Path(__file__).resolve().parents[1] / "models" / "backbones" / "sizes.py"
# Common, well-tested timm architectures a team may train from scratch (pretrained: false)
# or with its own weights on the workers.
ARCHITECTURES = sorted({entry.architecture for entry in PACKAGED_BACKBONES.values()} | {
    "resnet10t", "resnet14t", "resnet18", "resnet18d", "resnet26", "resnet34", "resnet34d",
    "resnet50", "resnet50d", "resnet101", "resnext50_32x4d", "wide_resnet50_2",
    "mobilenetv2_050", "mobilenetv2_100", "mobilenetv2_140", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "efficientnet_b3", "tf_efficientnet_lite3", "tf_efficientnet_lite4", "efficientnet_lite0",
    "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
    "regnetx_002", "regnety_002", "regnety_008", "regnety_016", "ghostnet_100",
    "mnasnet_100", "densenet121", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "levit_128s", "repvgg_a0",
    "mobilevit_xs", "efficientvit_b0", "fastvit_t8", "rexnet_100", "hrnet_w18_small",
})


def measure(architecture: str) -> tuple[int, int, int, int]:
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, num_classes=0).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        elements = largest = 0

        def count(_: nn.Module, __: object, output: object) -> None:
            nonlocal elements, largest
            if isinstance(output, torch.Tensor):
                elements += output.numel()
                largest = max(largest, output.numel())

        hooks = [m.register_forward_hook(count) for m in model.modules()
                 if not list(m.children())]
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() for p in model.parameters())
    # Activations grow with the pixel count: store them per 224×224 image.
    scale = (224 / size) ** 2
    return params, int(model.num_features), round(elements * scale), round(largest * scale)


def main() -> None:
    rows = [f'    "{name}": {measure(name)},' for name in ARCHITECTURES]
    OUT.write_text(
        '"""Sizes of the backbones the service accepts, measured by tools/backbone_sizes.py on\n'
        "torch's meta device. Torch-free on purpose: the API checks specs with it. Do not edit by\n"
        'hand; tests/models/test_backbone_sizes.py checks it against timm."""\n\n'
        "# architecture: (parameters without the classifier, feature width, activation elements\n"
        "# of one 224 x 224 image through the backbone: all of them (what training keeps for\n"
        "# the backward pass), and the largest single one (what inference holds at a time))\n"
        "BACKBONE_SIZES: dict[str, tuple[int, int, int, int]] = {\n" + "\n".join(rows) + "\n}\n")
    print(f"wrote {OUT} ({len(rows)} architectures)")


if __name__ == "__main__":
    main()
