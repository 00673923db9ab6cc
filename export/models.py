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

from littlebig.atomic import replacing_file
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
    with replacing_file(path) as partial:  # a killed run leaves the previous epoch's checkpoint whole
        save_file(tensors, str(partial), metadata=meta)


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


#: The data config keys a ``--*-data-config`` flag may set (timm's names).
DATA_CONFIG_FLAG_KEYS = ("input_size", "img_size", "crop_pct", "crop_mode", "mean", "std", "interpolation")
#: What timm's train.py records of the data config in a checkpoint's ``args`` (``resolve_data_config``'s inputs).
TIMM_ARGS_KEYS = ("input_size", "img_size", "in_chans", "crop_pct", "crop_mode", "mean", "std", "interpolation")
#: Where a weights file may keep its state dict: timm's train.py (``state_dict``, ``state_dict_ema``), and
#: the ``model`` key several reference repositories use.
STATE_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")
FEW = 5  # keys named in an error


@dataclass
class LoadedModel:
    """A classifier read from a weights file, with what export records about where it came from.

    ``class_names`` is None where the file carries none (timm's and torch's formats): the data folder's
    sorted class folders name them. ``train_split`` is the folder split a littlebig checkpoint was trained on.
    """

    model: nn.Module
    class_names: list[str] | None
    form: str  # littlebig, pretrained, timm-train, state_dict, safetensors
    state_key: str | None = None  # which entry of a timm checkpoint was loaded
    config_source: str = "architecture"  # where the data config came from (before any flag)
    train_split: dict[str, Any] | None = None


def parse_data_config(text: str) -> dict[str, Any]:
    """``input_size=3x64x64,crop_pct=1.0,mean=0.5,0.5,0.5,interpolation=bilinear`` -> a data config overlay.

    Pairs are comma-separated and list values are too (a comma followed by a known ``key=`` starts the next
    pair); ``input_size`` also takes ``CxHxW``, ``img_size`` one number (the model's channels are kept).
    """
    import re

    out: dict[str, Any] = {}
    text = text.strip()
    if not text:
        return out
    for pair in re.split(r",(?=\s*[a-z_]+\s*=)", text):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or key not in DATA_CONFIG_FLAG_KEYS:
            raise ValueError(f"data config {text!r}: {pair!r} is not KEY=VALUE with KEY one of {DATA_CONFIG_FLAG_KEYS}")
        try:
            if key == "input_size":
                dims = tuple(int(v) for v in re.split(r"[x,]", value.lower()))
                if len(dims) != 3 or min(dims) < 1:
                    raise ValueError
                out[key] = dims
            elif key == "img_size":
                out[key] = int(value)
            elif key == "crop_pct":
                out[key] = float(value)
                if not 0 < out[key] <= 1:
                    raise ValueError
            elif key in ("mean", "std"):
                out[key] = tuple(float(v) for v in value.split(","))
            else:
                out[key] = value
        except ValueError:
            raise ValueError(f"data config {text!r}: bad value for {key}: {value!r}") from None
    if out.get("crop_mode", "center") not in ("center", "squash"):
        raise ValueError(f"data config {text!r}: crop_mode must be center or squash")
    if out.get("interpolation", "bicubic") not in INTERPOLATION:
        raise ValueError(f"data config {text!r}: interpolation must be one of {sorted(INTERPOLATION)}")
    return out


