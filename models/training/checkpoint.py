"""Self-describing training checkpoints, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
BEST_WEIGHTS_NAME = "best.pt"
CHECKPOINT_VERSION = 1


def atomic_torch_save(obj: object, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: Path, payload: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    atomic_torch_save({"version": CHECKPOINT_VERSION, **payload}, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    # Checkpoints hold RNG states and plain containers; weights_only keeps loading safe.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {state.get('version')}")
    return state


def checkpoint_folder(path: str | Path) -> Path:
    """The folder of a checkpoint given as its file or its folder."""
    path = Path(path)
    return path if path.is_dir() else path.parent


# The pseudo-labelling rounds' checkpoints, in a folder of the run's checkpoint folder: the
# run's own checkpoint stays the one its stages ended with.
ROUNDS_FOLDER = "pseudo_labels"


def round_checkpoint(folder: str | Path, history: list[dict]) -> dict | None:
    """The checkpoint of the pseudo-labelling round a run was in (``folder``: the run's
    checkpoint), None without one or when it does not go on from ``history`` (the rows the
    run's stages ended with): a checkpoint of another run left in the folder."""
    path = checkpoint_folder(folder) / ROUNDS_FOLDER / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if "pseudo_labels" not in state or state["history"][:len(history)] != history:
        return None
    return state


def last_history(folder: str | Path) -> list[dict]:
    """The epochs' rows a run's checkpoints hold, those of its pseudo-labelling rounds too."""
    history = load_checkpoint(folder).get("history", [])
    rounds = round_checkpoint(folder, history)
    return rounds["history"] if rounds is not None else history


def save_best_weights(directory: Path, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, directory / BEST_WEIGHTS_NAME)


def load_best_weights(directory: Path) -> dict | None:
    path = directory / BEST_WEIGHTS_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Saved with another device count (a run may resume on more or fewer devices).
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


HEAD_PREFIX = "head."


def weights_to_save(state: dict, backbone_as_built: bool) -> dict:
    """What a checkpoint keeps of a model's ``state``: only the head's weights while the
    backbone is still the one the run was built with (it is built the same way on resume),
    so an epoch of the head alone writes kilobytes, not the whole network."""
    if not backbone_as_built:
        return state
    return {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}


def complete_weights(model: torch.nn.Module, saved: dict) -> dict:
    """A full state dict from ``saved``: a head-only save is completed with the model's own
    (freshly built) backbone weights."""
    current = model.state_dict()
    if saved.keys() >= current.keys():
        return saved
    return {k: v.detach().to("cpu", copy=True) for k, v in current.items()} | saved
