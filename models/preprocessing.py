"""How images become model inputs; comes from the backbone and is saved with the model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    input_size: int  # square side fed to the network
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear" | "nearest"
    crop_pct: float  # resize the short side to input_size / crop_pct, then center-crop

    @property
    def resize_size(self) -> int:
        return math.floor(self.input_size / self.crop_pct)

    def with_size(self, input_size: int | None) -> Preprocessing:
        if input_size is None:
            return self
        return Preprocessing(input_size, self.mean, self.std, self.interpolation, self.crop_pct)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            input_size=int(data["input_size"]),
            mean=_rgb(data["mean"]),
            std=_rgb(data["std"]),
            interpolation=str(data["interpolation"]),
            crop_pct=float(data["crop_pct"]),
        )


def _rgb(values: list) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return red, green, blue
