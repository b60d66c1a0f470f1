"""Load a tuned-model bundle and classify images with it."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ftune.models.backbones import create_backbone
from ftune.models.bundle import load_bundle
from ftune.models.calibration import scaled
from ftune.models.data.images import open_rgb, to_rgb
from ftune.models.data.transforms import normalize, resize_center_crop, resize_center_crop_image
from ftune.models.network import FineTuneModel, build_head
from ftune.models.preprocessing import Preprocessing
from ftune.models.serving.engines import TORCH
from ftune.models.spec import FineTuneSpec
from ftune.models.tasks import TASKS, MultiLabel
from ftune.models.training.runtime import channels_last, resolve_device

ImageInput = Image.Image | str | Path | bytes | np.ndarray
# Another engine's forward: uint8 NCHW images and the threads it may use (None: its default)
# -> calibrated probabilities, as models/export.py's graph computes them.
Runner = Callable[[np.ndarray, int | None], np.ndarray]


class Predictor:
    def __init__(self, model: FineTuneModel, classes: list[str], preprocessing: Preprocessing,
                 device: torch.device, config: dict | None = None) -> None:
        self.model = channels_last(model.to(device)).eval()
        self.classes, self.preprocessing, self.device = classes, preprocessing, device
        self.config = config or {}
        # The task and calibration the model was saved with (earlier bundles: single-label,
        # no temperature).
        self.task = TASKS[self.config.get("task", "single_label")]
        calibration = self.config.get("calibration") or {}
        self.temperature: list[float] = calibration.get("temperature") or [1.0]
        self.thresholds = torch.tensor(calibration.get("thresholds") or [0.5] * len(classes))
        # What runs the forwards of probabilities_from_arrays (models.serving): torch until
        # an ONNX Runtime runner is attached; the torch model stays (a fallback, and what a
        # gradient needs).
        self.engine: str = TORCH
        self.runner: Runner | None = None
        # The forward size the engine runs fastest at on this host (models/serving/
        # batch_size.py): larger batches run in chunks of it. None: whole.
        self.batch_size: int | None = None

    @property
    def multi_label(self) -> bool:
        return isinstance(self.task, MultiLabel)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> Predictor:
        config, state = load_bundle(directory)
        spec = FineTuneSpec.model_validate(config["spec"])
        prep = Preprocessing.from_dict(config["preprocessing"])
        # Architecture only: the tuned weights come from the bundle, no pretrained lookup.
        backbone = create_backbone(config["backbone"], pretrained=False)
        model = FineTuneModel(backbone.model,
                              build_head(backbone.num_features, len(config["classes"]), spec.head))
        model.load_state_dict(state)
        return cls(model, list(config["classes"]), prep, resolve_device(device), config)

    def to_uint8(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Decode, resize and centre-crop: uint8 ``[N, 3, S, S]`` on the CPU."""
        size = self.preprocessing.input_size
        return torch.stack([resize_center_crop(_as_image(im), self.preprocessing, size)
                            for im in images])

    def to_arrays(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Like ``to_uint8`` without touching torch: uint8 ``[N, S, S, 3]`` (HWC) numpy.

        For servers that decode on other threads than the one running the model."""
        size = self.preprocessing.input_size
        return np.stack([np.asarray(resize_center_crop_image(_as_image(im), self.preprocessing,
                                                             size)) for im in images])

    def serve_with(self, runner: Runner | None, engine: str,
                   batch_size: int | None = None) -> None:
        """Forwards from now on by ``runner``, or torch (None), ``batch_size`` images at a
        time at most; the next forward sees it."""
        self.runner, self.engine, self.batch_size = runner, engine, batch_size

    def probabilities_from_arrays(self, arrays: np.ndarray,
                                  threads: int | None = None) -> torch.Tensor:
        """Calibrated probabilities for uint8 ``[N, S, S, 3]`` arrays, by the engine set, on
        ``threads`` cores (see ``probabilities``)."""
        runner, step = self.runner, self.batch_size or len(arrays)
        if len(arrays) > step:
            return torch.cat([self.probabilities_from_arrays(arrays[i:i + step], threads)
                              for i in range(0, len(arrays), step)])
        if runner is not None:
            return torch.from_numpy(runner(arrays.transpose(0, 3, 1, 2), threads))
        return self.probabilities(torch.from_numpy(arrays).permute(0, 3, 1, 2), threads)

    @torch.inference_mode()  # no autograd bookkeeping at all (no_grad keeps some)
    def probabilities(self, batch: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """Calibrated class probabilities for a uint8 batch from ``to_uint8``: a softmax over
        the classes, or (multi-label) each class's own sigmoid. ``threads``: the CPU cores
        it may use; torch keeps a count per thread, so the calling thread keeps it too
        (None: the thread's own)."""
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        normalised = normalize(batch.to(self.device), self.preprocessing)
        logits = self.model(normalised).float()
        return self.task.probabilities(scaled(logits, self.temperature)).cpu()

    def predict_proba(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return self.probabilities(self.to_uint8(images))

    def top_k(self, probs: torch.Tensor, top_k: int) -> list[list[dict]]:
        k = max(1, min(top_k, len(self.classes)))
        scores, indices = probs.topk(k, dim=1)
        # Lists first: iterating a tensor row by row costs a tensor per row (per request).
        return [[{"label": self.classes[i], "score": s}
                 for s, i in zip(row_s, row_i, strict=True)]
                for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)]

    def predictions(self, probs: torch.Tensor, top_k: int | None = None) -> list:
        """Per image: single-label, the ``top_k`` (default 5) ``{"label", "score"}`` best
        first; multi-label, ``{"labels": [names over their thresholds], "scores": [...]}``
        with every class's score (or the ``top_k`` best)."""
        if not self.multi_label:
            return self.top_k(probs, top_k or 5)
        over = probs >= self.thresholds[None, :]
        scores = self.top_k(probs, top_k or len(self.classes))
        return [{"labels": [self.classes[c] for c in row.nonzero().flatten().tolist()],
                 "scores": ranked} for row, ranked in zip(over, scores, strict=True)]

    def memory_bytes(self) -> int:
        torch_bytes = sum(t.numel() * t.element_size()
                          for t in [*self.model.parameters(), *self.model.buffers()])
        return torch_bytes + int(getattr(self.runner, "memory_bytes", lambda: 0)())

    def predict(self, images: Sequence[ImageInput] | ImageInput,
                top_k: int | None = None) -> list:
        """One entry per image, as ``predictions`` gives them."""
        if not isinstance(images, (list, tuple)):
            # A str or Path is one image, though mypy cannot tell a str from a Sequence.
            images = [images]  # type: ignore[list-item]
        if not images:
            return []
        return self.predictions(self.predict_proba(images), top_k)


def _as_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, Path)):
        return open_rgb(image)
    if isinstance(image, bytes):
        return open_rgb(io.BytesIO(image))
    if isinstance(image, np.ndarray):
        return to_rgb(Image.fromarray(image))
    raise TypeError(f"cannot read an image from {type(image).__name__}")
