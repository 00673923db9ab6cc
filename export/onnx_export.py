"""Export a classifier, wrapped with its own preprocessing, to ONNX and prove it matches torch.

The graph's input is the raw batch ``IMAGE`` uint8 [N, H, W, C] at the service resolution; its output
is ``LOGITS`` float32 [N, classes]. The legacy TorchScript exporter is used: it writes one
self-contained file at the opset asked for (the dynamo exporter bumps to 18 and splits weights out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from littlebig.export.models import Preprocessed

INPUT_NAME, OUTPUT_NAME = "IMAGE", "LOGITS"
OPSET = 17
PARITY_MAX_ABS = 1e-4


class ParityError(RuntimeError):
    """ONNX and torch disagree beyond tolerance: never serve such a file."""


@dataclass(frozen=True)
class Parity:
    max_abs: float
    argmax_agreement: float
    batch_sizes: tuple[int, ...]

    def as_dict(self) -> dict:
        return {
            "max_abs": self.max_abs,
            "argmax_agreement": self.argmax_agreement,
            "batch_sizes": list(self.batch_sizes),
        }


def export_onnx(net: Preprocessed, path: Path) -> Path:
    """Write ``net`` to ``path`` with a dynamic batch axis and check the file with onnx.checker."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, c = net.service_size
    example = torch.zeros(2, h, w, c, dtype=torch.uint8)
    torch.onnx.export(
        net.eval(),
        (example,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_session(path: Path, threads: int = 0):
    """An onnxruntime CPU session (0 threads: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(net: Preprocessed, path: Path, images: np.ndarray, batch_sizes: tuple[int, ...] = (1, 64)) -> Parity:
    """Max abs logit difference and argmax agreement, torch vs onnxruntime, on real images."""
    session = onnx_session(path)
    max_abs, agree, total = 0.0, 0, 0
    for bs in batch_sizes:
        batch = np.ascontiguousarray(images[:bs])
        with torch.no_grad():
            expected = net.eval()(torch.from_numpy(batch)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        max_abs = max(max_abs, float(np.abs(got - expected).max()))
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(batch)
    parity = Parity(max_abs, agree / total, tuple(batch_sizes))
    if parity.max_abs > PARITY_MAX_ABS or parity.argmax_agreement < 1.0:
        raise ParityError(
            f"{path}: ONNX differs from torch (max abs {parity.max_abs:.2e} > {PARITY_MAX_ABS:.0e} "
            f"or argmax agreement {parity.argmax_agreement:.4f} < 1)"
        )
    return parity
