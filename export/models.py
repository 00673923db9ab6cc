"""One factory for every classifier littlebig runs, and the registry of recipes it knows.

A model's preprocessing is data (timm's ``pretrained_cfg``, read back with ``resolve_data_config``),
never constants copied by hand: the wrapper below builds the resize/crop/normalise graph from it, so
the exported ONNX takes the raw uint8 image batch a decoder gives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from littlebig.imaging import centre_crop, cover

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DATA_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}
FASHION_MNIST_MEAN_STD = ((0.2860,), (0.3530,))


@dataclass(frozen=True)
class Recipe:
    """How littlebig trains one model on Fashion-MNIST: timm name, its own resolution, schedule."""

    model: str
    input_size: tuple[int, int, int]
    epochs: int
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    kd_temperature: float = 4.0  # distillation (``littlebig train --teacher``): softened targets
    kd_alpha: float = 0.7  # weight of the distillation term against the label loss

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        mean, std = FASHION_MNIST_MEAN_STD
        return {
            "input_size": self.input_size,
            "interpolation": "bicubic",
            "mean": mean,
            "std": std,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }


#: The default pair (registry, not if-chains): little and big at their own resolutions, as in the
#: paper's 224 -> 384 pairs. Fashion-MNIST's 28x28 images are the service resolution; each graph
#: resizes to its own model's input size.
RECIPES: dict[str, Recipe] = {
    # Distilled from big (``--teacher``); small_075 keeps both fp16 checkpoints under 25 MB together.
    "little": Recipe("mobilenetv3_small_075", (1, 48, 48), epochs=20),
    # Two stages (progressive resizing): big64 from scratch, then big at 96 px from it (``--init``).
    "big64": Recipe("resnet18", (1, 64, 64), epochs=6),
    "big": Recipe("resnet18", (1, 96, 96), epochs=5, lr=1e-3),
    # The optional middle stage of a three-model cascade (``--models little,middle,big``): about 16x
    # little's MACs and a sixth of big's, distilled from big (``--teacher checkpoints/big.safetensors``).
    "middle": Recipe("resnet10t", (1, 48, 48), epochs=6),
}


#: The default pair's service resolution: Fashion-MNIST's own 28x28 grey images, as a decoder gives them.
DEFAULT_SERVICE_SIZE = (28, 28, 1)


def default_checkpoint(role: str) -> Path:
    return CHECKPOINT_DIR / f"{role}.safetensors"


def create_classifier(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    pretrained_cfg: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """timm.create_model with littlebig's preprocessing carried as ``pretrained_cfg`` data."""
    kwargs = dict(model_kwargs or {})
    if pretrained_cfg:
        kwargs["pretrained_cfg_overlay"] = dict(pretrained_cfg)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)


def data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing timm resolves for ``model`` (input size, interpolation, crop, mean/std)."""
    cfg = resolve_data_config({}, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in DATA_CFG_KEYS}


def save_checkpoint(
    model: nn.Module, path: Path, *, name: str, class_names: list[str], extra: dict[str, Any] | None = None
) -> None:
    """safetensors, fp16 floats (small enough to commit), with what is needed to rebuild the model."""
    from safetensors.torch import save_file

    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    meta = {
        "model": name,
        "num_classes": str(len(class_names)),
        "in_chans": str(data_config(model)["input_size"][0]),
        "pretrained_cfg": json.dumps(data_config(model)),
        "class_names": json.dumps(class_names),
        "extra": json.dumps(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "model" not in meta:
        raise ValueError(f"{path}: not a littlebig checkpoint (no 'model' in its metadata)")
    return {
        "model": meta["model"],
        "num_classes": int(meta["num_classes"]),
        "in_chans": int(meta["in_chans"]),
        "pretrained_cfg": json.loads(meta["pretrained_cfg"]),
        "class_names": json.loads(meta["class_names"]),
        "extra": json.loads(meta.get("extra", "{}")),
    }


def load_classifier(weights: str, name: str | None = None, num_classes: int = 1000) -> tuple[nn.Module, list[str]]:
    """A model from a littlebig checkpoint path, or ``pretrained`` timm weights (needs a hub).

    ``pretrained:FILE`` is timm's pretrained path (its data config, its checkpoint filters) reading a
    local copy of the hub's weights file instead of downloading it.
    """
    if weights == "pretrained" or weights.startswith("pretrained:"):
        if not name:
            raise ValueError("weights='pretrained' needs a timm model name")
        local = weights.partition(":")[2]
        if local and not Path(local).is_file():
            raise FileNotFoundError(f"{local}: no such weights file")
        model = create_classifier(
            name, num_classes=num_classes, pretrained=True, pretrained_cfg={"file": local} if local else None
        )
        from timm.data import ImageNetInfo

        info = ImageNetInfo()  # once: each instance reads its class files (1,000 of them took ~25 s)
        return model.eval(), [info.index_to_description(i) for i in range(num_classes)]
    from safetensors.torch import load_file

    path = Path(weights)
    meta = checkpoint_metadata(path)
    if name and name != meta["model"]:
        raise ValueError(f"{path} holds a {meta['model']}, not a {name}")
    model = create_classifier(
        meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"], pretrained_cfg=meta["pretrained_cfg"]
    )
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval(), meta["class_names"]


def default_service_size(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """The service size (H, W, C) a pair gets by default from big's data config: ``floor(size / crop_pct)``
    where big centre-crops (crop_pct < 1), else big's input size.

    The client (or the ``decode`` model) brings a file to the service size with timm's own first step (shorter
    side to that size, PIL bicubic), so big's graph then only crops and big sees exactly timm's eval transform of
    the original file. At big's input size instead, big's graph resized a second time: 1.1 (600 px, crop_pct
    0.949) to 2.1 (224 px, 0.875) grey levels from timm's on scikit-image's photos (GitHub issue 25, section 5).
    """
    chans, height, width = cfg["input_size"]
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    if crop_pct < 1.0 and (cfg.get("crop_mode") or "center") == "center":
        return math.floor(height / crop_pct), math.floor(width / crop_pct), chans
    return height, width, chans


def resize_geometry(
    source: tuple[int, int], input_size: tuple[int, int], crop_pct: float, crop_mode: str | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resize_to, crop top-left) exactly as timm's eval transform computes them for a source image.

    timm: scale = floor(size / crop_pct); ``center`` resizes the shorter side to it with torchvision's
    rule (longer side truncated, ``int``) or timm's ``ResizeKeepRatio`` for non-square inputs;
    ``squash`` resizes both sides; then torchvision's ``CenterCrop`` (offsets rounded).
    """
    src_h, src_w = source
    height, width = input_size
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    mode = crop_mode or "center"
    if mode == "squash":
        resize_to = (scale_h, scale_w)
    elif mode == "center" and scale_h == scale_w:
        resize_to = cover(source, (scale_h, scale_w))
    elif mode == "center":
        ratio = min(src_h / scale_h, src_w / scale_w)
        resize_to = (round(src_h / ratio), round(src_w / ratio))
    else:
        raise ValueError(f"crop_mode {crop_mode!r} is not supported (center or squash)")
    if resize_to[0] < height or resize_to[1] < width:
        raise ValueError(f"resize to {resize_to} is smaller than the model's input {input_size}")
    return resize_to, centre_crop(resize_to, (height, width))


