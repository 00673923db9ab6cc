"""Train one classifier of the pair on Fashion-MNIST (55k train split) and save a safetensors checkpoint.

Recipe: AdamW + OneCycle, random shift (pad 2) + horizontal flip on the 28x28 uint8 images, bf16
autocast where the CPU has it in hardware (about 2x faster than fp32 on AVX512-BF16 cores; fp32
elsewhere, where emulated bf16 is several times slower; fp16 on CUDA), through the same
``Preprocessed`` wrapper that is exported, so training and serving see identical preprocessing.

Two options make the pair stronger (RECIPES says which role uses which):
- ``init``: start from another checkpoint of the same architecture (big is trained at 64 px first,
  then fine-tuned at its served 96 px: progressive resizing, much cheaper than 96 px from scratch);
- ``teacher``: distil from big's soft labels (temperature-scaled KL plus the label loss), so little
  is confident where big is right and fewer images escalate. The teacher's logits on the
  un-augmented train images are computed once; shift and flip keep the label, and for these images
  the soft label too, closely enough.

On a user's own folder (``train_on_folder``, ``littlebig train little --data-dir FOLDER --teacher BIG``) the
little companion trains on the folder's train share (``imagenet.TrainSplit``, recorded in the checkpoint so
export, calibration and the report use only the rest) with timm's own train transform on PIL images, distilled
from any checkpoint ``models.load_model`` reads.

Training is resumable: after every epoch the full state (weights, optimiser, schedule, RNG, history)
goes to ``<state_dir>/<checkpoint stem>.state.pt`` and the checkpoint itself is rewritten, so a
stopped run (Ctrl-C, a session ending) continues from its last epoch with the same command.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from littlebig.atomic import replacing_file, write_json
from littlebig.data import Dataset, load_fashion_mnist
from littlebig.export.models import (
    RECIPES,
    Preprocessed,
    Recipe,
    checkpoint_metadata,
    create_classifier,
    data_config,
    default_service_size,
    load_classifier,
    load_model,
    save_checkpoint,
)

STATE_DIR = Path("build/train")


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
    """Random shift by up to ``pad`` pixels (zero fill) and random horizontal flip, uint8 NHWC."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    out = np.empty_like(images)
    for i in range(n):
        out[i] = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it.

    Measured 2026-11-30 on a 2-core EPYC without either: a bf16-autocast step was 6-9x *slower* than
    fp32 (mobilenetv3_small_075 2.9 s vs 0.46 s, resnet10t 12.4 s vs 1.4 s per 128-image batch).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA, bf16 on a CPU that has it in hardware, else None (plain fp32)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def _autocast(device: torch.device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def logits_of(net: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 500) -> np.ndarray:
    """``net``'s float32 logits on uint8 NHWC images, in batches, with a progress bar."""
    net.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="logits", unit="batch", leave=False):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        with _autocast(device):
            out.append(net(x).float().cpu().numpy())
    return np.concatenate(out)


def accuracy(net: torch.nn.Module, data: Dataset, device: torch.device) -> float:
    return float((logits_of(net, data.images, device).argmax(-1) == data.labels).mean())


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels) (Hinton et al., 2015)."""
    kl = F.kl_div(
        F.log_softmax(logits / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean", log_target=True,
    )
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(logits, labels)


def teacher_logits(path: Path, images: np.ndarray, device: torch.device, cache_dir: Path) -> np.ndarray:
    """The teacher checkpoint's logits on the train images, cached beside the training state."""
    cache = cache_dir / f"teacher-{path.stem}-{path.stat().st_size}-{len(images)}.npy"
    if cache.exists():
        return np.load(cache)
    model, _ = load_classifier(str(path))
    logits = logits_of(Preprocessed(model, images.shape[1:]).to(device), images, device)
    _save_npy(cache, logits)
    return logits


