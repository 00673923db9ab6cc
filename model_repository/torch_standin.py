"""little or big as a torch model on a device, for the ``gpu-standin`` profile and its offline reference.

Triton's onnxruntime and TensorRT backends are not installable from PyPI, so ``make gpu-check`` serves
the project's own checkpoints with torch inside Python-backend models instead: a STAND-IN for those
backends that, like them on KIND_GPU, leaves LOGITS in GPU memory. The served model
(``torch_classifier/model.py``) and the offline reference of the check use this one class, so the
reference is computed by exactly the code that serves.

Batches are padded to a few bucket sizes, each warmed up once: torch eager plans cuDNN kernels for every
new input shape, which made unbucketed dynamic batching spend most of its time planning (measured on an
H100). TF32 is off so the stand-ins compute in FP32, the precision
the threshold was calibrated in (ONNX on onnxruntime).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class TorchStandIn:
    """``Preprocessed(load_classifier(checkpoint))`` in eval mode on ``device``; uint8 [N, H, W, C] -> logits."""

    def __init__(self, weights: Path, service_size: Sequence[int], device: str, buckets: Sequence[int]) -> None:
        from littlebig.export.models import Preprocessed, load_classifier

        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = False
        model, self.class_names = load_classifier(str(weights))
        self.service_size = tuple(int(d) for d in service_size)
        self.net = Preprocessed(model, self.service_size).to(self.device).eval()
        self.buckets = sorted(set(int(b) for b in buckets))

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` (the largest for more: callers chunk)."""
        i = bisect.bisect_left(self.buckets, rows)
        return self.buckets[min(i, len(self.buckets) - 1)]

    @torch.inference_mode()
    def logits(self, images: np.ndarray, bucket: int | None = None) -> torch.Tensor:
        """float32 logits on the device, in chunks of the largest bucket (or ``bucket``), each padded to a bucket."""
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.service_size:
            raise ValueError(f"expected uint8 [N, {', '.join(map(str, self.service_size))}], got {images.dtype} "
                             f"{list(images.shape)}")
        step = bucket or self.buckets[-1]
        parts = []
        for start in range(0, len(images), step):
            chunk = torch.from_numpy(images[start : start + step]).to(self.device)
            n = len(chunk)
            size = bucket or self.bucket(n)
            if size > n:
                pad = torch.zeros((size - n, *self.service_size), dtype=torch.uint8, device=self.device)
                chunk = torch.cat([chunk, pad])
            parts.append(self.net(chunk)[:n].float())
        out = torch.cat(parts) if parts else torch.zeros((0, 0), device=self.device)
        return out.contiguous()

    def warm_up(self) -> None:
        """Run every bucket once so no request pays for kernel planning."""
        for size in self.buckets:
            self.logits(np.zeros((size, *self.service_size), dtype=np.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reference(self, images: np.ndarray) -> dict[int, np.ndarray]:
        """Logits of every row as computed inside each bucket: a served batch runs in one of them."""
        out = {}
        for size in self.buckets:
            out[size] = self.logits(images, bucket=size).cpu().numpy()
        return out
