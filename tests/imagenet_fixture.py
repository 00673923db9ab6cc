"""An ImageNet-layout folder of real images for tests: Fashion-MNIST rendered as JPEG into synset folders.

The ten folders are named after ImageNet-1k's first ten synsets (sorted), so timm's own class ids
(``ImageNetInfo``) know them; each image is a real Fashion-MNIST picture, upscaled with PIL bicubic to
``width`` x ``height`` (ImageNet's photos are not square either), RGB, saved as JPEG.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from littlebig.data import load_fashion_mnist

SYNSETS = (
    "n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
    "n01496331", "n01498041", "n01514668", "n01514859", "n01518878",
)


def render(gray: np.ndarray, width: int, height: int, quality: int = 90) -> bytes:
    """One 28x28 grey image as an RGB JPEG at width x height."""
    img = Image.fromarray(gray).resize((width, height), Image.Resampling.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_imagenet_folder(
    root: Path, count: int, width: int = 40, height: int = 32, split: str = "train"
) -> tuple[list[str], np.ndarray]:
    """Write ``count`` images to ``root/<synset>/ILSVRC2012_val_<i>.JPEG``; (relative files, labels)."""
    data = load_fashion_mnist(split)
    if count > len(data):
        raise ValueError(f"only {len(data)} Fashion-MNIST {split} images, asked for {count}")
    for synset in SYNSETS:
        (root / synset).mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        name = f"{SYNSETS[data.labels[i]]}/ILSVRC2012_val_{i:08d}.JPEG"
        (root / name).write_bytes(render(data.images[i, :, :, 0], width, height))
        files.append(name)
    return files, data.labels[:count].copy()
