"""Find pretrained weights for a backbone without touching the network by default.

Resolution order: an explicit file (``weights_path``) → ``FTUNE_WEIGHTS_DIR`` → weights shipped
inside an installed package → timm's hub cache (and the hub itself only when the user opted in
with ``FTUNE_ALLOW_DOWNLOADS=1`` or the ``allow_downloads`` setting; see
``ftune.models.offline``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ftune.models.backbones.catalog import PACKAGED_BACKBONES, PackagedBackbone
from ftune.models.settings import engine_settings

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def downloads_allowed() -> bool:
    """Whether timm may fetch weights from the hub: the settings in use decide, and the hub's
    offline mode follows them (``ftune.models.offline``)."""
    return engine_settings().allow_downloads


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    source: str  # human-readable origin, saved with the model
    source_format: str | None = None  # None: detect from the keys


def packaged_weights_file(entry: PackagedBackbone) -> Path | None:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return next(iter(sorted(package_dir.glob(entry.filename))), None)


def weights_dir_candidates(name: str, architecture: str) -> list[Path]:
    root = engine_settings().weights_dir
    if root is None:
        return []
    names = dict.fromkeys((name, architecture))
    return [root / f"{n}{suffix}" for n in names for suffix in WEIGHT_SUFFIXES]


def find_weights_file(
    name: str, architecture: str, weights_path: str | None
) -> tuple[WeightsFile | None, list[str]]:
    """Return the first local weights file found, and every place looked at (for errors)."""
    looked: list[str] = []
    if weights_path:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return WeightsFile(path, f"file {path.name}"), looked
        looked.append(f"weights_path {path} (no such file)")
        return None, looked  # an explicit path that is missing is an error, not a fallback
    candidates = weights_dir_candidates(name, architecture)
    for candidate in candidates:
        if candidate.is_file():
            # Names only: the source goes into model cards and messages users see, and
            # the server's folders are none of their business.
            return WeightsFile(candidate, f"FTUNE_WEIGHTS_DIR file {candidate.name}"), looked
    if engine_settings().weights_dir is not None:
        looked.append(f"FTUNE_WEIGHTS_DIR ({name}.* / {architecture}.*)")
    else:
        looked.append("FTUNE_WEIGHTS_DIR (not set)")
    entry = PACKAGED_BACKBONES.get(name)
    if entry is not None:
        packaged = packaged_weights_file(entry)
        if packaged is not None:
            return WeightsFile(packaged, f"package {entry.module}", entry.source_format), looked
        looked.append(f"Python package {entry.module} (not installed)")
    return None, looked


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
