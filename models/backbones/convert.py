"""Convert third-party state dicts onto timm architectures.

A conversion is proved only by comparing outputs (see tests/models/test_backbones.py);
matching key names alone is not enough, e.g. timm's plain ``efficientnet_lite0`` accepts the
lite keys with strict loading but computes different logits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]

_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
_LITE_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1",
                             "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                           "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def detect_format(state_dict: StateDict) -> str:
    if "_conv_stem.weight" in state_dict:
        return "efficientnet_lite"
    if "features.0.0.weight" in state_dict and "classifier.1.weight" in state_dict:
        return "torchvision_mobilenet_v2"
    return "timm"


def to_timm(state_dict: StateDict, model: nn.Module, source_format: str | None = None) -> StateDict:
    """Return ``state_dict`` renamed onto ``model``'s (timm) keys."""
    source_format = source_format or detect_format(state_dict)
    if source_format == "efficientnet_lite":
        return _from_efficientnet_lite(state_dict, model)
    if source_format == "torchvision_mobilenet_v2":
        return _by_position(state_dict, model)
    return state_dict


def _from_efficientnet_lite(state_dict: StateDict, model: nn.Module) -> StateDict:
    # lukemelas numbers blocks 0..N-1; timm nests them as blocks.<stage>.<index>.
    # The format is only detected for timm's EfficientNet-Lite models: blocks is a sequence
    # of stages, each a sequence of blocks.
    blocks = cast(Iterable[nn.Sequential], model.blocks)
    flat_blocks = [(s, i, block) for s, stage in enumerate(blocks)
                   for i, block in enumerate(stage)]
    out: StateDict = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is None:
            module, _, rest = key.partition(".")
            out[f"{_LITE_TOP[module]}.{rest}"] = value
            continue
        index, module, rest = int(match[1]), match[2], match[3]
        stage, inner, block = flat_blocks[index]
        table = (_LITE_DEPTHWISE_SEPARABLE if type(block).__name__ == "DepthwiseSeparableConv"
                 else _LITE_INVERTED_RESIDUAL)
        out[f"blocks.{stage}.{inner}.{table[module]}.{rest}"] = value
    return out


def _by_position(state_dict: StateDict, model: nn.Module) -> StateDict:
    # torchvision's MobileNetV2 registers its tensors in exactly the order of timm's
    # mobilenetv2_100 (stem, blocks, head conv, classifier); map them by position and
    # insist every shape agrees.
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise ValueError(f"expected {len(target)} tensors, file has {len(state_dict)}")
    out: StateDict = {}
    for (dst, ref), (src, value) in zip(target.items(), state_dict.items(), strict=True):
        if ref.shape != value.shape:
            raise ValueError(f"shape mismatch mapping {src} {tuple(value.shape)} onto "
                             f"{dst} {tuple(ref.shape)}")
        out[dst] = value
    return out
