"""Per-image resizing (done once, at decode) and per-batch augmentation and normalisation."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ftune.models.preprocessing import Preprocessing

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def stored_size(prep: Preprocessing, augment: str) -> int:
    """Side of the square each image is stored at: augmentation crops from a larger square."""
    return prep.resize_size if augment != "none" else prep.input_size


def resize_center_crop_image(image: Image.Image, prep: Preprocessing, size: int) -> Image.Image:
    """Short side to ``prep.resize_size``, center crop ``size``; still a PIL image."""
    interpolation = _INTERPOLATION.get(prep.interpolation, InterpolationMode.BICUBIC)
    image = F.resize(image, [prep.resize_size], interpolation=interpolation, antialias=True)
    return F.center_crop(image, [size, size])


def resize_center_crop(image: Image.Image, prep: Preprocessing, size: int) -> torch.Tensor:
    """Short side to ``prep.resize_size``, center crop ``size``; uint8 CHW tensor."""
    return F.pil_to_tensor(resize_center_crop_image(image, prep, size))


def center_crop_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` square of a batch stored larger (for augmentation): what
    evaluation and cached features see, as the validation images are stored."""
    h, w = batch.shape[-2:]
    if h == size and w == size:
        return batch
    top, left = round((h - size) / 2), round((w - size) / 2)  # as torchvision's center_crop
    return batch[..., top:top + size, left:left + size]


def normalize(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (or 0..255 float) → normalised float, in one fused multiply-add."""
    mean = torch.tensor(prep.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=batch.device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std)
    return torch.addcmul(-mean / std, batch.float(), scale)


# (min area fraction, colour jitter, horizontal flips) for each augmentation level. Flips
# assume a mirrored image is the same class, which digits and text are not: "crop" has none.
_LEVELS = {"crop": (0.75, 0.0, False), "light": (0.6, 0.0, True),
           "strong": (0.25, 0.4, True)}


def augment(batch: torch.Tensor, out_size: int, level: str, *,
            among: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Random resized crop (+ horizontal flip for "light" and "strong", + colour jitter for
    "strong") on a float batch.

    Works on the whole batch at once with roi_align, on whatever device the batch lives on.
    Draws from torch's global RNG so a resumed run repeats the same augmentations.
    ``among``: the batch is part of a larger one (a rank's shard): (its size, the positions
    of these images in it). The draws are made for the whole batch and these images take
    theirs, so every device count augments each image alike.
    """
    min_area, jitter, flips = _LEVELS[level]
    _, _, h, w = batch.shape
    n = among[0] if among is not None else batch.shape[0]
    area = torch.empty(n).uniform_(min_area, 1.0) * h * w
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3))
    ratio = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * ratio).clamp(max=w)
    crop_h = torch.sqrt(area / ratio).clamp(max=h)
    x0 = torch.rand(n) * (w - crop_w)
    y0 = torch.rand(n) * (h - crop_h)
    flip = (torch.rand(n) < 0.5) & torch.tensor(flips)  # drawn anyway: same RNG stream
    if among is not None:
        mine = among[1]
        crop_w, crop_h, x0, y0, flip = (t[mine] for t in (crop_w, crop_h, x0, y0, flip))
        n = len(mine)
    # roi_align needs x0 <= x1, so flipping happens after the crop.
    boxes = torch.stack([torch.arange(n, dtype=torch.float), x0, y0, x0 + crop_w, y0 + crop_h], 1)
    out = roi_align(batch, boxes.to(batch.device, batch.dtype), output_size=out_size,
                    spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = flip.to(batch.device)
    out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    if jitter > 0:
        out = _colour_jitter(out, jitter, among)
    return out


def _colour_jitter(batch: torch.Tensor, strength: float,
                   among: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    n = among[0] if among is not None else batch.shape[0]

    def factors() -> torch.Tensor:
        drawn = torch.empty(n, 1, 1, 1).uniform_(1 - strength, 1 + strength)
        return (drawn if among is None else drawn[among[1]]).to(batch.device)

    brightness, contrast, saturation = factors(), factors(), factors()
    batch = batch * brightness
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    batch = (batch - mean) * contrast + mean
    gray = (0.299 * batch[:, 0:1] + 0.587 * batch[:, 1:2] + 0.114 * batch[:, 2:3])
    batch = (batch - gray) * saturation + gray
    return batch.clamp(0, 255)
