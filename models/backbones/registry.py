"""One registry for backbones: list them, describe them, build them with pretrained weights."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, cast

import timm
import torch
from torch import nn

from ftune.models.backbones import weights as weights_mod
from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.backbones.convert import detect_format, to_timm
from ftune.models.errors import UnknownBackboneError, WeightsMismatchError, WeightsNotFoundError
from ftune.models.preprocessing import Preprocessing


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    architecture: str
    pretrained_offline: bool
    weights_source: str | None
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    num_params: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """A feature extractor: ``model(x)`` returns pooled features of width ``num_features``."""

    name: str
    architecture: str
    model: nn.Module
    num_features: int
    stages: list[list[str]]  # parameter names of each stage, from input to output
    preprocessing: Preprocessing
    weights_source: str | None  # where the pretrained weights came from; None if random init


def architecture_of(name: str) -> str:
    entry = PACKAGED_BACKBONES.get(name)
    if entry is not None:
        return entry.architecture
    if name in _timm_names():
        return name
    raise UnknownBackboneError(
        f"unknown backbone {name!r}. Backbones with offline pretrained weights: "
        f"{', '.join(sorted(PACKAGED_BACKBONES))}. Any timm architecture name also works "
        f"(with pretrained=false, or with weights_path / FTUNE_WEIGHTS_DIR)."
    )


@functools.cache
def _timm_names() -> frozenset[str]:
    return frozenset(timm.list_models())


def list_backbones() -> list[BackboneInfo]:
    """The backbones that work out of the box (weights shipped in installed packages)."""
    return [describe_backbone(name) for name in sorted(PACKAGED_BACKBONES)]


def describe_backbone(name: str) -> BackboneInfo:
    architecture = architecture_of(name)
    # Looked up each time: FTUNE_WEIGHTS_DIR or installed packages may change.
    found, _ = weights_mod.find_weights_file(name, architecture, None)
    model = _shape_only_model(architecture)
    prep = _preprocessing(name, model)
    return BackboneInfo(
        name=name,
        architecture=architecture,
        pretrained_offline=found is not None,
        weights_source=found.source if found else None,
        input_size=prep.input_size,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        crop_pct=prep.crop_pct,
        num_params=sum(p.numel() for p in model.parameters()),
    )


@functools.cache
def _shape_only_model(architecture: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: counting parameters allocates nothing
        return timm.create_model(architecture, pretrained=False, num_classes=0)


def create_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights_path: str | None = None,
    num_classes: int = 0,
    image_size: int | None = None,
) -> Backbone:
    """Build ``name`` with its pretrained weights (or random init when ``pretrained`` is false).

    ``num_classes=0`` removes the classifier (pooled features out); 1000 keeps the ImageNet
    head, which output checks use.
    """
    architecture = architecture_of(name)
    source: str | None = None
    if pretrained:
        model, source = _pretrained_model(name, architecture, weights_path)
    else:
        model = timm.create_model(architecture, pretrained=False)
    if num_classes != model.num_classes:
        # Every timm model has reset_classifier and num_features; nn.Module's types do not.
        model.reset_classifier(num_classes)  # type: ignore[operator]
    return Backbone(
        name=name,
        architecture=architecture,
        model=model,
        num_features=cast(int, model.num_features),
        stages=_stages(model),
        preprocessing=_preprocessing(name, model).with_size(image_size),
        weights_source=source,
    )


def _pretrained_model(
    name: str, architecture: str, weights_path: str | None
) -> tuple[nn.Module, str]:
    found, looked = weights_mod.find_weights_file(name, architecture, weights_path)
    if found is not None:
        model = timm.create_model(architecture, pretrained=False)
        state = weights_mod.load_state_dict(found.path)
        _load_into(model, state, found.source_format, found.source)
        return model, found.source
    if weights_path is None:
        try:  # timm's own cache (or hub, when downloads are allowed)
            model = timm.create_model(architecture, pretrained=True)
            return model, f"timm hub {pretrained_cfg(model).get('hf_hub_id') or architecture}"
        except Exception as exc:
            mode = "hub" if weights_mod.downloads_allowed() else "offline cache only"
            looked.append(f"timm hub cache ({mode}): {type(exc).__name__}")
    raise WeightsNotFoundError(
        f"no pretrained weights found for backbone {name!r}. Looked in: {'; '.join(looked)}. "
        f"Set weights_path, put {name}.safetensors in FTUNE_WEIGHTS_DIR, or use pretrained=false."
    )


def _load_into(model: nn.Module, state: dict, source_format: str | None, source: str) -> None:
    try:
        state = to_timm(state, model, source_format or detect_format(state))
    except (KeyError, IndexError, ValueError) as exc:
        raise WeightsMismatchError(
            f"weights from {source} do not fit architecture {type(model).__name__}: {exc}"
        ) from exc
    classifier = pretrained_cfg(model).get("classifier", "classifier")
    own = model.state_dict()
    # A classifier of another size (a different task) is dropped; the head is replaced anyway.
    state = {k: v for k, v in state.items()
             if not (k.startswith(classifier + ".") and k in own and own[k].shape != v.shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise WeightsMismatchError(
            f"weights from {source} do not fit {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _stages(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped into stages, input to output, as timm groups them for layer decay.

    Models without timm's coarse grouping fall back to one stage per top-level child.
    """
    from timm.models import group_parameters

    names = [n for n, _ in model.named_parameters() if not _is_classifier(model, n)]
    matcher = getattr(model, "group_matcher", None)
    groups = group_parameters(model, matcher(coarse=True)) if matcher else {}
    if groups:
        wanted = set(names)
        stages = [[n for n in group if n in wanted] for _, group in sorted(groups.items())]
        return [s for s in stages if s]
    by_child: dict[str, list[str]] = {}
    for n in names:
        by_child.setdefault(n.split(".")[0], []).append(n)
    return list(by_child.values())


def pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """timm's description of a model's weights (classifier name, hub id, preprocessing)."""
    return cast(dict[str, Any], model.pretrained_cfg)  # every timm model has one


def _is_classifier(model: nn.Module, param_name: str) -> bool:
    classifier = pretrained_cfg(model).get("classifier", "classifier")
    return param_name.startswith(classifier + ".")


def _preprocessing(name: str, model: nn.Module) -> Preprocessing:
    entry = PACKAGED_BACKBONES.get(name)
    if entry is not None:
        return Preprocessing(entry.input_size, entry.mean, entry.std, entry.interpolation,
                             entry.crop_pct)
    cfg = timm.data.resolve_data_config({}, model=model)
    return Preprocessing(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                         str(cfg["interpolation"]), float(cfg["crop_pct"]))
