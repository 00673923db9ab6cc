"""Triton Python-backend BLS model: the Little-Big cascade.

Per ``execute``: little runs once on the rows of every request (concatenated), the shared decision
rule (``decision.py``, installed beside this file) picks the rows whose confidence is below T, and
only those go to big, in chunks no larger than big's max_batch_size, all in flight at once
(``async_exec``). Answers merge back in each request's order. A request whose threshold parameter is
bad, or whose rows hit a failing model, gets its own error; the other requests are answered.

Imports only numpy, triton_python_backend_utils and decision, so it runs on a stock NGC image.
"""

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from decision import check_threshold, confidence, escalate, softmax

CONFIDENCE_BUCKETS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]


class ModelCallError(Exception):
    """little or big failed (or timed out) on a chunk of rows."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.threshold = check_threshold(params["threshold"])
        self.little_model = params["little_model"]
        self.big_model = params["big_model"]
        self.little_max_batch = int(params["little_max_batch_size"])
        self.big_max_batch = int(params["big_max_batch_size"])
        self.timeout_us = int(float(params.get("bls_timeout_ms", "10000")) * 1000)
        self.fall_back_to_little = params.get("on_big_failure", "error") == "little"
        self.classes = next(o["dims"][0] for o in config["output"] if o["name"] == "PROBS")
        labels = {"model": args["model_name"], "version": args["model_version"]}
        # Keep the families referenced: a metric whose family is collected stops updating.
        self.families = {
            "rows": pb_utils.MetricFamily(
                "littlebig_rows_total", "Rows (images) answered by the cascade", pb_utils.MetricFamily.COUNTER
            ),
            "escalated": pb_utils.MetricFamily(
                "littlebig_escalated_rows_total", "Rows sent to the big model", pb_utils.MetricFamily.COUNTER
            ),
            "degraded": pb_utils.MetricFamily(
                "littlebig_degraded_rows_total",
                "Escalated rows answered by little because big failed",
                pb_utils.MetricFamily.COUNTER,
            ),
            "failed": pb_utils.MetricFamily(
                "littlebig_failed_requests_total",
                "Requests answered with an error (Triton counts them as successes)",
                pb_utils.MetricFamily.COUNTER,
            ),
            "confidence": pb_utils.MetricFamily(
                "littlebig_little_confidence", "little's top softmax probability", pb_utils.MetricFamily.HISTOGRAM
            ),
        }
        self.metrics = {k: f.Metric(labels=labels) for k, f in self.families.items() if k != "confidence"}
        self.confidence_hist = self.families["confidence"].Metric(labels=labels, buckets=CONFIDENCE_BUCKETS)

    def _threshold(self, request):
        params = json.loads(request.parameters() or "{}")
        return self.threshold if "threshold" not in params else check_threshold(params["threshold"])

    async def _run(self, model, images, max_batch):
        """``model`` on every row, chunked to its max_batch_size, all chunks in flight together.

        Yields (start, stop, logits, None) per answered chunk and (start, stop, None, message) per failed one.
        """
        bounds = list(range(0, len(images), max_batch)) + [len(images)]
        spans = list(zip(bounds[:-1], bounds[1:]))
        calls = [
            pb_utils.InferenceRequest(
                model_name=model,
                requested_output_names=["LOGITS"],
                inputs=[pb_utils.Tensor("IMAGE", images[a:b])],
                timeout=self.timeout_us,
            ).async_exec()
            for a, b in spans
        ]
        # Triton's BLS timeout only covers queueing: bound the whole call, so a hung model costs its
        # requests an error after the timeout instead of stalling every BLS instance behind it.
        limit_s = self.timeout_us / 1e6
        results = await asyncio.gather(*(asyncio.wait_for(c, limit_s) for c in calls), return_exceptions=True)
        chunks = []
        for (a, b), res in zip(spans, results):
            if isinstance(res, asyncio.TimeoutError):
                chunks.append((a, b, None, f"{model} timed out after {limit_s * 1000:.0f} ms"))
            elif isinstance(res, Exception):
                chunks.append((a, b, None, f"{model} failed: {res}"))
            elif res.has_error():
                chunks.append((a, b, None, f"{model} failed: {res.error().message()}"))
            else:
                chunks.append((a, b, pb_utils.get_output_tensor_by_name(res, "LOGITS").as_numpy(), None))
        return chunks

    async def execute(self, requests):
        responses = [None] * len(requests)
        images, thresholds, owners = [], [], []
        for i, request in enumerate(requests):
            try:
                t = self._threshold(request)
            except ValueError as exc:
                responses[i] = self._error(f"invalid 'threshold' parameter: {exc}", pb_utils.TritonError.INVALID_ARG)
                continue
            rows = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            images.append(rows)
            thresholds.append(np.full(len(rows), t))
            owners.append(np.full(len(rows), i))
        if images:
            await self._cascade(np.concatenate(images), np.concatenate(thresholds), np.concatenate(owners), responses)
        self.metrics["failed"].increment(sum(1 for r in responses if r.has_error()))
        return responses

    async def _cascade(self, images, thresholds, owners, responses):
        """Fill ``responses`` for the rows' owners: little on all rows, big on the escalated ones."""
        failed = {}  # request index -> error message, for requests any of whose rows hit a failure
        probs = np.zeros((len(images), self.classes), dtype=np.float32)
        answered = np.zeros(len(images), dtype=bool)
        for a, b, logits, err in await self._run(self.little_model, images, self.little_max_batch):
            if err:
                failed.update({int(i): err for i in np.unique(owners[a:b])})
            else:
                probs[a:b] = softmax(logits)
                answered[a:b] = True
        conf = confidence(probs)
        esc = escalate(conf, thresholds) & answered
        degraded = np.zeros(len(images), dtype=bool)
        rows = np.flatnonzero(esc)
        if len(rows):
            for a, b, logits, err in await self._run(self.big_model, images[rows], self.big_max_batch):
                if err is None:
                    probs[rows[a:b]] = softmax(logits)
                elif self.fall_back_to_little:
                    degraded[rows[a:b]] = True
                else:
                    failed.update({int(i): err for i in np.unique(owners[rows[a:b]])})
        for i, message in failed.items():
            responses[i] = self._error(message, pb_utils.TritonError.UNAVAILABLE)
        labels = probs.argmax(axis=-1).astype(np.int64)
        for i in np.unique(owners):
            if responses[i] is not None:
                continue
            mine = owners == i
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("LABEL", labels[mine].reshape(-1, 1)),
                    pb_utils.Tensor("PROBS", probs[mine]),
                    pb_utils.Tensor("ESCALATED", esc[mine].reshape(-1, 1)),
                    pb_utils.Tensor("DEGRADED", degraded[mine].reshape(-1, 1)),
                ]
            )
        served = ~np.isin(owners, list(failed))
        self._observe(conf[served], esc[served], degraded[served])

    def _observe(self, conf, esc, degraded):
        self.metrics["rows"].increment(len(conf))
        self.metrics["escalated"].increment(int(esc.sum()))
        self.metrics["degraded"].increment(int(degraded.sum()))
        for c in conf:
            self.confidence_hist.observe(float(c))

    def _error(self, message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
