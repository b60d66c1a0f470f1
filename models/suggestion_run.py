"""A suggestions run: a tuned model scores a dataset's unlabelled images, and the ones worth
labelling are picked (``suggestions.py`` ranks them).

One pass of the model gives both what the ranking needs: the calibrated scores (for the
uncertainty) and the backbone's pooled features (for the spread). The images are decoded
once into the derived store, as for training, and the pass's scores and features are kept
there too, by model and images: asking again for another count, or after a retry, costs
no forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ftune.models.calibration import scaled
from ftune.models.data.discover import scan_image_folder
from ftune.models.data.source import ImageSource
from ftune.models.derived.decoded import decoded_images
from ftune.models.derived.store import DerivedStore
from ftune.models.errors import DatasetError
from ftune.models.predictor import Predictor
from ftune.models.suggestions import Measure, pick_for_labelling, uncertainty
from ftune.models.training.loop import stop_if_asked

log = logging.getLogger(__name__)

BATCH = 64
SCORES_KIND, SCORES_FILE = "suggestion-scores", "scores.pt"  # in the derived store
GUESSES = 3  # the model's best classes shown beside each suggestion


def suggest(bundle: str | Path, data: str | Path, count: int, *, measure: Measure = "margin",
            device: str | None = None, derived: DerivedStore | None = None,
            owner: str | None = None, model_id: str = "",
            on_progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Up to ``count`` of ``data``'s unlabelled images (a dataset of kind unlabeled), best
    first, each with its ``path`` (relative to ``data``), ``sha256``, ``uncertainty``,
    ``distance`` (cosine, to the nearest earlier pick), ``score`` and the model's ``guess``
    (as ``Predictor.predictions`` gives it). ``on_progress(done, total)`` after each batch."""
    predictor = Predictor.load(bundle, device)
    index = scan_image_folder(data, kind="unlabeled")
    samples = index.unlabeled
    if not samples:
        raise DatasetError("the dataset has no unlabelled images to suggest from")
    logits, features = _scored(predictor, index.root, [s.path for s in samples],
                               index.unlabeled_hash, derived, owner, model_id, on_progress,
                               should_stop)
    probs = predictor.task.probabilities(scaled(logits, predictor.temperature))
    unsure = uncertainty(probs, measure=measure,
                         thresholds=predictor.thresholds if predictor.multi_label else None)
    picks = pick_for_labelling(unsure, features, count)
    guesses = predictor.predictions(probs[[p.index for p in picks]],
                                    None if predictor.multi_label else GUESSES)
    return [{"path": samples[p.index].path.relative_to(index.root).as_posix(),
             "sha256": samples[p.index].sha256, "uncertainty": round(p.uncertainty, 6),
             "distance": round(p.distance, 6), "score": round(p.score, 6), "guess": guess}
            for p, guess in zip(picks, guesses, strict=True)]


def _scored(predictor: Predictor, root: Path, paths: list[Path], images_hash: str | None,
            derived: DerivedStore | None, owner: str | None, model_id: str,
            on_progress: Callable[[int, int], None] | None,
            should_stop: Callable[[], bool] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's logits and pooled backbone features, from the derived store when this
    model scored these images before."""
    if derived is None or images_hash is None or not model_id:
        return _forward(predictor, root, paths, None, on_progress, should_stop)
    prep = predictor.preprocessing
    decoded, _ = decoded_images(derived, images_hash, paths, root, prep, prep.input_size,
                                owner, part="unlabeled")
    (logits, features), _ = derived.build_and_open(
        SCORES_KIND, f"{model_id}-{images_hash}",
        lambda tmp: torch.save(_forward(predictor, root, paths, decoded, on_progress,
                                        should_stop), tmp / SCORES_FILE),
        lambda found: torch.load(found / SCORES_FILE), owner)
    return logits, features


@torch.no_grad()
def _forward(predictor: Predictor, root: Path, paths: list[Path], decoded: object,
             on_progress: Callable[[int, int], None] | None,
             should_stop: Callable[[], bool] | None) -> tuple[torch.Tensor, torch.Tensor]:
    from ftune.models.data.transforms import normalize

    prep, model = predictor.preprocessing, predictor.model
    source = ImageSource(paths, torch.zeros(len(paths), dtype=torch.long), prep,
                         prep.input_size, decoded=decoded, root=root)  # type: ignore[arg-type]
    logits, features = [], []
    done = 0
    for images, _, _ in source.batches(torch.arange(len(source)), BATCH):
        stop_if_asked(should_stop)
        pooled = model.backbone(normalize(images.to(predictor.device), prep))
        features.append(pooled.float().cpu())
        logits.append(model.head(pooled).float().cpu())
        done += len(images)
        if on_progress is not None:
            on_progress(done, len(paths))
    return torch.cat(logits), torch.cat(features)
