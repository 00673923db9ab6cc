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

Training is resumable: after every epoch the full state (weights, optimiser, schedule, RNG, history)
goes to ``<state_dir>/<checkpoint stem>.state.pt`` and the checkpoint itself is rewritten, so a
stopped run (Ctrl-C, a session ending) continues from its last epoch with the same command.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from littlebig.data import Dataset, load_fashion_mnist
from littlebig.export.models import (
    RECIPES,
    Preprocessed,
    Recipe,
    checkpoint_metadata,
    create_classifier,
    load_classifier,
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
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, logits)
    return logits


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
    steps_per_epoch = len(train_set) // recipe.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    run = {"recipe": recipe.model, "input_size": list(recipe.input_size), "epochs": epochs, "seed": seed,
           "init": str(init) if init else None, "teacher": str(teacher) if teacher else None}
    state_path = state_dir / f"{out.stem}.state.pt"
    history: list[dict[str, float]] = []
    seconds = 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["run"] != run:
            raise ValueError(f"{state_path} is a different run ({state['run']}); delete it to start afresh")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history, seconds = state["history"], state["seconds"]
        tqdm.write(f"resuming {out.name} after epoch {len(history)}/{epochs} from {state_path}")
    summary: dict[str, Any] = {}
    for epoch in range(len(history), epochs):
        began = time.time()
        net.train()
        order = rng.permutation(len(train_set))
        bar = tqdm(range(steps_per_epoch), desc=f"{recipe.model} epoch {epoch + 1}/{epochs}", unit="batch")
        for step in bar:
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
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
        seconds += time.time() - began
        history.append({"epoch": epoch + 1, "val_acc": val_acc, "seconds": round(time.time() - began, 1)})
        tqdm.write(f"{recipe.model} epoch {epoch + 1}: val accuracy {val_acc:.4f}")
        summary = {**run, "epochs_done": epoch + 1, "train_seconds": round(seconds, 1), "val_acc": val_acc,
                   "threads": torch.get_num_threads(), "device": device, "history": history,
                   "autocast": str(autocast_dtype(dev)).removeprefix("torch.")}
        save_checkpoint(model, out, name=recipe.model, class_names=list(train_set.class_names), extra=summary)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"run": run, "net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "history": history,
                    "seconds": seconds}, state_path)
    if not summary:  # already finished: the checkpoint holds its summary
        summary = checkpoint_metadata(out)["extra"]
    summary["test_acc"] = accuracy(net, load_fashion_mnist("test", data_dir), dev)
    save_checkpoint(model, out, name=recipe.model, class_names=list(train_set.class_names), extra=summary)
    (state_dir / f"{out.stem}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_role(role: str, out: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    from littlebig.export.models import default_checkpoint

    if role not in RECIPES:
        raise ValueError(f"unknown role {role!r}; known: {sorted(RECIPES)}")
    return train(RECIPES[role], out or default_checkpoint(role), **kwargs)