def _overlay(cfg: dict[str, Any], overrides: dict[str, Any] | None, in_chans: int) -> dict[str, Any]:
    """``cfg`` with a flag's overrides applied (``img_size`` keeps the channels; channels must match the stem)."""
    cfg = dict(cfg)
    for key, value in (overrides or {}).items():
        if key == "img_size":
            cfg["input_size"] = (cfg["input_size"][0], value, value)
        else:
            cfg[key] = value
    if cfg["input_size"][0] != in_chans:
        raise ValueError(f"the data config's input_size {tuple(cfg['input_size'])} has {cfg['input_size'][0]} "
                         f"channels, the model's stem takes {in_chans}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in DATA_CFG_KEYS}


def _read_weights(path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, str | None]:
    """(state dict, timm train.py's recorded args and arch, form, state key) of a non-littlebig weights file.

    torch files are read with ``weights_only=True``: tensors, containers and argparse.Namespace (timm's saved
    ``args``) only, so a file whose unpickling would run code is refused, never run.
    """
    import argparse
    import pickle

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}, "safetensors", None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line), reason[0] if reason else "")
        raise ValueError(
            f"{path}: refused: reading it would need pickle to run code ({detail.strip()[:200]}). littlebig reads "
            "torch files with weights_only=True (tensors, containers, argparse.Namespace); re-save the weights with "
            "torch.save(model.state_dict(), PATH) or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a torch checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict or a timm train.py checkpoint")
    if all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        return obj, {}, "state_dict", None
    keys = [k for k in (EMA_KEYS if use_ema else ()) + STATE_KEYS if isinstance(obj.get(k), dict)]
    if not keys:
        raise ValueError(f"{path}: no state dict in it (top-level keys {sorted(map(str, obj))[:8]}): expected "
                         f"tensors, or a timm train.py checkpoint with {' / '.join(STATE_KEYS + EMA_KEYS)}")
    args = obj.get("args")
    record = {k: getattr(args, k, None) if not isinstance(args, dict) else args.get(k) for k in TIMM_ARGS_KEYS}
    record = {k: v for k, v in record.items() if v is not None and v != ""}
    record["arch"] = obj.get("arch") or (getattr(args, "model", None) if args is not None else None)
    return obj[keys[0]], record, "timm-train", keys[0]


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without DataParallel/DDP's ``module.`` prefix (timm's ``clean_state_dict`` does the same)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _param_of(model: nn.Module, module: nn.Module | None) -> str | None:
    names = {id(m): n for n, m in model.named_modules()}
    name = names.get(id(module)) if module is not None else None
    return f"{name}.weight" if name else None


def _shape_of(name: str, state: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """(classes, input channels) from the state dict: the classifier head's weight rows (timm's
    ``get_classifier()`` names the head) and the stem convolution's input channels (``first_conv``)."""
    try:
        with torch.device("meta"):  # only the module names are needed: no memory, no initialisation
            probe = timm.create_model(name)
    except RuntimeError as exc:
        raise ValueError(f"cannot create timm model {name!r}: {exc}") from None
    head = probe.get_classifier()
    key = _param_of(probe, head if isinstance(head, nn.Module) else None)
    if key is None:
        raise ValueError(f"{name}: timm's get_classifier() names no single head layer to read the class count from")
    if key not in state:
        few = sorted(state)[:FEW]
        raise ValueError(f"{path}: no {key!r}, {name}'s classifier head: not a {name}? (its keys begin "
                         f"{few})")
    first = probe.pretrained_cfg.get("first_conv")
    stem = f"{first[0] if isinstance(first, (list, tuple)) else first}.weight" if first else None
    in_chans = int(state[stem].shape[1]) if stem in state and state[stem].dim() == 4 else 3
    return int(state[key].shape[0]), in_chans


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names a few missing/unexpected keys or shapes."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys {missing[:FEW]}" if missing else "",
                 f"{len(unexpected)} unexpected keys {unexpected[:FEW]}" if unexpected else "",
                 f"{len(shapes)} shapes differ (file vs model): {shapes[:FEW]}" if shapes else ""]
        raise ValueError(f"{path} does not fit a {name}: " + "; ".join(p for p in parts if p))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)


