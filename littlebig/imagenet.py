"""A user's ImageNet-style folder, streamed: ``root/<synset>/<image>.JPEG``, as ILSVRC2012's val set.

50,000 images at 384x384x3 are 22 GB decoded, so nothing here holds the folder's pixels: the index keeps
only file names and labels (about 100 bytes an image), and batches are decoded in worker processes
with a bounded number of batches in flight. Class order is the sorted synsets (timm's); where the
model's own class ids are known (timm's ImageNet-1k synsets, or a littlebig checkpoint's class names),
each folder is mapped to that id by name, so a folder holding a subset of the classes still scores right.

The folder is split once, with a fixed seed, into a calibration half (``val``) and a test half (``test``).
Where a model was trained on the folder itself (``littlebig train little --data-dir``), a share of each class
goes to ``train`` first (``TrainSplit``, recorded in the checkpoint and in export.json) and val/test halve the
rest, so calibration and the report never see a training image.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from littlebig.data import IMAGE_SUFFIXES, SPLIT_SEED, read_image

SPLITS = ("val", "test")  # calibration half, test half
TRAIN_SPLITS = ("train", "val", "test")
DEFAULT_TRAIN_SHARE = 0.6
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class FolderIndex:
    """File paths (relative to ``root``) and labels of an image folder: no pixels."""

    root: str
    files: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, rows: np.ndarray) -> FolderIndex:
        return FolderIndex(self.root, tuple(self.files[i] for i in rows), self.labels[rows], self.class_names)


def is_imagenet_folder(path: str | Path | None) -> bool:
    """True for ``root/<class>/<images>`` (not Fashion-MNIST's IDX files, not the ``val/ test/`` layout)."""
    if path is None:
        return False
    root = Path(path)
    if not root.is_dir() or (root / "train-images-idx3-ubyte.gz").exists():
        return False
    if (root / "val").is_dir() and (root / "test").is_dir():
        return False
    return any(entry.is_dir() for entry in os.scandir(root))


def index_folder(root: str | Path, class_ids: Sequence[str] | None = None) -> FolderIndex:
    """List ``root/<class>/*`` (sorted), labelled by the model's ``class_ids`` where every folder is one.

    Without ``class_ids``, or where the folders are not all among them but are as many, labels follow
    the sorted folder names (timm's ImageNet order); otherwise this is an error, not a silent mismatch.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir()))
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class (synset), found none")
    if class_ids is not None and set(classes) <= set(class_ids):
        lookup = {name: i for i, name in enumerate(class_ids)}
        label_of = [lookup[c] for c in classes]
        class_names = tuple(class_ids)
    elif class_ids is None or len(class_ids) == len(classes):
        label_of, class_names = list(range(len(classes))), classes
    else:
        missing = sorted(set(classes) - set(class_ids))[:3]
        raise ValueError(
            f"{root}: {len(classes)} class folders, but the model has {len(class_ids)} classes and "
            f"does not know {missing}: give a folder whose sub-folders are the model's class ids (synsets)"
        )
    files: list[str] = []
    labels: list[int] = []
    for name, label in zip(classes, label_of):
        entries = os.scandir(root / name)
        names = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        files.extend(f"{name}/{n}" for n in names)
        labels.extend([label] * len(names))
    if not files:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} files in its class folders")
    return FolderIndex(str(root), tuple(files), np.asarray(labels, dtype=np.int64), class_names)


def split_rows(n: int, split: str, max_images: int | None = None, seed: int = SPLIT_SEED) -> np.ndarray:
    """Rows of ``split``: a fixed-seed permutation, first half calibration (val), second half test.

    ``max_images`` takes a seeded sample of that many images first (half to each split), for quick runs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    order = np.random.default_rng(seed).permutation(n)
    if max_images is not None:
        if max_images < 2:
            raise ValueError(f"--max-images must be at least 2 (one per split), got {max_images}")
        order = order[:max_images]
    half = len(order) // 2
    return np.sort(order[:half] if split == "val" else order[half:])


@dataclass(frozen=True)
class TrainSplit:
    """A three-way split of a folder: ``share`` of every class to train (rounded), the rest halved into val
    and test, each class shuffled by its own seed (``seed`` and the class folder's name), so the split of
    one class does not move when files of another are added or removed."""

    share: float = DEFAULT_TRAIN_SHARE
    seed: int = SPLIT_SEED

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise ValueError(f"the train share must be between 0 and 1, got {self.share}")

    def as_dict(self) -> dict[str, float | int]:
        return {"share": self.share, "seed": self.seed}

    @classmethod
    def of(cls, record: dict | None) -> TrainSplit | None:
        return None if record is None else cls(float(record["share"]), int(record["seed"]))

    def rows(self, index: FolderIndex, split: str) -> np.ndarray:
        """Rows of ``split`` in ``index`` (sorted)."""
        if split not in TRAIN_SPLITS:
            raise ValueError(f"split must be one of {TRAIN_SPLITS}, got {split!r}")
        folders = np.asarray([f.split("/", 1)[0] for f in index.files])
        out = []
        for name in sorted(set(folders.tolist())):
            rows = np.flatnonzero(folders == name)
            order = rows[np.random.default_rng([self.seed, zlib.crc32(name.encode())]).permutation(len(rows))]
            train = int(round(self.share * len(rows)))
            rest = order[train:]
            half = len(rest) // 2
            out.append({"train": order[:train], "val": rest[:half], "test": rest[half:]}[split])
        return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def folder_split(
    root: str | Path,
    split: str,
    max_images: int | None = None,
    class_ids: Sequence[str] | None = None,
    train_split: TrainSplit | None = None,
) -> FolderIndex:
    """The calibration (``val``) or test half of an ImageNet-style folder; with ``train_split``, its train,
    val or test part (``max_images``: a seeded sample of val and test, half each, as without one)."""
    index = index_folder(root, class_ids)
    if train_split is None:
        if split == "train":
            raise ValueError(f"{root}: no train split recorded (littlebig train --data-dir records one)")
        return index.subset(split_rows(len(index), split, max_images))
    rows = train_split.rows(index, split)
    if max_images is not None and split != "train":
        if max_images < 2:
            raise ValueError(f"--max-images must be at least 2 (one per split), got {max_images}")
        rows = np.sort(np.random.default_rng(train_split.seed).permutation(rows)[: max_images // 2])
    return index.subset(rows)


def load_folder_split(
    root: str | Path,
    split: str,
    size: tuple[int, int, int],
    class_ids: Sequence[str] | None = None,
    train_split: TrainSplit | None = None,
    max_images: int | None = None,
    workers: int = 0,
):
    """One split of a folder decoded whole at the service size (``data.Dataset``), for a small folder: the
    same rows, labels and bytes as the streamed logits pass."""
    from littlebig.data import Dataset

    index = folder_split(root, split, max_images, class_ids, train_split)
    batches = [b for b, _ in iter_batches(index, size, 256, workers)]
    images = np.concatenate(batches) if batches else np.zeros((0, *size), np.uint8)
    return Dataset(images, index.labels, index.class_names)


def _decode_batch(root: str, files: Sequence[str], size: tuple[int, int, int]) -> np.ndarray:
    out = np.empty((len(files), *size), dtype=np.uint8)
    for i, name in enumerate(files):
        out[i] = read_image(os.path.join(root, name), size)
    return out


def iter_batches(
    index: FolderIndex,
    size: tuple[int, int, int],
    batch_size: int = 64,
    workers: int = DEFAULT_WORKERS,
    desc: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images uint8 [B, H, W, C], labels [B]) in index order; ``workers`` processes decode ahead.

    At most ``2 * workers`` batches are in flight, so peak memory is about that many batches whatever
    the folder's size. ``workers=0`` decodes in this process. ``desc`` shows a progress bar.
    """
    from tqdm import tqdm

    starts = range(0, len(index), batch_size)
    bar = tqdm(total=len(index), desc=desc, unit="img", disable=desc is None)
    try:
        if workers <= 0:
            for s in starts:
                batch = _decode_batch(index.root, index.files[s : s + batch_size], size)
                bar.update(len(batch))
                yield batch, index.labels[s : s + batch_size]
            return
        import multiprocessing as mp

        # forkserver: workers do not inherit this process's onnxruntime/torch threads and memory.
        pool = mp.get_context("forkserver").Pool(workers)
        pending: deque = deque()
        try:
            submit = lambda s: (s, pool.apply_async(_decode_batch, (index.root, index.files[s : s + batch_size], size)))  # noqa: E731
            todo = iter(starts)
            pending.extend(submit(s) for _, s in zip(range(2 * workers), todo))
            while pending:
                s, result = pending.popleft()
                batch = result.get()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                bar.update(len(batch))
                yield batch, index.labels[s : s + batch_size]
        finally:
            # Never Pool.terminate() with tasks in flight (it can deadlock): let them finish, then join.
            for _, result in pending:
                result.wait()
            pool.close()
            pool.join()
    finally:
        bar.close()
