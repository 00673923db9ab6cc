"""Triton Python-backend model: one exported ONNX classifier (little or big) on onnxruntime (CPU).

The embedded Triton from nvidia-pytriton has no onnxruntime backend, so the cpu profile serves
``1/model.onnx`` through this model instead; the gpu profile uses Triton's own onnxruntime or
TensorRT backend on the same file. One batched onnxruntime call per ``execute``.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = int(params.get("inter_op_threads", "1"))
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            logits = self.session.run([self.output_name], {self.input_name: np.concatenate(images)})[0]
        except Exception as exc:  # a failed run fails this batch's requests, not the server
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        bounds = np.cumsum([len(x) for x in images])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)])
            for part in np.split(logits, bounds)
        ]