def load_model(
    weights: str,
    name: str | None = None,
    *,
    data_config_overrides: dict[str, Any] | None = None,
    use_ema: bool = False,
    num_classes: int = 1000,
) -> LoadedModel:
    """A classifier from any weights a user has: a littlebig checkpoint, ``pretrained[:FILE]`` (timm's hub
    weights), a timm train.py checkpoint (``.pth.tar``), a bare torch state dict, or a plain safetensors file.

    The architecture is the file's own where it records one (littlebig's ``model``, timm's ``arch``), else
    ``name``; both and different is an error. Classes and input channels are read from the head and stem
    weights. The data config is the architecture's ``pretrained_cfg``, overlaid by what the file records
    (timm's ``args``, resolved as timm's train.py does), overlaid by ``data_config_overrides``. ``use_ema``: a
    timm checkpoint's ``state_dict_ema`` where it has one (timm's validate.py ``--use-ema``); ``state_dict``
    otherwise. Every mismatch is an error naming the file, before any model is returned.
    """
    if weights == "pretrained" or weights.startswith("pretrained:"):
        if not name:
            raise ValueError("weights='pretrained' needs a timm model name")
        local = weights.partition(":")[2]
        if local and not Path(local).is_file():
            raise FileNotFoundError(f"{local}: no such weights file")
        overlay = {**({"file": local} if local else {}), **_pretrained_overrides(name, data_config_overrides)}
        model = create_classifier(name, num_classes=num_classes, pretrained=True, pretrained_cfg=overlay or None)
        from timm.data import ImageNetInfo

        info = ImageNetInfo()  # once: each instance reads its class files (1,000 of them took ~25 s)
        names = [info.index_to_description(i) for i in range(num_classes)]
        return LoadedModel(model.eval(), names, "pretrained", config_source="timm pretrained_cfg")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors" and _is_littlebig(path):
        return _load_littlebig(path, name, data_config_overrides)
    state, record, form, state_key = _read_weights(path, use_ema)
    state = _strip_prefix(state)
    arch = record.pop("arch", None)
    if arch is not None and not timm.is_model(arch):
        arch = None  # CheckpointSaver without args records the class name ('resnet'), not a model name
    if arch and name and arch != name:
        raise ValueError(f"{path} holds a {arch} (its 'arch'), not a {name}: drop the model name or fix it")
    arch = arch or name
    if not arch:
        raise ValueError(f"{path} records no architecture: name its timm model (--big NAME / --little NAME / --models)")
    classes, in_chans = _shape_of(arch, state, path)
    with torch.device("meta"):
        arch_cfg = timm.create_model(arch, in_chans=in_chans).pretrained_cfg
    try:
        cfg = resolve_data_config({**record, "in_chans": in_chans}, pretrained_cfg=arch_cfg)
    except AssertionError:
        raise ValueError(f"{path}: its recorded data config {record} does not fit {in_chans} input channels") from None
    if "input_size" not in record and "img_size" not in record:  # the architecture's size, at the stem's channels
        cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    cfg = _overlay({**cfg, "crop_mode": cfg.get("crop_mode", "center")}, data_config_overrides, in_chans)
    model = create_classifier(arch, num_classes=classes, in_chans=in_chans, pretrained_cfg=cfg)
    _load_strict(model, state, path, arch)
    source = "checkpoint args" if any(k in record for k in TIMM_ARGS_KEYS) else "architecture pretrained_cfg"
    return LoadedModel(model.eval(), None, form, state_key, source)


def _pretrained_overrides(name: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    with torch.device("meta"):
        cfg = dict(timm.create_model(name).pretrained_cfg)
    return _overlay({"input_size": cfg["input_size"], **cfg}, overrides, cfg["input_size"][0])


def _is_littlebig(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "model" in (f.metadata() or {})


def _load_littlebig(path: Path, name: str | None, overrides: dict[str, Any] | None) -> LoadedModel:
    from safetensors.torch import load_file

    meta = checkpoint_metadata(path)
    if name and name != meta["model"]:
        raise ValueError(f"{path} holds a {meta['model']}, not a {name}")
    cfg = _overlay(meta["pretrained_cfg"], overrides, meta["in_chans"]) if overrides else meta["pretrained_cfg"]
    model = create_classifier(
        meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"], pretrained_cfg=cfg
    )
    _load_strict(model, load_file(str(path)), path, meta["model"])
    return LoadedModel(
        model.eval(), meta["class_names"], "littlebig", config_source="littlebig checkpoint",
        train_split=meta["extra"].get("train_split"),
    )


def load_classifier(weights: str, name: str | None = None, num_classes: int = 1000) -> tuple[nn.Module, list[str]]:
    """(model, class names) from any weights ``load_model`` reads; class names are empty where the file has none.

    ``pretrained:FILE`` is timm's pretrained path (its data config, its checkpoint filters) reading a
    local copy of the hub's weights file instead of downloading it.
    """
    loaded = load_model(weights, name, num_classes=num_classes)
    return loaded.model, list(loaded.class_names or [])


def default_service_size(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """The service size (H, W, C) a pair gets by default from big's data config: ``floor(size / crop_pct)``
    where big centre-crops (crop_pct < 1), else big's input size.

    The client (or the ``decode`` model) brings a file to the service size with timm's own first step (shorter
    side to that size, PIL bicubic), so big's graph then only crops and big sees exactly timm's eval transform of
    the original file. At big's input size instead, big's graph resized a second time: 1.1 (600 px, crop_pct
    0.949) to 2.1 (224 px, 0.875) grey levels from timm's on scikit-image's photos.
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
