"""Heat maps for ``/predict?explain=true``: Grad-CAM on the torch model (models/explain.py),
whichever engine serves the plain predictions.

Explaining costs a backward pass, so it runs on a thread of its own with one OpenMP thread
(as model loads do, service/forward_threads.py): plain predictions keep the forward threads
and their dynamic batching, and an explanation never competes with them for more than one
core.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ftune.service.forward_threads import one_openmp_thread

if TYPE_CHECKING:
    import torch

    from ftune.models.predictor import Predictor

EXPLAIN_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-explain",
                                    initializer=one_openmp_thread)


def explain_batch(predictor: Predictor, batch: np.ndarray, probs: torch.Tensor) -> list[dict]:
    """One explanation per image (uint8 ``[N, S, S, 3]``): the top class by the scores the
    response gives, its heat map as a small array (the feature map's resolution) and as a
    PNG overlay on the image the model saw (base64)."""
    import torch

    from ftune.models.explain import as_array, grad_cam, overlay_base64

    classes = probs.argmax(1).tolist()
    inputs = torch.from_numpy(batch).permute(0, 3, 1, 2)
    maps = grad_cam(predictor.model, inputs, predictor.preprocessing, classes)
    full = maps.upsampled(batch.shape[1])
    return [{"label": predictor.classes[c], "heatmap": as_array(maps.maps[i]),
             "overlay_png": overlay_base64(batch[i], full[i])}
            for i, c in enumerate(classes)]
