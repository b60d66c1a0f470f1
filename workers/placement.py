"""Which devices this worker process trains on (``ftune worker --devices``).

``--devices`` (or ``FTUNE_WORKER_DEVICES``) takes a count ``N``, ``all`` or a list of GPU
numbers ``0,1``. The worker narrows ``CUDA_VISIBLE_DEVICES`` to its GPUs at start-up
(``WorkerDevices.environment``), so several workers on one machine can split its GPUs, and
the process and its children see its GPUs as ``cuda:0`` .. ``cuda:{count - 1}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ftune.models.spec import MAX_DEVICES


@dataclass(frozen=True)
class WorkerDevices:
    """The devices a worker owns: CUDA ordinals as this process saw them at start-up (the
    machine's numbering unless CUDA_VISIBLE_DEVICES was already set), or CPU ranks."""

    kind: str  # "cuda" or "cpu"
    ids: tuple[int, ...] = (0,)

    @property
    def count(self) -> int:
        return len(self.ids)

    def environment(self, inherited: str | None = None) -> dict[str, str]:
        """The variables that give this process (and its children) only these GPUs; ``{}``
        on the CPU. ``inherited``: a CUDA_VISIBLE_DEVICES already in force, which ``ids``
        index into (so ``0,1`` of ``4,5,6,7`` is ``4,5``)."""
        if self.kind != "cuda":
            return {}
        entries = [e.strip() for e in inherited.split(",")] if inherited else None
        if entries is not None and max(self.ids) >= len(entries):
            raise ValueError(f"GPU {max(self.ids)} is not among CUDA_VISIBLE_DEVICES="
                             f"{inherited}")
        names = [entries[i] if entries is not None else str(i) for i in self.ids]
        return {"CUDA_VISIBLE_DEVICES": ",".join(names)}


ONE_DEVICE = WorkerDevices("cpu")

_NUMBER = re.compile(r"\d+")


def parse_devices(text: str | None, *, device: str | None,
                  gpus: int | None = None) -> WorkerDevices:
    """The devices of ``--devices`` / FTUNE_WORKER_DEVICES (``None``: the one device the
    engine's ``device`` setting names, as before). ``gpus``: the GPUs this process sees
    (default: asked of torch, through NVML, without initialising CUDA)."""
    if device is not None and device.startswith("cuda:") and text is not None:
        raise ValueError(f"--device {device} names one GPU; with several devices use "
                         "--device cuda (or leave it unset) and list the GPUs in --devices")
    if device is not None and device.startswith("mps"):
        if text is not None and _cpu(text).count > 1:
            raise ValueError("devices: mps is one device")
        return ONE_DEVICE
    if device == "cpu":
        return ONE_DEVICE if text is None else _cpu(text)
    visible = _visible_gpus() if gpus is None else gpus
    if device is None and visible == 0:  # automatic: no GPU, so the CPU
        return ONE_DEVICE if text is None else _cpu(text)
    if text is None:
        return WorkerDevices("cuda", (int(device.split(":")[1]) if device and ":" in device
                                      else 0,))
    return _cuda(text, visible)


def _items(text: str) -> tuple[str, list[int] | int]:
    """``all``, a count (int) or a list of numbers, checked for junk."""
    value = text.strip().lower()
    if value == "all":
        return value, 0
    if _NUMBER.fullmatch(value):
        count = int(value)
        if not 1 <= count <= MAX_DEVICES:
            raise ValueError(f"devices {text!r}: a count from 1 to {MAX_DEVICES}")
        return "count", count
    parts = [p.strip() for p in value.split(",")]
    bad = [p for p in parts if not _NUMBER.fullmatch(p)]
    if bad:
        raise ValueError(f"devices {text!r}: expected a count (2), all, or GPU numbers "
                         f"(0,1); {bad[0]!r} is not a device number")
    ids = [int(p) for p in parts]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"devices {text!r}: {', '.join(map(str, twice))} listed twice")
    return "list", ids


def _cpu(text: str) -> WorkerDevices:
    """CPU ranks: ``N`` ranks, ``all`` one (ranks share the same cores), a list its length."""
    form, value = _items(text)
    count = 1 if form == "all" else value if isinstance(value, int) else len(value)
    if count > MAX_DEVICES:
        raise ValueError(f"devices {text!r}: at most {MAX_DEVICES} CPU ranks")
    return WorkerDevices("cpu", tuple(range(count)))


def _cuda(text: str, visible: int) -> WorkerDevices:
    form, value = _items(text)
    if form == "all":
        if visible == 0:
            raise ValueError("devices 'all': no GPU is visible to this process")
        return WorkerDevices("cuda", tuple(range(visible)))
    if isinstance(value, int):
        if value > visible:
            raise ValueError(f"devices {text!r}: {value} GPUs asked, {visible} visible to "
                             "this process")
        return WorkerDevices("cuda", tuple(range(value)))
    missing = [i for i in value if i >= visible]
    if missing:
        raise ValueError(f"devices {text!r}: no GPU {missing[0]}; this process sees {visible} "
                         f"(0 to {visible - 1})" if visible else
                         f"devices {text!r}: no GPU is visible to this process")
    return WorkerDevices("cuda", tuple(value))


def _visible_gpus() -> int:
    import torch

    # NVML-based where the driver has it: CUDA stays uninitialised, so CUDA_VISIBLE_DEVICES
    # set after this still takes effect in this process.
    return int(torch.cuda.device_count())
