"""Triton Python-backend model ``decode``: encoded images (JPEG/PNG bytes, BYTES [N, 1]) -> IMAGE uint8
[N, H, W, C] at the service size; the first step of the ``littlebig_encoded`` ensemble.

Decoding is ``imaging.decode_to_service`` (installed beside this file by the generator): the function the
client runs on files it sends as pixels, so a file decoded here is byte for byte that tensor and the
cascade's answers equal the pixel path's. Each file's format and declared size are checked before it is
decoded (``max_image_pixels``: decompression bombs are refused unread).

Per ``execute`` the rows of every request are decoded together on a thread pool (Pillow releases the GIL
while it decodes and resizes); a request with a bad row gets INVALID_ARGUMENT naming the row and the
problem, and the other requests are answered.

Decoders (parameter ``decoder``): ``pillow``, the default on every profile; ``nvimgcodec``, NOT RUN: written
for GPU servers (nvImageCodec decodes on the GPU, Pillow then resizes the host copy as ``fit_to_service``
does) and never executed by this project, which had no GPU; nvJPEG's IDCT and chroma upsampling are not
libjpeg-turbo's, so its pixels must pass tests/test_encoded.py's parity test on a GPU before it is used.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from imaging import ImageError, decode_to_service, fit_to_service, open_encoded


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.size = tuple(int(d) for d in config["output"][0]["dims"])
        self.max_pixels = int(params["max_image_pixels"])
        self.decoder = params.get("decoder", "pillow")
        if self.decoder not in ("pillow", "nvimgcodec"):
            raise ValueError(f"decoder must be pillow or nvimgcodec, got {self.decoder!r}")
        try:
            from PIL import Image
        except ImportError:  # an image without Pillow: littlebig keeps serving, this entry point says why it cannot
            self.unavailable = "decode: Pillow is not installed in this Triton's Python environment (pip install it)"
            return
        self.unavailable = None
        Image.MAX_IMAGE_PIXELS = None  # the model's own limit, checked before decoding, is the one that applies
        threads = int(params.get("decode_threads", "1"))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        if self.decoder == "nvimgcodec":  # NOT RUN (module docstring)
            from nvidia import nvimgcodec

            self.gpu_decoder = nvimgcodec.Decoder()

    def _decode(self, data):
        """One row -> uint8 [H, W, C], or the exception that says what is wrong with it (ImageError: the bytes)."""
        try:
            return decode_to_service(bytes(data), self.size, self.max_pixels)
        except Exception as exc:  # answered per request in execute, never raised through the batch
            return exc

    def _decode_gpu(self, rows):
        """NOT RUN. nvImageCodec: format and size checked on the host first, then one batched GPU decode."""
        from PIL import Image

        checked = []
        for data in rows:
            try:
                open_encoded(bytes(data), self.max_pixels)
                checked.append(None)
            except ImageError as exc:
                checked.append(exc)
        good = [bytes(d) for d, err in zip(rows, checked) if err is None]
        decoded = iter(self.gpu_decoder.decode(good) if good else [])
        out = []
        for err in checked:
            if err is not None:
                out.append(err)
                continue
            image = next(decoded)
            if image is None:
                out.append(ImageError("corrupt or truncated image (nvImageCodec could not decode it)"))
                continue
            out.append(fit_to_service(Image.fromarray(np.asarray(image.cpu())), self.size))
        return out

    def execute(self, requests):
        if self.unavailable:
            error = pb_utils.TritonError(self.unavailable, pb_utils.TritonError.UNAVAILABLE)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        per_request = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy().reshape(-1) for r in requests]
        rows = [data for request_rows in per_request for data in request_rows]
        if self.decoder == "nvimgcodec":
            decoded = self._decode_gpu(rows)
        elif self.pool is None:
            decoded = [self._decode(data) for data in rows]
        else:
            decoded = list(self.pool.map(self._decode, rows))
        responses, start = [], 0
        for request_rows in per_request:
            mine = decoded[start : start + len(request_rows)]
            start += len(request_rows)
            bad = [(i, r) for i, r in enumerate(mine) if isinstance(r, Exception)]
            if bad:
                message = "; ".join(f"row {i}: {err}" for i, err in bad)
                if all(isinstance(err, ImageError) for _, err in bad):
                    error = pb_utils.TritonError(f"bad image: {message}", pb_utils.TritonError.INVALID_ARG)
                else:  # the decoder itself failed, not the caller's bytes
                    error = pb_utils.TritonError(f"decode failed: {message}", pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            image = pb_utils.Tensor(self.output_name, np.stack(mine))
            responses.append(pb_utils.InferenceResponse(output_tensors=[image]))
        return responses

    def finalize(self):
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=True)