def _save_npy(path: Path, array: np.ndarray) -> None:
    with replacing_file(path) as partial, open(partial, "wb") as f:  # a killed run leaves no half cache
        np.save(f, array)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Full batches per epoch (at least one): what the schedule is sized for and what ``Resumable.epochs`` runs."""
    return max(1, rows // batch_size)


class Resumable:
    """The full state of one training run after each epoch: the weights under ``weights_key``, optimiser,
    schedule, numpy and torch RNGs, history and seconds spent, so a stopped run continues from its last epoch
    (and a different run under the same name is refused instead of being continued)."""

    def __init__(self, path: Path, run: dict[str, Any], weights_key: str, module: torch.nn.Module,
                 opt: torch.optim.Optimizer, sched: Any, rng: np.random.Generator) -> None:
        self.path, self.run, self.weights_key = path, run, weights_key
        self.module, self.opt, self.sched, self.rng = module, opt, sched, rng
        self.history: list[dict[str, float]] = []
        self.seconds, self.began = 0.0, 0.0

    def resume(self, label: str, epochs: int) -> None:
        """Load the saved state if there is one; ValueError if it belongs to another run."""
        if not self.path.exists():
            return
        state = torch.load(self.path, weights_only=False)
        if state["run"] != self.run:
            raise ValueError(f"{self.path} is a different run ({state['run']}); delete it to start afresh")
        self.module.load_state_dict(state[self.weights_key])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.history, self.seconds = state["history"], state["seconds"]
        tqdm.write(f"resuming {label} after epoch {len(self.history)}/{epochs} from {self.path}")

    def epochs(
        self, label: str, epochs: int, rows: int, batch_size: int
    ) -> Iterator[tuple[tqdm, Iterator[np.ndarray]]]:
        """The epochs still to run, each its tqdm bar and an iterator over its shuffled batches of row indices
        (``steps_per_epoch`` of them, drawn from the run's own RNG); the module is put in train mode at the start
        of each."""
        for epoch in range(len(self.history), epochs):
            self.began = time.time()
            self.module.train()
            order = self.rng.permutation(rows)
            bar = tqdm(range(steps_per_epoch(rows, batch_size)), desc=f"{label} epoch {epoch + 1}/{epochs}",
                       unit="batch")  # fmt: skip
            yield bar, (order[step * batch_size : (step + 1) * batch_size] for step in bar)

    def epoch_done(self, label: str, val_acc: float) -> None:
        """Count the epoch just run in the history and say its accuracy."""
        took = time.time() - self.began
        self.seconds += took
        epoch = len(self.history) + 1
        self.history.append({"epoch": epoch, "val_acc": val_acc, "seconds": round(took, 1)})
        tqdm.write(f"{label} epoch {epoch}: val accuracy {val_acc:.4f}")

    def save(self) -> None:
        state = {"run": self.run, self.weights_key: self.module.state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "rng": self.rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state(), "history": self.history, "seconds": self.seconds}
        with replacing_file(self.path) as partial:
            torch.save(state, partial)


def train(
    recipe: Recipe,
    out: Path,
    *,
    epochs: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    threads: int | None = None,
    device: str = "cpu",
    init: Path | None = None,
    teacher: Path | None = None,
    state_dir: Path = STATE_DIR,
) -> dict[str, Any]:
    """Train ``recipe`` (resuming from ``state_dir`` if a run of it stopped) and write ``out`` every epoch."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    epochs = epochs or recipe.epochs
    train_set, val_set = load_fashion_mnist("train", data_dir), load_fashion_mnist("val", data_dir)
    model = create_classifier(
        recipe.model,
        num_classes=len(train_set.class_names),
        in_chans=recipe.input_size[0],
        pretrained_cfg=recipe.pretrained_cfg,
        model_kwargs=recipe.model_kwargs,
    )
    if init is not None:
        source, _ = load_classifier(str(init), recipe.model)
        model.load_state_dict(source.state_dict())
    net = Preprocessed(model, train_set.images.shape[1:]).to(dev, memory_format=torch.channels_last)
    soft = torch.from_numpy(teacher_logits(teacher, train_set.images, dev, state_dir)) if teacher else None
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    total_steps = epochs * steps_per_epoch(len(train_set), recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total_steps)
    rng = np.random.default_rng(seed)
    run = {"recipe": recipe.model, "input_size": list(recipe.input_size), "epochs": epochs, "seed": seed,
           "init": str(init) if init else None, "teacher": str(teacher) if teacher else None}
    state = Resumable(state_dir / f"{out.stem}.state.pt", run, "net", net, opt, sched, rng)
    state.resume(out.name, epochs)
    summary: dict[str, Any] = {}
    for bar, batches in state.epochs(recipe.model, epochs, len(train_set), recipe.batch_size):
        for step, idx in enumerate(batches):
            x = torch.from_numpy(augment(train_set.images[idx], rng)).to(dev)
            y = torch.from_numpy(train_set.labels[idx]).to(dev)
            with _autocast(dev):
                logits = net(x).float()
                if soft is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    loss = distillation_loss(logits, y, soft[idx].to(dev), recipe.kd_temperature, recipe.kd_alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        val_acc = accuracy(net, val_set, dev)
        state.epoch_done(recipe.model, val_acc)
        summary = {**run, "epochs_done": len(state.history), "train_seconds": round(state.seconds, 1),
                   "val_acc": val_acc, "threads": torch.get_num_threads(), "device": device, "history": state.history,
                   "autocast": str(autocast_dtype(dev)).removeprefix("torch.")}
        save_checkpoint(model, out, name=recipe.model, class_names=list(train_set.class_names), extra=summary)
        state.save()
    if not summary:  # already finished: the checkpoint holds its summary
        summary = checkpoint_metadata(out)["extra"]
    summary["test_acc"] = accuracy(net, load_fashion_mnist("test", data_dir), dev)
    save_checkpoint(model, out, name=recipe.model, class_names=list(train_set.class_names), extra=summary)
    write_json(state_dir / f"{out.stem}.summary.json", summary)
    return summary


def train_role(role: str, out: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    from littlebig.export.models import default_checkpoint

    if role not in RECIPES:
        raise ValueError(f"unknown role {role!r}; known: {sorted(RECIPES)}")
    return train(RECIPES[role], out or default_checkpoint(role), **kwargs)


#: The default little for a user's folder: at 32x32 it costs 1.5M MACs, 6.8% of a resnet10t's 22.3M, and trains at
#: about 2.4 s an epoch on 1,078 images on 2 cores (README, "Your own pair on your own images").
FOLDER_LITTLE = "mobilenetv3_small_075"
#: RandomResizedCrop's area range: the teacher's soft labels are of the whole image (computed once), so a crop
#: keeps at least half of it (timm's default 0.08 would distil whole-image labels onto small patches).
TRAIN_SCALE = (0.5, 1.0)


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def train_on_folder(
    out: Path,
    data_dir: str,
    teacher: str,
    *,
    model_name: str | None = None,
    teacher_name: str | None = None,
    teacher_data_config: dict[str, Any] | None = None,
    teacher_ema: bool = False,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    hflip: float = 0.5,
    train_share: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    workers: int = 0,
    state_dir: Path = STATE_DIR,
) -> dict[str, Any]:
    """Train a little companion on ``data_dir``'s train share, distilled from ``teacher`` (any checkpoint form),
    and write a littlebig checkpoint (class names, preprocessing at the teacher's input size, the split) to ``out``.

    Inputs (folder, teacher, classes) are all checked before anything is written; resumable per epoch.
    """
    from timm.data import create_transform

    from littlebig.imagenet import DEFAULT_TRAIN_SHARE, TrainSplit, folder_split, index_folder, is_imagenet_folder

    if not is_imagenet_folder(data_dir):
        raise ValueError(f"{data_dir}: expected a folder of class folders (root/<class>/<image>.jpg)")
    split = TrainSplit(DEFAULT_TRAIN_SHARE if train_share is None else train_share)
    folder = index_folder(data_dir)
    loaded = load_model(teacher, teacher_name, data_config_overrides=teacher_data_config, use_ema=teacher_ema)
    classes = loaded.model.num_classes
    if loaded.class_names is None and classes != len(folder.class_names):
        raise ValueError(f"the teacher {teacher} has {classes} classes, {data_dir} has {len(folder.class_names)} "
                         "class folders")
    class_names = list(folder.class_names if loaded.class_names is None else loaded.class_names)
    train_index = folder_split(data_dir, "train", class_ids=class_names, train_split=split)
    val_index = folder_split(data_dir, "val", class_ids=class_names, train_split=split)
    if len(train_index) == 0 or len(val_index) == 0:
        raise ValueError(f"{data_dir}: too few images for a train and a val split ({len(folder)} in all)")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    cfg = data_config(loaded.model)  # the teacher's input size and normalisation: one service size for both
    chans = cfg["input_size"][0]
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if len(mean) != chans:  # as Preprocessed does: timm keeps 3-entry mean/std for 1-channel models
        mean, std = [float(np.mean(mean))] * chans, [float(np.mean(std))] * chans
    cfg = {**cfg, "mean": mean, "std": std}
    service = default_service_size(cfg)
    name = model_name or FOLDER_LITTLE
    run = {"model": name, "data_dir": str(Path(data_dir).resolve()), "teacher": teacher, "epochs": epochs,
           "seed": seed, "batch_size": batch_size, "lr": lr, "hflip": hflip, "train_split": split.as_dict(),
           "data_config": cfg, "service_size": list(service)}
    from littlebig.imagenet import iter_batches

    def decode(index):
        return np.concatenate([b for b, _ in iter_batches(index, service, 256, workers)])

    images, labels = decode(train_index), train_index.labels
    val = Dataset(decode(val_index), val_index.labels, tuple(class_names))
    # The teacher's logits on the un-augmented train images, once (cached: a resumed run reuses them).
    cache = state_dir / f"{out.stem}.teacher-{len(images)}.npy"
    key = state_dir / f"{out.stem}.teacher-{len(images)}.json"
    source = Path(teacher)
    ident = {"teacher": str(source.resolve()), "size": source.stat().st_size if source.exists() else None, **run}
    if cache.exists() and key.exists() and json.loads(key.read_text()) == ident:
        soft = torch.from_numpy(np.load(cache))
    else:
        logits = logits_of(Preprocessed(loaded.model, service).to(dev), images, dev)
        _save_npy(cache, logits)
        write_json(key, ident)
        soft = torch.from_numpy(logits)
    model = create_classifier(name, num_classes=len(class_names), in_chans=chans, pretrained_cfg=cfg)
    net = Preprocessed(model, service).to(dev)
    model.to(dev)
    transform = create_transform(
        input_size=tuple(cfg["input_size"]), is_training=True, scale=TRAIN_SCALE, hflip=hflip,
        interpolation=cfg["interpolation"], mean=tuple(mean), std=tuple(std),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    total_steps = epochs * steps_per_epoch(len(labels), batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    rng = np.random.default_rng(seed)
    kd = RECIPES["little"]
    state = Resumable(state_dir / f"{out.stem}.state.pt", run, "model", model, opt, sched, rng)
    state.resume(out.name, epochs)
    extra_base = {"train_split": split.as_dict(), "data_dir": str(data_dir), "teacher": teacher,
                  "teacher_form": loaded.form}
    summary: dict[str, Any] = {}
    pil = [_pil(img) for img in images]
    for bar, batches in state.epochs(name, epochs, len(labels), batch_size):
        for idx in batches:
            x = torch.stack([transform(pil[i]) for i in idx]).to(dev)
            y = torch.from_numpy(labels[idx]).to(dev)
            with _autocast(dev):
                logits = model(x).float()
                loss = distillation_loss(logits, y, soft[idx].to(dev), kd.kd_temperature, kd.kd_alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val_acc = accuracy(net, val, dev)
        state.epoch_done(name, val_acc)
        summary = {**run, **extra_base, "epochs_done": len(state.history), "train_seconds": round(state.seconds, 1),
                   "val_acc": val_acc, "threads": torch.get_num_threads(), "device": device,
                   "history": state.history, "train_images": int(len(labels))}
        save_checkpoint(model, out, name=name, class_names=class_names, extra=summary)
        state.save()
    if not summary:  # already finished: the checkpoint holds its summary
        summary = checkpoint_metadata(out)["extra"]
    write_json(state_dir / f"{out.stem}.summary.json", summary)
    return summary
