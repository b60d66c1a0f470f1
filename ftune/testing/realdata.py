"""Small image-folder datasets built from real images that ship inside packages."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

ANIMAL_CLASSES = [f"animal{i}" for i in range(10)]


def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """10,000 28×28 uint8 silhouettes and labels 0-9, exact duplicates removed."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise RuntimeError("animal-mnist is not installed (make install puts it in .venv)")
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    seen: set[bytes] = set()
    keep = []
    for i, image in enumerate(images):
        digest = hashlib.sha1(image.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return images[keep], labels[keep]


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray,
                       classes: list[str] | None = None) -> Path:
    classes = classes or ANIMAL_CLASSES
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


def balanced_indices(labels: np.ndarray, per_class: int, offset: int = 0,
                     classes: int = 10) -> np.ndarray:
    """``per_class`` indices of each class, starting at the ``offset``-th of that class."""
    picked = [np.flatnonzero(labels == c)[offset:offset + per_class] for c in range(classes)]
    return np.concatenate(picked)


def write_faces(root: Path, split_seed: int | None = None) -> Path:
    """scikit-image's lfw_subset (packaged, offline): 100 faces then 100 non-faces, 25 px
    grey, as ``train/`` and ``test/`` folders with 20 of each class held out (the last 20,
    or 20 drawn with ``split_seed``). Small, and easy for pretrained features."""
    from skimage.data import lfw_subset

    images = (lfw_subset() * 255).round().astype(np.uint8)
    order = np.arange(100) if split_seed is None else \
        np.random.default_rng(split_seed).permutation(100)
    for i, image in enumerate(images):
        label, index = ("face", i) if i < 100 else ("not_face", i - 100)
        rank = int(np.flatnonzero(order == index)[0])
        folder = root / ("train" if rank < 80 else "test") / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root
