"""With the service size floor(size / crop_pct), big sees exactly what timm's eval transform
makes of the user's original file, through either entry point (client pixels or the server's decoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from littlebig.data import read_image
from littlebig.export.models import Preprocessed, data_config, default_service_size
from littlebig.imaging import decode_to_service

timm = pytest.importorskip("timm")
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "horse.png")


def photo(name: str) -> Path:
    skdata = pytest.importorskip("skimage.data")
    return Path(skdata.__file__).parent / name


def test_default_service_size_follows_crop_pct():
    cfg = {"input_size": (3, 600, 600), "crop_pct": 0.949, "crop_mode": "center"}
    assert default_service_size(cfg) == (632, 632, 3)
    assert default_service_size({"input_size": (3, 224, 224), "crop_pct": 0.875}) == (256, 256, 3)
    assert default_service_size({"input_size": (3, 384, 384), "crop_pct": 1.0}) == (384, 384, 3)
    assert default_service_size({"input_size": (1, 28, 28), "crop_pct": 1.0}) == (28, 28, 1)
    assert default_service_size({"input_size": (3, 224, 224), "crop_pct": 0.9, "crop_mode": "squash"}) == (224, 224, 3)


def same_up_to_shift(got: torch.Tensor, expected: torch.Tensor, shift: int) -> bool:
    """got equals expected (within float rounding) with the crop moved by at most ``shift`` pixels."""
    h, w = got.shape[-2:]
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            a = got[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
            b = expected[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
            if (a - b).abs().max() < 1e-5:
                return True
    return False


@pytest.mark.parametrize(
    "name,shift",
    [("efficientnet_b0", 0), ("deit3_small_patch16_224", 0), ("resnet18", 1)],
)
def test_big_sees_timms_eval_transform_of_the_original_file(name, shift):
    """Pixels from the client (read_image) and from the decoder (decode_to_service, what the decode model runs)
    reach big's network as timm's create_transform(is_training=False) makes them from the file, and the
    logits agree; at big's bare input size (the old default) they did not.

    Exact where floor(size / crop_pct) - size is even (efficientnet_b0: 256 - 224, deit3_small: 248 - 224). Where it
    is odd (resnet18 at crop_pct 0.95: 235 - 224 = 11) two centre crops cannot always land where timm's one does
    (each rounds half a pixel): on a non-square photo the crop may sit one pixel off along the longer side."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    cfg = data_config(model)
    assert cfg["crop_pct"] < 1
    size = default_service_size(cfg)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    served = Preprocessed(model, size)
    assert not served.needs_resize  # big's graph only crops
    inputs = Preprocessed(model, size)
    inputs.model = torch.nn.Identity()  # the normalised tensor that enters the network
    old = Preprocessed(model, (cfg["input_size"][1], cfg["input_size"][2], 3))
    old.model = torch.nn.Identity()
    old_gap = []
    for f in PHOTOS:
        with Image.open(photo(f)) as img:
            expected = transform(img.convert("RGB")).unsqueeze(0)
        client = read_image(photo(f), size)
        assert np.array_equal(decode_to_service(photo(f).read_bytes(), size), client)
        pixels = torch.from_numpy(client[None].copy())
        with torch.no_grad():
            got = inputs(pixels)
            std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
            # 0 up to float rounding (the pixels are PIL's own, then only cropped), or a one-pixel shift (docstring)
            assert same_up_to_shift(got, expected, shift), f"{f}: big's input differs from timm's"
            if shift == 0 or same_up_to_shift(got, expected, 0):
                logits, reference = served(pixels), model(expected)
                assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max(), f"{f}: logits differ"
            before = old(torch.from_numpy(read_image(photo(f), tuple(old.service_size))[None].copy()))
            old_gap.append(float(((before - expected).abs() * std * 255).mean()))
    assert np.mean(old_gap) > 0.3, "the old default (big's input size) should blur the photos by a second resample"
