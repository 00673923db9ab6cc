"""littlebig.metrics_text, the one reader of Triton's metrics port: on the format's corners and on real text."""

from __future__ import annotations

import math
import urllib.request

import pytest

from littlebig.metrics_text import Metrics, Sample
from tests.helpers import infer

TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="big",version="1"} 12
nv_inference_request_success{model="littlebig",version="1"} 7
# TYPE littlebig_threshold gauge
littlebig_threshold{model="littlebig",version="1",bls_instance="littlebig_0_1"} 0.99
# TYPE littlebig_x histogram
littlebig_x_bucket{le="+Inf",note="a \\"quoted\\" \\\\ value, with {braces}"} 3 1700000000000
littlebig_x_sum NaN
littlebig_up 1.5e+03
"""


def test_samples_labels_values_and_types():
    m = Metrics.parse(TEXT)
    assert m.samples[0] == Sample("nv_inference_request_success", {"model": "big", "version": "1"}, 12.0)
    assert m.types == {
        "nv_inference_request_success": "counter",
        "littlebig_threshold": "gauge",
        "littlebig_x": "histogram",
    }
    bucket = m.samples[3]
    assert bucket.labels == {"le": "+Inf", "note": 'a "quoted" \\ value, with {braces}'} and bucket.value == 3.0
    assert math.isnan(m.samples[4].value) and m.samples[5] == Sample("littlebig_up", {}, 1500.0)
    assert m.total("nv_inference_request_success") == 19 and m.total("nv_inference_request_success", model="big") == 12
    assert m.by("littlebig_threshold", "bls_instance") == {"littlebig_0_1": 0.99}
    assert "littlebig_up" in m and "littlebig_down" not in m and m.total("littlebig_down") == 0
    assert m.series("littlebig_threshold", kind="gauge") == {
        ("littlebig_threshold", (("bls_instance", "littlebig_0_1"), ("model", "littlebig"), ("version", "1"))): 0.99
    }


@pytest.mark.parametrize("line", ["littlebig_rows_total{model=big} 1", "littlebig rows 1", "littlebig_rows_total"])
def test_a_malformed_line_is_an_error_not_a_silent_skip(line):
    with pytest.raises(ValueError):
        Metrics.parse(line)


def test_the_real_metrics_port(server, grpc_client, test_split):
    """Every sample line Triton 2.51 writes is read, to the value its last field holds, and the families the
    project reads are there with their types."""
    data, _ = test_split
    infer(grpc_client, data.images[:3], 1.0)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    m = Metrics.parse(text)
    assert len(m.samples) == len(lines) > 20
    assert [s.value for s in m.samples] == [float(ln.split()[-1]) for ln in lines]
    assert [s.name for s in m.samples] == [ln.split("{")[0].split()[0] for ln in lines]
    assert m.types["littlebig_rows_total"] == "counter" and m.types["littlebig_threshold"] == "gauge"
    assert m.total("nv_inference_request_success", model="big") >= 1  # the request above went to big
    assert set(m.by("littlebig_little_confidence_rows_total", "upper")) >= {"0.2", "1.0"}
