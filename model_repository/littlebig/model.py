"""Triton Python-backend BLS model: the Little-Big cascade.

Per ``execute``: little runs once on the rows of every request (concatenated), the shared decision
rule (``decision.py``, installed beside this file) picks the rows whose confidence is below T, and
only those go to big, in chunks no larger than big's max_batch_size, all in flight at once
(``async_exec``). A cascade of K > 2 models runs the same step once per stage, in one loop: stage k sees
only the rows every earlier stage escalated. What the stages' answers make of each row is ``CascadeRows``
(decision.py, numpy only); this file makes the calls. Answers merge back in each request's order. A request whose
parameters are bad (``request_settings``), or whose rows hit a failing model, gets its own error; the other
requests are answered.

Timeouts never abandon work silently (RELIABILITY.md, "Stalls"):
- each call carries ``bls_timeout_ms`` as its request timeout, and little and big have a queue
  policy that honours it (``allow_timeout_override``), so work whose caller gave up is rejected by
  Triton's scheduler instead of being run;
- a call that is still executing when the timeout passes is *not* cancelled (2.51's ``async_exec``
  runs a blocking ``Exec`` on an executor thread, which a cancel cannot stop): its rows are answered
  by the failure policy, and a circuit breaker (``Breaker``) sends the model nothing new until it
  answers, then sheds big's rows while big stays slower than the timeout, probing once a second.
  One stalled model thus costs one in-flight call per BLS instance, not a growing pile of blocked
  threads and queued executes, and no request waits on a big known to be slow.

Under load (``slo_p99_ms``), the ``Governor`` lowers T in steps when this instance's predicted p99 (twice
its slowest recent execute, or twice the age of a big call in flight) passes the SLO, never below T_min (the
accuracy budget set at calibration), and raises it back after 3 s under 0.6 x the SLO (quiet time counts);
a request's own ``threshold`` wins. A request's ``deadline_ms`` answers with little those escalated rows that big
cannot answer in the time left. ``REASON`` says, per row, who answered and why.

Shadow sampling (``shadow_rate`` R > 0; littlebig/shadow.py): each traffic row is drawn with probability
R; drawn rows answered confidently before big also go to big once the responses are built, in calls that are never
awaited (``_shadow``; ``ShadowTraffic`` counts big's disagreement per confidence bin and records the row when the
call ends), so no answer waits for one. Shadow work is dropped first, and counted: under the governor's load levels,
while big's breaker is open, for rows whose deadline is near, beyond ``SHADOW_MAX_CALLS`` calls in flight. Every
drawn row is recorded (big's answer, or unknown), so the records are a uniform R-draw of traffic.

Its metrics (``metrics.py``: the families' table and their counting) are summed per execute: each metric call is an
IPC round trip to the server.

At load it imports numpy, triton_python_backend_utils and the littlebig modules installed beside it (decision,
control, metrics, shadow) only, so it runs on a stock NGC image; onnxruntime is imported only with
``little_in_process`` (cpu profile), and torch only to copy an output that arrives in GPU memory (counted; never
expected).
"""

import asyncio
import json
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils
from control import Breaker, Governor, Guard, read_parameters, request_settings
from decision import (
    BIG_FAILED,
    CONFIDENT,
    DEADLINE,
    LOAD,
    CascadeRows,
    check_threshold,
    confidence,
    confidence_bin_counts,
    stage_names,
)
from decision import REASONS as REASON_NAMES
from metrics import Metrics
from shadow import RecordWriter, Sampler, Seen, ShadowTraffic

#: The 2.51 Python backend builds zero-byte tensors from numpy>=2 arrays (seen on a GPU server: every BLS call
#: failed with an input byte size mismatch).
NUMPY_MAJOR_SUPPORTED = 1
#: REASON per row, indexed by its code: who answered, and why little answered a row it was unsure of.
REASONS = np.array([r.encode() for r in REASON_NAMES], dtype=np.object_)
#: The guard saves its state on every change of T and after this many observed rows in between.
GUARD_SAVE_ROWS = 200
#: Shadow calls one BLS instance keeps in flight at most; a draw beyond them is dropped (``busy``), so shadow work
#: never piles up in front of big.
SHADOW_MAX_CALLS = 4



