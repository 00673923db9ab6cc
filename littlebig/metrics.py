"""The cascade's own metrics on Triton's metrics port: the table of families the BLS model exports, and their
counting.

Installed beside the BLS model.py with the rule, control and shadow modules. The families are built through the
``MetricFamily`` class the model passes in (the Python backend's ``pb_utils.MetricFamily``), so this module imports
nothing of Triton's and its table is read outside the server too (the alert rules' tests, the monitor's). Each
metric call is an IPC round trip to the server: counts are summed per execute and zero counts are not sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:  # in the served repository: the generator's copies beside model.py
    from decision import CONFIDENCE_BINS
    from shadow import DROP_REASONS
except ImportError:  # tests and tools
    from littlebig.decision import CONFIDENCE_BINS
    from littlebig.shadow import DROP_REASONS

#: The BLS model's metrics, one row per family: key -> (name, kind, help, label each metric adds: None for one
#: metric, "upper" one per confidence bin, "role" / "stage" one per model of the cascade, "bls_instance" one per BLS
#: instance, "drop" one per reason shadow work was dropped).
METRICS = {
    "rows": ("littlebig_rows_total", "counter", "Rows (images) answered by the cascade", None),
    "escalated": ("littlebig_escalated_rows_total", "counter", "Rows sent to the big (last) model", None),
    "stage_rows": (
        "littlebig_stage_rows_total", "counter", "Rows answered by each stage of the cascade (little ... big)", "stage"
    ),
    "degraded": (
        "littlebig_degraded_rows_total", "counter", "Escalated rows answered by little because big failed", None
    ),
    "failed": (
        "littlebig_failed_requests_total", "counter",
        "Requests answered with an error (Triton counts them as successes)", None,
    ),
    "cancelled": (
        "littlebig_cancelled_requests_total", "counter",
        "Requests their client cancelled before a later stage was called for them (none of their rows went on)", None,
    ),
    "load": (
        "littlebig_load_rows_total", "counter",
        "Rows answered by little because the governor lowered T under load (REASON load)", None,
    ),
    "deadline": (
        "littlebig_deadline_rows_total", "counter",
        "Rows answered by little because big could not answer within the request's deadline_ms", None,
    ),
    "calibration_escalations": (
        "littlebig_calibration_escalations_total", "counter",
        "Rows whose confidence is below the calibrated T, whatever T was in force (the drift signal)", None,
    ),
    "confidence": (
        "littlebig_little_confidence_rows_total", "counter",
        "Rows by little's top softmax probability, per bin (lower, upper]; bins sum to rows_total", "upper",
    ),
    "confident": (
        "littlebig_confident_rows_total", "counter",
        "Rows answered before big because the stage was confident (REASON confident): what shadow sampling draws from",
        None,
    ),
    "shadow_rows": (
        "littlebig_shadow_rows_total", "counter",
        "Confident rows also answered by big in the shadow (after their response), per little confidence bin",
        "upper",
    ),
    "shadow_disagreements": (
        "littlebig_shadow_disagreements_total", "counter",
        "Shadow rows whose big answer differs from the served one, per little confidence bin", "upper",
    ),
    "shadow_dropped": (
        "littlebig_shadow_dropped_rows_total", "counter",
        "Confident rows drawn for the shadow whose big call was not made (load, breaker, deadline, busy) or failed",
        "drop",
    ),
    "shadow_rate": ("littlebig_shadow_rate", "gauge", "Share of rows drawn for shadow sampling (R)", None),
    "calibrated_eps": (
        "littlebig_calibrated_eps", "gauge", "Accuracy-loss budget eps of the calibration (the loss alert's)", None
    ),
    "threshold": ("littlebig_threshold", "gauge", "T in force for rows without their own threshold", "bls_instance"),
    # The accuracy guard's (registered only with ``guard`` on)
    "guard_threshold": (
        "littlebig_guard_threshold", "gauge", "The accuracy guard's T (the calibrated T until its test fires)",
        "bls_instance",
    ),
    "guard_log_evalue": (
        "littlebig_guard_log_evalue", "gauge",
        "Log wealth of the guard's test of disagreement with big > eps at its T; it fires at log(1/alpha)",
        "bls_instance",
    ),
    "guard_binding": (
        "littlebig_guard_binding", "gauge",
        "1 while the guard's raised T is in force (it wins over the governor's), 0 while the governor's is",
        "bls_instance",
    ),
    "guard_cannot_meet": (
        "littlebig_guard_cannot_meet_eps", "gauge",
        "1 while no T short of sending every row to big is shown within the guard's eps", "bls_instance",
    ),
    "guard_eps": ("littlebig_guard_eps", "gauge", "The accuracy guard's disagreement budget", None),
    "guard_firings": ("littlebig_guard_firings_total", "counter", "Times the guard's test fired and raised T", None),
    "guard_lowerings": (
        "littlebig_guard_lowerings_total", "counter", "Times the guard lowered T on evidence within eps", None
    ),
    "guard_rows": ("littlebig_guard_rows_total", "counter", "Drawn rows the guard's tests have observed", None),
    "calibrated_escalation_rate": (
        "littlebig_calibrated_escalation_rate", "gauge",
        "Val escalation rate at the calibrated T (drift alerts' reference)", None,
    ),
    "calibration_rows": ("littlebig_calibration_rows", "gauge", "Val rows the calibration was measured on", None),
    "calibrated_confidence_share": (
        "littlebig_calibrated_confidence_share", "gauge", "Val share of each confidence bin (drift alerts' reference)",
        "upper",
    ),
    # Not traffic: a defect detector (probes' calls count too). CPU memory is asked for; make gpu-check asserts
    # this stays 0, which it cannot see from the answers (they are copied when torch is there).
    "gpu_outputs": (
        "littlebig_gpu_memory_outputs_total", "counter",
        "BLS outputs of little/big that arrived in GPU memory although CPU memory was asked for", "role",
    ),
}


class Metrics:
    """One BLS instance's metrics by key: ``metrics["rows"]`` is the family's metrics, one per label value.

    ``family``: the backend's ``MetricFamily`` class (its ``COUNTER``/``GAUGE`` kinds and ``Metric``); ``labels``:
    the labels every metric carries (model and version); ``stages``: the cascade's models, cheapest first;
    ``guard``: whether the accuracy guard's families are registered.
    """

    def __init__(self, family: Any, labels: dict[str, str], stages: list[str], instance: str, guard: bool) -> None:
        per_label = {
            None: [{}],
            "upper": [{"upper": repr(edge)} for edge in CONFIDENCE_BINS],
            "role": [{"role": role} for role in stages],
            "stage": [{"stage": role} for role in stages],
            # one T gauge per instance: each BLS instance (a process) governs its own T
            "bls_instance": [{"bls_instance": instance}],
            "drop": [{"reason": reason} for reason in DROP_REASONS],
        }
        kinds = {"counter": family.COUNTER, "gauge": family.GAUGE}
        wanted = {k: v for k, v in METRICS.items() if guard or not k.startswith("guard_")}
        # Keep the families referenced: a metric whose family is collected stops updating.
        self.families = {key: family(name, text, kinds[kind]) for key, (name, kind, text, _) in wanted.items()}
        self.metrics = {
            key: [self.families[key].Metric(labels={**labels, **extra}) for extra in per_label[per]]
            for key, (_, _, _, per) in wanted.items()
        }

    def __getitem__(self, key: str) -> list[Any]:
        return self.metrics[key]

    def set(self, key: str, *values: float) -> None:
        """Set the gauge ``key``: one value, or one per label value (each confidence bin's share)."""
        metrics = self.metrics[key]
        if len(values) != len(metrics):
            raise ValueError(f"{METRICS[key][0]}: {len(values)} values for its {len(metrics)} metrics")
        for metric, value in zip(metrics, values):
            metric.set(float(value))

    def count(self, counts: dict[str, int]) -> None:
        """Add each count to its single-metric counter (key -> rows or requests)."""
        for key, count in counts.items():
            if count:
                self.metrics[key][0].increment(int(count))

    def count_each(self, key: str, counts: Iterable[int]) -> None:
        """Add one count per label value of ``key`` (per confidence bin, per stage)."""
        for metric, count in zip(self.metrics[key], counts, strict=True):
            if count:
                metric.increment(int(count))
