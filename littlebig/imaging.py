"""An image file -> the uint8 [H, W, C] tensor the service takes: the one implementation everyone shares.

The client (files it sends as pixels), the folder loaders, the ImageNet stream and the served ``decode``
model (model_repository/decode, which gets a copy of this file) all call ``fit_to_service``, so a file
decoded on the server is byte for byte the tensor the client would have sent. numpy and Pillow only: the
decode model's Python backend has nothing else.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

#: The encoded formats the service decodes; anything else is refused before a decoder runs.
FORMATS = ("JPEG", "PNG")
#: Default ``--max-image-pixels``: 50 MP covers full-frame camera files (45 MP) while one RGB decode
#: stays under 150 MB.
MAX_IMAGE_PIXELS = 50_000_000
#: First bytes of formats people send by mistake, to name them in the error.
_SIGNATURES = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "RIFF/WebP"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
    (b"%PDF", "PDF"),
)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


class ImageError(ValueError):
    """The bytes are not a usable JPEG/PNG image; the message names the problem in one line."""


def _eight_bit(img):
    """16-bit greyscale (PNG) to 8 bits by its high byte; Pillow's own convert clips at 255 instead."""
    from PIL import Image

    if img.mode not in _SIXTEEN_BIT:
        return img
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8), "L")


def cover(source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of torchvision's ``Resize`` of the shorter side: the source's aspect ratio, covering ``target`` (H, W),
    the other side truncated (``int``) and never below the target's. Shared by the client/decoder framing
    (``fit_to_service``) and the models' exported graphs (``export.models.resize_geometry``)."""
    (h, w), (height, width) = source, target
    if height / h >= width / w:
        return height, max(width, int(height * w / h))
    return max(height, int(width * h / w)), width


def centre_crop(resized: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop`` of ``crop`` (H, W) from an image of ``resized`` (H, W)."""
    return int(round((resized[0] - crop[0]) / 2.0)), int(round((resized[1] - crop[1]) / 2.0))


def fit_to_service(img, size: tuple[int, int, int]) -> np.ndarray:
    """A decoded PIL image -> uint8 [H, W, C] at the service size, framed as timm's eval transform does:
    the shorter side resized (PIL bicubic, antialiased) to cover H x W, then the centre crop.

    Colour: greyscale, palette, RGBA/LA (alpha dropped) and 16-bit greyscale (high byte) become L or RGB.
    """
    from PIL import Image

    height, width, channels = size
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"unsupported channel count {channels} (1 or 3)")
    img = _eight_bit(img).convert(mode)
    w, h = img.size
    if (w, h) != (width, height):
        new_h, new_w = cover((h, w), (height, width))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = centre_crop((new_h, new_w), (height, width))
        img = img.crop((left, top, left + width, top + height))
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def _not_jpeg_png(data: bytes) -> str:
    for prefix, name in _SIGNATURES:
        if data.startswith(prefix):
            return f"a {name} file, not JPEG or PNG"
    return f"not a JPEG or PNG file (starts with {data[:8]!r})"


def open_encoded(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open JPEG/PNG bytes and check them *before* decoding: the format from the header, and the declared
    size against ``max_pixels`` (a small file declaring a huge image is a decompression bomb). Pillow's own
    limit (``Image.MAX_IMAGE_PIXELS``, checked inside ``Image.open``) may refuse first; the decode model
    turns it off so that this limit is the one that applies."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty: no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        kind = _sniff(data)
        raise ImageError(f"corrupt {kind}: its header cannot be read" if kind else _not_jpeg_png(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt {_sniff(data) or 'image'} header: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(
            f"decompression bomb refused: {img.format} declares {w}x{h} = {w * h:,} pixels, "
            f"more than the limit of {max_pixels:,} (--max-image-pixels)"
        )
    return img


def _sniff(data: bytes) -> str:
    """PNG or JPEG by signature, '' for anything else."""
    return "PNG" if data.startswith(b"\x89PNG\r\n\x1a\n") else "JPEG" if data.startswith(b"\xff\xd8\xff") else ""


def decode_to_service(data: bytes, size: tuple[int, int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H, W, C] at the service size (``fit_to_service``); ImageError names what is
    wrong: empty, another format, a bomb, a truncated or corrupt file."""
    img = open_encoded(data, max_pixels)
    try:
        img.load()  # decodes fully; a truncated file raises here (Pillow's LOAD_TRUNCATED_IMAGES is off)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageError(f"{kind} {img.format}: {exc}") from None
    return fit_to_service(img, size)
