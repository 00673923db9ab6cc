"""Real image data: Fashion-MNIST from Debian's IDX files, or a user's folder of images.

Images are uint8 NHWC, the same layout the served model takes, so the offline reference and the
server see the same bytes.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from littlebig.imaging import MAX_IMAGE_PIXELS, ImageError, decode_to_service, fit_to_service

FASHION_MNIST_DIR = Path(os.environ.get("LITTLEBIG_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
VAL_SIZE = 5000
SPLIT_SEED = 20240625  # fixed: the val split never changes between train and calibrate
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Dataset:
    """Images (uint8 [N, H, W, C]), labels (int64 [N]) and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def _read_idx(path: Path, header: int) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: install Debian's dataset-fashion-mnist (make setup does) or pass --data-dir"
        )
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(order[VAL_SIZE:]), np.sort(order[:VAL_SIZE])


def load_fashion_mnist(split: str, data_dir: str | Path | None = None) -> Dataset:
    """train (55,000) and val (5,000, held out of train by a fixed seed) or test (10,000)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    prefix = "t10k" if split == "test" else "train"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    if split != "test":
        train_idx, val_idx = _split_indices(len(labels))
        keep = train_idx if split == "train" else val_idx
        images, labels = images[keep], labels[keep]
    return Dataset(np.ascontiguousarray(images), labels, FASHION_MNIST_CLASSES)


def read_image(path: str | Path, size: tuple[int, int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one PNG/JPEG to uint8 [H, W, C] at the service size: ``imaging.decode_to_service`` on the file's
    bytes, exactly what the served ``decode`` model does with them; errors name the file."""
    try:
        return decode_to_service(Path(path).read_bytes(), size, max_pixels)
    except (ImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of a folder with one sub-folder per class (sorted class names)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    if not files:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} files in its class folders")
    return files, labels, classes


def load_image_folder(root: str | Path, size: tuple[int, int, int]) -> Dataset:
    """A user's own labelled images: root/<class>/<image>.png|jpg, decoded at the service size."""
    files, labels, classes = list_image_folder(root)
    images = np.stack([read_image(f, size) for f in files])
    return Dataset(images, np.asarray(labels, dtype=np.int64), classes)


def resize_images(images: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Bring uint8 NHWC images to the service size exactly as the client does for files (``fit_to_service``)."""
    if images.shape[1:] == tuple(size):
        return images
    from PIL import Image

    out = np.empty((len(images), *size), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = fit_to_service(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img), size)
    return out


def is_fashion_mnist_dir(path: str | Path | None) -> bool:
    return path is None or (Path(path) / "train-images-idx3-ubyte.gz").exists()


def load_split(split: str, data_dir: str | Path | None, size: tuple[int, int, int] | None = None) -> Dataset:
    """One split of the data littlebig is run on, at the service size.

    ``data_dir`` is Fashion-MNIST's IDX folder (None: Debian's), or a user's image folder holding
    ``val/<class>/*`` and ``test/<class>/*`` (train is only needed by ``littlebig train``).
    """
    if is_fashion_mnist_dir(data_dir):
        data = load_fashion_mnist(split, data_dir)
        return data if size is None else Dataset(resize_images(data.images, size), data.labels, data.class_names)
    if size is None:
        raise ValueError("an image folder needs the service size to decode into")
    root = Path(data_dir) / split
    if not root.is_dir():
        raise ValueError(f"{data_dir}: expected a '{split}' sub-folder with one folder per class")
    return load_image_folder(root, size)
