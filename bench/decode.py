"""Real photos: does decoding still dominate the first epoch?

Usage: ``.venv/bin/python bench/decode.py [--images 240]``

Makes ``--images`` JPEGs of 3200x2400 px in 4 classes from scikit-image's photographs (random
crops, flips and brightness, so no two are alike), then measures side by side:

* ``decode``: ms per image on one core for a full decode plus resize (what training did
  before) and for a reduced-scale (JPEG draft) decode plus resize (what it does now).
* ``forward``: a bare frozen lite0 forward at 224 px over the same images already decoded
  into tensors: the floor for a first epoch.
* ``first_epoch``: ``fit`` with ``{"preset": "fast", "image_size": 224}`` and an empty
  cache of decoded images, from the call until the first epoch has ended (scan, decode,
  features, learning-rate test, one head epoch). Target: at most 2x ``forward``.
* ``second_job``: the same again on the same cache: nothing is decoded.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ftune.models.backbones import create_backbone
from ftune.models.data.images import decode_for, open_rgb
from ftune.models.data.transforms import normalize, resize_center_crop
from ftune.models.derived.store import DerivedStore
from ftune.models.training.fit import Callbacks, fit

SIZE = (3200, 2400)
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


def make_photos(root: Path, count: int, seed: int = 0) -> list[Path]:
    from skimage import data

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = photo.size
        scale = rng.uniform(0.7, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i:04d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def decode_ms(paths: list[Path], prep, draft: bool) -> float:
    torch.set_num_threads(1)
    started = time.perf_counter()
    for path in paths:
        image = decode_for(path, prep.resize_size) if draft else open_rgb(path)
        resize_center_crop(image, prep, prep.input_size)
    return (time.perf_counter() - started) * 1000 / len(paths)


def bare_forward(paths: list[Path]) -> float:
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True, image_size=224)
    prep, model = backbone.preprocessing, backbone.model.eval()
    images = torch.stack([resize_center_crop(decode_for(p, prep.resize_size), prep, 224)
                          for p in paths])
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(images), 32):
            model(normalize(images[start:start + 32].float(), prep))
    return time.perf_counter() - started


def until_first_epoch(data: Path, store: DerivedStore) -> float:
    started, first = time.perf_counter(), []

    def on_epoch_end(row: dict) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    fit(data, {"preset": "fast", "image_size": 224, "epochs": 1}, derived=store,
        callbacks=Callbacks(on_epoch_end=on_epoch_end))
    return first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    logging.getLogger("ftune.models.training.fit").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="ftune-decode-"))
    started = time.perf_counter()
    paths = make_photos(work / "data", args.images)
    print(f"decode made {len(paths)} JPEGs of {SIZE[0]}x{SIZE[1]} in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    prep = create_backbone("tf_efficientnet_lite0", pretrained=False,
                           image_size=224).preprocessing
    threads = torch.get_num_threads()
    sample = paths[:20]
    full, draft = decode_ms(sample, prep, draft=False), decode_ms(sample, prep, draft=True)
    torch.set_num_threads(threads)
    print(f"decode per_image_ms full={full:.1f} draft={draft:.1f} speedup={full / draft:.1f}x "
          "(one core, decode + resize to 224)", flush=True)
    forward_s = bare_forward(paths)
    print(f"decode forward_s={forward_s:.2f} (frozen lite0 at 224 px over {len(paths)} "
          "pre-decoded images)", flush=True)
    store = DerivedStore(work / "cache", 10**11)
    first_s = until_first_epoch(work / "data", store)
    print(f"decode first_epoch_s={first_s:.2f} ratio_to_forward={first_s / forward_s:.2f} "
          "target<=2", flush=True)
    second_s = until_first_epoch(work / "data", store)
    print(f"decode second_job_first_epoch_s={second_s:.2f} "
          f"ratio_to_forward={second_s / forward_s:.2f} cache_entries={len(store.entries())} "
          f"(the second job decodes nothing)", flush=True)


if __name__ == "__main__":
    main()
