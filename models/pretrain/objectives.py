"""The two self-supervised objectives a backbone can adapt with before fine-tuning.

Both need no labels and no large batches, so they run on the small GPUs and CPUs our users
have:

* ``autoencoder``: denoising, masked reconstruction (Vincent et al. 2008; the masking of
  He et al.'s MAE 2022, on a convolutional backbone). The image is corrupted (a share of
  its patches blanked, Gaussian noise on the rest) and a small decoder must rebuild the clean
  image, at low resolution, from the backbone's last feature map. The backbone has to encode
  what the domain's images look like; the decoder is thrown away.
* ``contrastive``: SimSiam (Chen & He 2021). Two augmented views of an image, a projector
  and a predictor; the predictor's output for one view is pulled towards the other view's
  projection, whose gradient is stopped. No negatives (SimCLR needs batches of thousands)
  and no momentum copy of the network (BYOL doubles the memory): one backbone, batches of 64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ftune.models.data.transforms import augment

Normalise = Callable[[torch.Tensor], torch.Tensor]

RECONSTRUCT_SIZE = 32  # the decoder rebuilds a 32x32 image: structure, not fine texture
MASK_PATCHES = 8  # the image is cut into 8x8 patches for masking
MASK_RATIO = 0.5
NOISE_STD = 0.1  # on normalised pixels
PROJECTION = 512
PREDICTION = 128


class Autoencoder(nn.Module):
    """Backbone feature map -> a 32x32 reconstruction of the clean image."""

    def __init__(self, backbone: nn.Module, channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        width = 128
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 1), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True)]
        for _ in range(3):  # from the feature map's size, upsampled to 32x32 in the end
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2),
                       nn.ReLU(inplace=True)]
            width //= 2
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.decoder = nn.Sequential(*layers)

    def loss(self, raw: torch.Tensor, normalise: Normalise) -> torch.Tensor:
        """``raw``: a float batch of 0..255 pixels; ``normalise`` as the backbone expects."""
        images = normalise(raw)
        target = F.interpolate(images, size=RECONSTRUCT_SIZE, mode="area")
        # timm's models have forward_features; nn.Module types an unknown attribute as
        # Tensor | Module, so it is named here as what it is.
        forward_features = cast(Normalise, self.backbone.forward_features)
        features = forward_features(corrupt(images))
        if features.dim() != 4:
            raise ValueError("pretrain.method autoencoder needs a convolutional backbone "
                             "(its features are a map); use contrastive")
        out = F.interpolate(self.decoder(features), size=RECONSTRUCT_SIZE, mode="bilinear",
                            align_corners=False)
        return F.mse_loss(out, target)


def corrupt(images: torch.Tensor) -> torch.Tensor:
    """Blank a random half of the patches (to the mean, zero once normalised) and add noise."""
    n, _, h, w = images.shape
    keep = (torch.rand(n, 1, MASK_PATCHES, MASK_PATCHES, device=images.device)
            >= MASK_RATIO).to(images.dtype)
    mask = F.interpolate(keep, size=(h, w), mode="nearest")
    return images * mask + NOISE_STD * torch.randn_like(images)


class SimSiam(nn.Module):
    def __init__(self, backbone: nn.Module, features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(features, PROJECTION, bias=False), nn.BatchNorm1d(PROJECTION),
            nn.ReLU(inplace=True), nn.Linear(PROJECTION, PROJECTION, bias=False),
            nn.BatchNorm1d(PROJECTION, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(PROJECTION, PREDICTION, bias=False), nn.BatchNorm1d(PREDICTION),
            nn.ReLU(inplace=True), nn.Linear(PREDICTION, PROJECTION))

    def loss(self, raw: torch.Tensor, normalise: Normalise) -> torch.Tensor:
        """``raw``: a float batch of 0..255 pixels, augmented twice (strong: crops, flips and
        colour jitter), each view normalised with ``normalise``."""
        size = raw.shape[-1]
        one = normalise(augment(raw, size, "strong"))
        two = normalise(augment(raw, size, "strong"))
        z1, z2 = self.projector(self.backbone(one)), self.projector(self.backbone(two))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return -(F.cosine_similarity(p1, z2.detach()).mean()
                 + F.cosine_similarity(p2, z1.detach()).mean()) / 2


def build_objective(method: str, backbone: nn.Module, num_features: int
                    ) -> Autoencoder | SimSiam:
    """The objective's module around ``backbone``; the backbone's last feature map has
    ``num_features`` channels (timm's convolutional models)."""
    if method == "autoencoder":
        return Autoencoder(backbone, num_features)
    if method == "contrastive":
        return SimSiam(backbone, num_features)
    raise ValueError(f"unknown pretraining method {method!r}")