class Preprocessed(nn.Module):
    """uint8 [N, H, W, C] at the service resolution -> the model's own resize/crop/normalise -> logits.

    Equal to timm's eval transform (PIL resize, centre crop, normalise) on the same decoded image:
    where the graph downscales it resizes with antialiasing (torch's ``antialias=True`` kernels are
    PIL's: bicubic a=-0.5, support scaled with the reduction) and rounds/clips to uint8 as PIL does;
    without that, a 384 -> 224 little sees aliased images unlike those it was trained on. Where it
    upscales (the committed Fashion-MNIST pair, 28 -> 48/96) the graph is the plain interpolate it
    was trained with, exportable by the legacy exporter. ``antialias`` tells the exporter which.
    """

    def __init__(self, model: nn.Module, service_size: tuple[int, int, int], pil_resize: bool = False) -> None:
        super().__init__()
        cfg = data_config(model)
        chans, height, width = cfg["input_size"]
        src_h, src_w, src_c = service_size
        if src_c not in (1, 3) or chans not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 (service {src_c}, model {chans})")
        self.model = model
        self.service_size = tuple(service_size)
        self.mode = INTERPOLATION.get(cfg["interpolation"], "bilinear")
        self.resize_to, (top, left) = resize_geometry(
            (src_h, src_w), (height, width), cfg["crop_pct"], cfg.get("crop_mode")
        )
        self.needs_resize = (src_h, src_w) != self.resize_to
        # PIL's filter (dynamo exporter only) where it downscales, or everywhere for timm's own weights.
        downscales = self.resize_to[0] < src_h or self.resize_to[1] < src_w
        self.antialias = self.needs_resize and self.mode != "nearest" and (downscales or pil_resize)
        self.crop = (top, left, height, width)
        mean = torch.tensor(cfg["mean"], dtype=torch.float32)
        std = torch.tensor(cfg["std"], dtype=torch.float32)
        if len(mean) != chans:  # timm keeps 3-entry mean/std for in_chans=1 models
            mean, std = mean.mean().repeat(chans), std.mean().repeat(chans)
        self.register_buffer("mean", (mean * 255.0).view(1, chans, 1, 1), persistent=False)
        self.register_buffer("inv_std", (1.0 / (std * 255.0)).view(1, chans, 1, 1), persistent=False)
        self.src_c, self.chans = src_c, chans
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        if self.src_c == 1 and self.chans == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.src_c == 3 and self.chans == 1:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        if self.antialias:
            # PIL resamples width first, then height, each pass clipped to uint8's range (overshoot).
            rows, cols = x.shape[-2], self.resize_to[1]
            for size in ((rows, cols), self.resize_to):
                if tuple(x.shape[-2:]) != size:
                    x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True)
                    x = x.clamp(0.0, 255.0)
        elif self.needs_resize:
            x = F.interpolate(
                x, size=self.resize_to, mode=self.mode, align_corners=False if self.mode != "nearest" else None
            )
        top, left, height, width = self.crop
        x = x[:, :, top : top + height, left : left + width]
        return self.model((x - self.mean) * self.inv_std)
