"""The loaders on the real Fashion-MNIST files from Debian's package, and on an image folder."""

import numpy as np
import pytest
from PIL import Image

from littlebig.data import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_image_folder,
    load_split,
    read_image,
    resize_images,
)


@pytest.fixture(scope="module")
def splits():
    return {s: load_fashion_mnist(s) for s in ("train", "val", "test")}


def test_split_sizes_and_layout(splits):
    assert {s: len(d) for s, d in splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
    for d in splits.values():
        assert d.images.dtype == np.uint8 and d.images.shape[1:] == (28, 28, 1)
        assert d.labels.dtype == np.int64 and set(np.unique(d.labels)) == set(range(10))
    assert splits["test"].class_names == FASHION_MNIST_CLASSES


def test_val_is_held_out_of_train_and_fixed(splits):
    train_rows = {row.tobytes() for row in splits["train"].images[:, :, :, 0]}
    overlap = sum(row.tobytes() in train_rows for row in splits["val"].images[:, :, :, 0])
    # Fashion-MNIST has a handful of duplicate images; a leaked split would overlap by thousands.
    assert overlap < 20
    again = load_fashion_mnist("val")
    assert np.array_equal(again.images, splits["val"].images) and np.array_equal(again.labels, splits["val"].labels)
    # The real files: labels are balanced (6,000 per class in train+val, 1,000 in test).
    assert np.bincount(splits["test"].labels).tolist() == [1000] * 10
    both = np.concatenate([splits["train"].labels, splits["val"].labels])
    assert np.bincount(both).tolist() == [6000] * 10


def test_missing_data_dir_says_how_to_fix(tmp_path):
    tmp_path.joinpath("train-images-idx3-ubyte.gz").touch()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("dev")


def test_image_folder_roundtrip_and_errors(tmp_path, splits):
    test = splits["test"]
    for i in range(6):
        folder = tmp_path / "test" / test.class_names[test.labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i, :, :, 0]).save(folder / f"{i}.png")
    data = load_split("test", tmp_path, (28, 28, 1))
    assert len(data) == 6 and data.images.shape == (6, 28, 28, 1)
    # PNG is lossless: every decoded image equals its source among the six
    sources = {test.images[i].tobytes() for i in range(6)}
    assert {img.tobytes() for img in data.images} == sources
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        read_image(bad, (28, 28, 1))
    with pytest.raises(ValueError, match="expected a 'val' sub-folder"):
        load_split("val", tmp_path, (28, 28, 1))
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_image_folder(tmp_path / "test" / data.class_names[0], (28, 28, 1))


def test_resize_matches_reading_a_file(tmp_path, splits):
    img = splits["test"].images[:1]
    Image.fromarray(img[0, :, :, 0]).save(tmp_path / "x.png")
    assert np.array_equal(resize_images(img, (40, 32, 3))[0], read_image(tmp_path / "x.png", (40, 32, 3)))