def as_numpy(tensor, on_gpu=None) -> np.ndarray:
    """A BLS output as a host array. CPU memory is asked for (``preferred_memory``); a tensor that still
    arrives in GPU memory calls ``on_gpu()`` first (counted: gpu-check asserts none arrive), then is copied
    through torch's DLPack if torch is there. RuntimeError when the output is missing or cannot be copied:
    the caller turns it into a failure of that chunk alone."""
    if tensor is None:
        raise RuntimeError("the response has no LOGITS output")
    if tensor.is_cpu():
        return tensor.as_numpy()
    if on_gpu is not None:
        on_gpu()
    try:  # python_backend's documented DLPack route; torch is on GPU images that serve GPU tensors
        from torch.utils.dlpack import from_dlpack
    except ImportError as exc:
        raise RuntimeError(f"output {tensor.name()} is in GPU memory and torch is not installed to copy it") from exc
    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


class Rows(NamedTuple):
    """Per-row request settings of one execute: own threshold (NaN: the governor's T), deadline (monotonic s)
    and whether the row is a health probe's (kept out of the traffic metrics)."""

    own: np.ndarray
    deadline: np.ndarray
    probe: np.ndarray


class TritonPythonModel:
    def initialize(self, args):
        if int(np.__version__.split(".")[0]) > NUMPY_MAJOR_SUPPORTED:
            raise pb_utils.TritonModelException(
                f"littlebig needs numpy<2 in the Python backend's environment, found {np.__version__}: Triton "
                "2.51's Python backend turns numpy 2 arrays into zero-byte tensors (every BLS call would fail). "
                "Install 'numpy<2' where the stub runs (or point EXECUTION_ENV_PATH at an environment that has it)."
            )
        config = json.loads(args["model_config"])
        texts = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        try:
            params = read_parameters(texts)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"littlebig's config.pbtxt: {exc}") from None
        # The stages, cheapest first (little, [middle...,] big) and T_1..T_{K-1}, calibrated jointly; the governor
        # moves the last one (the T in front of big), so ``self.threshold`` is that one.
        models = params["stage_models"]
        self.models = dict(zip(stage_names(len(models)), models))
        self.max_batch = dict(zip(self.models, (int(b) for b in params["stage_max_batch_sizes"])))
        self.thresholds = [check_threshold(t) for t in params["thresholds"]]
        if len(self.thresholds) != len(models) - 1:
            raise pb_utils.TritonModelException(f"{len(models)} stages need {len(models) - 1} thresholds")
        self.threshold = self.thresholds[-1]
        levels = [check_threshold(t) for t in params["governor_thresholds"]]
        self.governor = Governor(levels or [self.threshold], params["slo_p99_ms"] / 1000)
        self.timeout_us = int(params["bls_timeout_ms"] * 1000)
        self.fall_back_to_little = params["on_big_failure"] == "little"
        self.classes = next(o["dims"][0] for o in config["output"] if o["name"] == "PROBS")
        self.cpu_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self.little_session = None  # little_in_process (cpu profile): little's ONNX beside this file
        if params["little_in_process"]:
            import onnxruntime as ort  # only here: the default BLS model needs no onnxruntime

            options = ort.SessionOptions()
            options.intra_op_num_threads = params["intra_op_threads"]
            options.inter_op_num_threads = params["inter_op_threads"]
            path = f"{args['model_repository']}/{args['model_version']}/little.onnx"
            self.little_session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
            # Warm-up, as Triton's model_warmup does for little and big: the first request pays no arena growth.
            image = next(i for i in config["input"] if i["name"] == "IMAGE")
            for rows in sorted({1, int(config["max_batch_size"])}):
                zeros = np.zeros((rows, *map(int, image["dims"])), dtype=np.uint8)
                self.little_session.run(["LOGITS"], {"IMAGE": zeros})
        # little must answer (no shedding); a later stage's rows are shed to the failure policy while it is slow.
        self.breakers = {role: Breaker(role, self.timeout_us / 1e6, shed=role != "little") for role in self.models}
        # Each in-flight call holds one executor thread: room for one execute's chunks twice over
        # (the current ones and, at most, one overdue set), sized once instead of asyncio's default.
        chunks = sum(-(-int(config["max_batch_size"]) // b) for b in self.max_batch.values())
        self.executor = ThreadPoolExecutor(
            max_workers=2 * chunks + 2 + SHADOW_MAX_CALLS, thread_name_prefix="littlebig-bls"
        )
        # Shadow sampling: a seeded draw per row; records beside the repository (``logs/``) unless told.
        instance = args.get("model_instance_name", "")
        self.sampler = Sampler(params["shadow_rate"], params["shadow_seed"], instance)
        self.records = None
        if self.sampler.rate > 0:
            root = os.path.dirname(os.path.dirname(os.path.abspath(args["model_repository"])))
            directory = params["shadow_log_dir"] or os.path.join(root, "logs")
            try:
                self.records = RecordWriter(directory, instance)
            except OSError as exc:
                raise pb_utils.TritonModelException(
                    f"littlebig: cannot write shadow records in {directory} ({exc}): give a writable "
                    "--shadow-log-dir, or serve with --shadow-rate 0"
                ) from exc
        self.guard, self.guard_path, self.guard_unsaved = None, None, 0
        if params["guard"]:
            if self.records is None:
                raise pb_utils.TritonModelException("littlebig: the accuracy guard needs shadow_rate > 0")
            self.guard = Guard(self.threshold, params["guard_eps"], params["guard_alpha"])
            # Its T and evidence survive a restart: the state is saved beside the instance's shadow records.
            self.guard_path = os.path.join(os.path.dirname(self.records.path), f"guard-{instance or '0'}.json")
            if self.guard.load(self.guard_path):
                pb_utils.Logger.log_info(f"littlebig: accuracy guard resumed at T {self.guard.threshold:.6g}")
        self.executor_installed = False
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.metrics = Metrics(pb_utils.MetricFamily, labels, list(self.models), instance, self.guard is not None)
        self.gpu_output_logged = False
        self.metrics.set("calibrated_confidence_share", *params["calibrated_confidence_shares"])
        self.metrics.set("calibrated_escalation_rate", params["calibrated_escalation_rate"])
        self.metrics.set("calibration_rows", params["calibration_rows"])
        self.metrics.set("shadow_rate", self.sampler.rate)
        if self.guard is not None:
            self.metrics.set("guard_eps", self.guard.eps)
        self._show_threshold()
        self.metrics.set("calibrated_eps", params["calibrated_eps"])
        self.shadow = None if self.records is None else ShadowTraffic(
            self.records, self.metrics, lambda images: self._call("big", images),
            lambda response: self._logits("big", response), self.max_batch["big"], SHADOW_MAX_CALLS,
        )  # fmt: skip

    def finalize(self):
        """Unload: stop the executor's threads (a call still running past its timeout is not waited for)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.records is not None:
            self.records.close()

    def _on_gpu(self, role):
        """Count an output of ``role`` that arrived in GPU memory, and say so in the log once."""
        self.metrics["gpu_outputs"][list(self.models).index(role)].increment(1)
        if not self.gpu_output_logged:
            self.gpu_output_logged = True
            pb_utils.Logger.log_warn(
                f"littlebig: {role}'s LOGITS arrived in GPU memory although CPU memory was asked for "
                "(preferred_memory); counted in littlebig_gpu_memory_outputs_total"
            )

    def _call(self, role, images):
        """One BLS call of ``role`` on ``images`` (a future)."""
        return pb_utils.InferenceRequest(
            model_name=self.models[role],
            requested_output_names=["LOGITS"],
            inputs=[pb_utils.Tensor("IMAGE", images)],
            timeout=self.timeout_us,  # honoured by the queue policy: expired work is rejected, not run
            preferred_memory=self.cpu_memory,  # GPU backends' outputs come back in host memory
        ).async_exec()

    def _send(self, role, images, spans):
        """One BLS call per span; each call's latency is recorded when it finishes, however late."""
        sent = time.monotonic()
        breaker = self.breakers[role]
        calls = [self._call(role, images[a:b]) for a, b in spans]
        for call in calls:
            breaker.sent(call, sent)
            call.add_done_callback(breaker.finished)
        return calls

    async def _run(self, role, images):
        """``role`` on every row, chunked to its max_batch_size, all chunks in flight together.

        Returns [(start, stop, logits or None, error message or None)] covering every row.
        """
        if role == "little" and self.little_session is not None:  # in process: no BLS hop, no chunking
            try:
                return [(0, len(images), self.little_session.run(["LOGITS"], {"IMAGE": images})[0], None)]
            except Exception as exc:
                return [(0, len(images), None, f"little failed: onnxruntime in the BLS model: {exc}")]
        max_batch = self.max_batch[role]
        spans = [(a, min(a + max_batch, len(images))) for a in range(0, len(images), max_batch)]
        breaker = self.breakers[role]
        refused = breaker.refusal(time.monotonic())
        if refused:
            if breaker.probe_due(time.monotonic()):  # fire and forget: its latency decides when to resume
                breaker.track(self._send(role, images, spans))
            return [(a, b, None, refused) for a, b in spans]
        calls = self._send(role, images, spans)
        await asyncio.wait(calls, timeout=self.timeout_us / 1e6)  # never cancels: see the module docstring
        chunks = []
        for (a, b), call in zip(spans, calls):
            if not call.done():
                chunks.append((a, b, None, f"{role} timed out after {self.timeout_us / 1000:.0f} ms"))
            elif call.exception() is not None:
                chunks.append((a, b, None, f"{role} failed: {call.exception()}"))
            else:
                # A chunk whose LOGITS cannot be read (missing, or in GPU memory with no torch to copy it) fails
                # alone, through the failure policy, like any other failure of that call.
                try:
                    chunks.append((a, b, self._logits(role, call.result()), None))
                except Exception as exc:
                    chunks.append((a, b, None, f"{role} failed: {exc}"))
        breaker.track([c for c in calls if not c.done()])
        return chunks

    def _logits(self, role, response):
        """A finished call's LOGITS as a host array; RuntimeError says why there are none."""
        if response.has_error():
            raise RuntimeError(response.error().message())
        try:
            tensor = pb_utils.get_output_tensor_by_name(response, "LOGITS")
            return as_numpy(tensor, lambda: self._on_gpu(role))
        except Exception as exc:
            raise RuntimeError(f"its LOGITS could not be read: {exc}") from exc

    async def execute(self, requests):
        if not self.executor_installed:  # the stub's event loop exists only once execute runs
            asyncio.get_running_loop().set_default_executor(self.executor)
            self.executor_installed = True
        responses = [None] * len(requests)
        settings = [request_settings(r.parameters()) for r in requests]
        try:
            await self._execute(requests, responses, settings)
        except Exception as exc:  # a bug must cost its requests an answer, never the whole batch INTERNAL
            pb_utils.Logger.log_error(f"littlebig: unexpected error in execute:\n{traceback.format_exc()}")
            message = f"littlebig internal error ({type(exc).__name__}: {exc}); see the server log"
            responses = [self._error(message, pb_utils.TritonError.INTERNAL) if r is None else r for r in responses]
        failed = sum(1 for r, s in zip(responses, settings) if r.has_error() and not s.probe)
        self.metrics.count({"failed": failed})
        return responses

    async def _execute(self, requests, responses, settings):
        """Answer the requests whose parameters are bad at once (``settings``: each request's), then run the cascade
        on the rows of the others."""
        received = time.monotonic()  # deadlines count from here: Triton's queue time is not visible to the model
        signal = self.governor.predicted_p99_s(received, self.breakers["big"].in_flight_s(received))
        if self.governor.update(signal, received):
            self._show_threshold()
        images, own, deadlines, probe_rows, spans = [], [], [], [], {}
        start = 0
        for i, (request, setting) in enumerate(zip(requests, settings)):
            if setting.error is not None:
                responses[i] = self._error(setting.error, pb_utils.TritonError.INVALID_ARG)
                continue
            rows = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            images.append(rows)
            own.append(np.full(len(rows), np.nan if setting.own is None else setting.own))
            deadlines.append(np.full(len(rows), received + setting.deadline_s))
            probe_rows.append(np.full(len(rows), setting.probe))
            spans[i] = slice(start, start + len(rows))
            start += len(rows)
        if spans:
            rows = Rows(np.concatenate(own), np.concatenate(deadlines), np.concatenate(probe_rows))
            await self._cascade(np.concatenate(images), rows, spans, responses, requests)
        done = time.monotonic()
        self.governor.executed(done - received, done)

    async def _cascade(self, images, rows, spans, responses, requests):
        """Fill ``responses`` for the requests in ``spans`` (request -> its contiguous rows).

        One loop over the stages (``CascadeRows``): stage k runs only on the rows every earlier stage escalated (the
        shared rule at T_k, less the rows whose deadline is too near), chunked to its own max_batch_size; each row
        keeps the probabilities of the last stage that answered it. The governor moves only the last T; a request's
        own threshold is used for every T. Before each later stage, the requests whose rows would go on are asked
        whether their client cancelled (``is_cancelled``, one call per such request): a cancelled request's rows go
        no further.
        """
        cancelled: set[int] = set()
        owner = np.repeat(list(spans), [s.stop - s.start for s in spans.values()])  # row -> request
        messages = {}  # request index -> error message
        roles = list(self.models)
        state = CascadeRows(len(images), self.classes, len(roles))
        for failed, err in state.merge(0, state.active, await self._run("little", images), fall_back=False):
            messages.update(dict.fromkeys(np.unique(owner[failed]).tolist(), err))
        conf = confidence(state.probs)  # little's, every row: the drift histogram
        held = state.probs  # each row's probabilities before big ran (the shadow records' "answer")
        for k, role in enumerate(roles[1:], start=1):
            now = time.monotonic()
            calibrated = self.thresholds[k - 1]
            going = state.route(
                k, rows.own, self._in_force() if k == state.last else calibrated, calibrated, rows.deadline - now,
                self.breakers[role].predicted_latency_s(now),
            )  # fmt: skip
            gone = [i for i in np.unique(owner[going]).tolist() if requests[i].is_cancelled()]
            if gone:
                cancelled.update(gone)
                going = going[~np.isin(owner[going], gone)]
            if k == state.last and self.shadow is not None:  # shadow sampling on: keep the answers before big
                held = state.probs.copy()
            chunks = await self._run(role, images[going]) if len(going) else []
            for failed, err in state.merge(k, going, chunks, self.fall_back_to_little):
                messages.update(dict.fromkeys(np.unique(owner[failed]).tolist(), err))
        labels = state.finish().reshape(-1, 1)
        probs, stage, reason, sent_to_big = state.probs, state.stage, state.reason, state.escalated
        stage_names_out = np.array([r.encode() for r in roles], dtype=np.object_)[stage]
        served = np.ones(len(images), dtype=bool)
        for i, s in spans.items():
            if i in cancelled:
                responses[i] = self._error("cancelled by the client", pb_utils.TritonError.CANCELLED)
                served[s] = False
                continue
            if i in messages:
                responses[i] = self._error(messages[i], pb_utils.TritonError.UNAVAILABLE)
                served[s] = False
                continue
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("LABEL", labels[s]),
                    pb_utils.Tensor("PROBS", probs[s]),
                    pb_utils.Tensor("ESCALATED", sent_to_big[s].reshape(-1, 1)),
                    pb_utils.Tensor("DEGRADED", state.degraded[s].reshape(-1, 1)),
                    pb_utils.Tensor("REASON", REASONS[reason[s]].reshape(-1, 1)),
                    pb_utils.Tensor("STAGE", stage_names_out[s].reshape(-1, 1)),
                ]
            )
        self.metrics.count({"cancelled": len(cancelled)})
        traffic = served & ~rows.probe  # a probe's rows never count as traffic (the drift alerts read these)
        confident = (reason == CONFIDENT) & (stage < state.last)  # answered before big, confidently: shadow candidates
        self._observe(
            conf[traffic], sent_to_big[traffic], reason[traffic], state.below_calibrated[traffic], stage[traffic],
            int((confident & traffic).sum()),
        )
        # Drawn after the responses are built, and never awaited: shadow work cannot delay an answer.
        drawn = self.sampler.select(len(images)) & traffic
        if drawn.any():
            by_big = drawn & sent_to_big & (stage == state.last)  # big answered these anyway: recorded, no call
            self.shadow.record("escalated", held[by_big], labels[by_big, 0])
            unknown = drawn & ~by_big & ~confident  # load, deadline, failure: big's answer is not known
            # The guard's observation of this execute: every drawn row, or none (an unknown one would bias it)
            seen = None
            if self.guard is not None and not unknown.any():
                mismatch = held[by_big].argmax(-1) != labels[by_big, 0]
                seen = Seen(self._guard_observe, [confidence(held[by_big])], [mismatch])
            self._shadow(images, np.flatnonzero(drawn & confident), held, conf, rows.deadline, seen)
            self.shadow.record("unknown", held[unknown], np.full(int(unknown.sum()), -1))

    def _shadow(self, images, rows, held, little_conf, deadlines, seen=None):
        """Send drawn confident ``rows`` to big without waiting (``ShadowTraffic``), or drop them first: under the
        governor's load levels, while big's breaker is open, for rows whose deadline is closer than big's predicted
        latency, and beyond ``SHADOW_MAX_CALLS`` calls in flight (``plan_shadow``)."""
        if not len(rows):
            if seen is not None:
                seen.close()
            return
        now = time.monotonic()
        big = self.breakers["big"]
        self.shadow.start(
            images, rows, held, little_conf, deadlines[rows] - now, big.predicted_latency_s(now),
            self.governor.level > 0, big.refusal(now) is not None, seen,
        )  # fmt: skip

    def _in_force(self):
        """The last T for rows without their own: the guard's once it has raised T (accuracy first), else the
        governor's (the calibrated T, or lower under load)."""
        if self.guard is not None and self.guard.raised:
            return self.guard.threshold
        return self.governor.threshold

    def _show_threshold(self):
        self.metrics.set("threshold", self._in_force())
        if self.guard is not None:
            self.metrics.set("guard_threshold", self.guard.threshold)
            self.metrics.set("guard_log_evalue", self.guard.raise_test.log_wealth)
            self.metrics.set("guard_binding", self.guard.raised)
            self.metrics.set("guard_cannot_meet", self.guard.cannot_meet)

    def _guard_observe(self, conf, mismatch):
        """One execute's drawn rows, all known: test, move T if the guard says so, keep the state durable."""
        firings, lowerings = self.guard.firings, self.guard.lowerings
        changed = self.guard.observe(conf, mismatch)
        self.metrics.count(
            {
                "guard_rows": len(conf),
                "guard_firings": int(self.guard.firings > firings),
                "guard_lowerings": int(self.guard.lowerings > lowerings),
            }
        )
        if changed:  # T, binding and cannot-meet move only with T; the test's wealth moves with every observation
            self._show_threshold()
        else:
            self.metrics.set("guard_log_evalue", self.guard.raise_test.log_wealth)
        self.guard_unsaved += len(conf)
        if changed or self.guard_unsaved >= GUARD_SAVE_ROWS:
            try:
                self.guard.save(self.guard_path)
                self.guard_unsaved = 0
            except OSError as exc:
                pb_utils.Logger.log_warn(f"littlebig: could not save the accuracy guard's state: {exc}")
        if changed:
            pb_utils.Logger.log_info(
                f"littlebig: accuracy guard moved T to {self.guard.threshold:.6g} "
                f"(firings {self.guard.firings}, lowerings {self.guard.lowerings})"
            )

    def _observe(self, conf, esc, reason, below_calibrated, stage, confident):
        """Traffic metrics once per execute (``Metrics`` sends no zero counts)."""
        self.metrics.count(
            {
                "rows": len(conf),
                "confident": confident,
                "escalated": int(esc.sum()),
                "degraded": int((reason == BIG_FAILED).sum()),
                "load": int((reason == LOAD).sum()),
                "deadline": int((reason == DEADLINE).sum()),
                "calibration_escalations": int(below_calibrated.sum()),
            }
        )
        self.metrics.count_each("confidence", confidence_bin_counts(conf))
        self.metrics.count_each("stage_rows", np.bincount(stage, minlength=len(self.models)))

    def _error(self, message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
