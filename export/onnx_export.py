"""Export a classifier, wrapped with its own preprocessing, to ONNX and prove it matches torch.

The graph's input is the raw batch ``IMAGE`` uint8 [N, H, W, C] at the service resolution; its output
is ``LOGITS`` float32 [N, classes]. The legacy TorchScript exporter is used where it can be: it writes
one self-contained file at the opset asked for. A graph that downscales with antialiasing (timm's PIL
resize) needs torch's dynamo exporter, the only one that knows ``aten::_upsample_bicubic2d_aa``; it emits
opset 18 and is asked for one file (``external_data=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from littlebig.export.models import Preprocessed

INPUT_NAME, OUTPUT_NAME = "IMAGE", "LOGITS"
OPSET = 17
DYNAMO_OPSET = 18
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
    if getattr(net, "antialias", False):
        _export_dynamo(net, example, path)
    else:
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


def _export_dynamo(net: Preprocessed, example: torch.Tensor, path: Path) -> None:
    """torch.export -> ONNX (opset 18), one file, batch axis dynamic; the antialiased resize needs it."""
    import warnings

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net.eval(),
            (example,),
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)


def onnx_providers(device: str = "cpu") -> list[str]:
    """onnxruntime providers for ``device``: cpu, cuda, or auto (CUDA where onnxruntime-gpu has it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            f"no CUDAExecutionProvider in this onnxruntime (has {available}): "
            "install onnxruntime-gpu in place of onnxruntime"
        )
    return ["CPUExecutionProvider"]


def onnx_session(path: Path, threads: int = 0, device: str = "cpu"):
    """An onnxruntime session (0 threads: onnxruntime's default) on ``device`` (cpu, cuda or auto)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=onnx_providers(device))


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
