"""The "own pair" example: a user's folder of JPEGs and a big trained on it outside littlebig, as timm users save it.

The folder: scikit-learn's 1,797 bundled 8x8 digit scans (real handwriting, not Fashion-MNIST), upscaled with PIL
bicubic to 32x32 grey JPEGs in ``digits/<word>/<i>.jpg`` with word class names (``zero`` .. ``nine``): their sorted
order (eight, five, four, ...) is not the digits' numeric order, which is the order a model trained on the folder
(torchvision's / timm's ImageFolder) uses. The big: a timm ``resnet10t`` with a 1-channel stem, trained with plain
torch and timm's eval transform on the folder's train part (``littlebig.imagenet.TrainSplit``: the images the
distilled little trains on too, so neither has seen a val or test image), saved four ways:

- ``big/model_best.pth.tar``: timm's ``CheckpointSaver`` itself (``state_dict``, ``state_dict_ema``, ``arch``, and
  ``args`` an ``argparse.Namespace`` holding img_size/in_chans/mean/std/crop_pct/interpolation, as train.py's);
- ``big.pth``: ``torch.save(model.state_dict())``; ``big-ddp.pt``: the same with DDP's ``module.`` prefix;
- ``big.safetensors``: a plain safetensors state dict, no metadata.

``python -m tests.own_pair_example OUT`` writes them (``make own-pair`` does, then runs the chain).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 32
BIG_ARCH = "resnet10t"
MEAN, STD = 0.31, 0.35  # of the upscaled digits (measured on the folder)
INTERPOLATION = "bilinear"


def write_folder(root: Path) -> int:
    """The digits as ``root/<word>/<i>.jpg`` (grey, SIZE x SIZE, quality 95); returns the image count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for word in WORDS:
        (root / word).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray(np.round(image * 255.0 / 16.0).astype(np.uint8), mode="L")
        buf = io.BytesIO()
        grey.resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=95)
        (root / WORDS[label] / f"{i:04d}.jpg").write_bytes(buf.getvalue())
    return len(digits.target)


def train_args(epochs: int) -> argparse.Namespace:
    """What timm's train.py would record for this run (the fields littlebig reads, and a few it ignores)."""
    return argparse.Namespace(
        model=BIG_ARCH, num_classes=len(WORDS), in_chans=1, img_size=SIZE, input_size=None, crop_pct=1.0,
        mean=[MEAN], std=[STD], interpolation=INTERPOLATION, epochs=epochs, lr=3e-3, batch_size=32, model_ema=True,
        data_dir="digits", dataset="", seed=0,
    )


def _tensors(root: Path, files: tuple[str, ...]):
    """The images through timm's eval transform (what a timm user's DataLoader gives), as one tensor."""
    import torch
    from timm.data import create_transform

    transform = create_transform(
        input_size=(1, SIZE, SIZE), interpolation=INTERPOLATION, mean=(MEAN,), std=(STD,), crop_pct=1.0
    )
    return torch.stack([transform(Image.open(root / f).convert("L")) for f in files])


def train_big(root: Path, out: Path, epochs: int = 6, seed: int = 0) -> dict:
    """Train the big on the folder's train part and save it the four ways; returns a summary."""
    import timm
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from timm.utils import CheckpointSaver, ModelEmaV3

    from littlebig.imagenet import TrainSplit, folder_split

    torch.manual_seed(seed)
    began = time.time()
    train, val = (folder_split(root, s, train_split=TrainSplit()) for s in ("train", "val"))
    x, y = _tensors(root, train.files), torch.from_numpy(train.labels)
    xv, yv = _tensors(root, val.files), torch.from_numpy(val.labels)
    args = train_args(epochs)
    model = timm.create_model(BIG_ARCH, num_classes=len(WORDS), in_chans=1)
    ema = ModelEmaV3(model, decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = (len(y) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=epochs * steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "big").mkdir(exist_ok=True)
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(out / "big"),
                            recovery_dir=str(out / "big"), decreasing=False, max_history=1)
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(args.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ema.update(model)
        model.eval()
        with torch.no_grad():
            acc = float((model(xv).argmax(-1) == yv).float().mean())
        saver.save_checkpoint(epoch, metric=acc)
    state = model.state_dict()
    torch.save(state, out / "big.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, out / "big-ddp.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "big.safetensors"))
    return {"val_acc": acc, "seconds": round(time.time() - began, 1), "train_images": len(y), "epochs": epochs}


def build(out: Path, epochs: int = 6) -> dict:
    """The folder and the big's four files under ``out``; returns a summary (also written as example.json)."""
    images = write_folder(out / "digits")
    summary = {"images": images, "big": train_big(out / "digits", out, epochs)}
    (out / "example.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write digits/ and the big's checkpoints into")
    parser.add_argument("--epochs", type=int, default=6)
    ns = parser.parse_args()
    print(json.dumps(build(ns.out, ns.epochs), indent=2))
    sys.exit(0)
