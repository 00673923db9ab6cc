"""Triton Python-backend model: a STAND-IN for Triton's onnxruntime/TensorRT backends (gpu-standin profile).

Those backends are not on PyPI, so ``make gpu-check`` serves little and big with torch, from the
project's checkpoints, on the instance's GPU (KIND_GPU), and returns LOGITS in GPU memory through
DLPack, as those backends do on KIND_GPU. With the config parameter ``device`` = cpu the same code runs
on the CPU (the CPU test suite serves it that way). One padded forward pass per ``execute``.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from littlebig.model_repository.torch_standin import TorchStandIn


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        device = params.get("device", "cuda")
        if device == "cuda":  # KIND_GPU: the GPU Triton placed this instance on
            device = f"cuda:{int(args['model_instance_device_id'])}"
        else:
            torch.set_num_threads(int(params.get("threads", "1")))
        weights = Path(args["model_repository"]) / args["model_version"] / "model.safetensors"
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        dims = config["input"][0]["dims"]
        self.standin = TorchStandIn(weights, dims, device, json.loads(params["buckets"]))
        self.standin.warm_up()
        self.cuda = self.standin.device.type == "cuda"

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            logits = self.standin.logits(np.concatenate(images))
            if self.cuda:  # the tensors leave through DLPack without a stream: finish the work first
                torch.cuda.current_stream(self.standin.device).synchronize()
        except Exception as exc:  # a failed run fails this batch's requests, not the server
            error = pb_utils.TritonError(f"torch stand-in failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for rows in images:
            part = logits[start : start + len(rows)].contiguous()
            start += len(rows)
            tensor = pb_utils.Tensor.from_dlpack(self.output_name, to_dlpack(part))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
