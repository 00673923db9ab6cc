"""Triton's metrics port, read: the one Prometheus text-format parser of the project (stdlib only).

Why not ``prometheus_client.parser``: it is not a dependency, and ``make gpu-check`` runs on a GPU machine with
no package registry (stdlib, numpy and littlebig's sources). The tests, the bench and the GPU check all read the
metrics port through this module, so there is one reading of the format (text exposition 0.0.4: ``# HELP`` and
``# TYPE`` lines, ``name{label="value",...} value [timestamp]`` samples, escaped label values).
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_VALUES = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}


@dataclass(frozen=True)
class Sample:
    """One sample line: metric name, its labels and its value."""

    name: str
    labels: dict[str, str]
    value: float


def _labels(text: str) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"bad label set {{{text}}}")
        out[m.group(1)] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return out


@dataclass(frozen=True)
class Metrics:
    """A parsed exposition: every sample in order, and each family's ``# TYPE``."""

    samples: tuple[Sample, ...]
    types: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """Parse the text format; a line that is neither a comment nor a sample raises ValueError."""
        samples, types = [], {}
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) == 4 and parts[1] == "TYPE":
                    types[parts[2]] = parts[3].strip()
                continue
            m = _SAMPLE.match(line)
            if m is None:
                raise ValueError(f"not a Prometheus sample line: {line!r}")
            value = _VALUES.get(m.group(3))
            samples.append(Sample(m.group(1), _labels(m.group(2) or ""), float(m.group(3)) if value is None else value))
        return cls(tuple(samples), types)

    def __contains__(self, name: str) -> bool:
        """Whether any sample of metric ``name`` is exported."""
        return any(s.name == name for s in self.samples)

    def select(self, name: str, **labels: str) -> Iterator[Sample]:
        """The samples of ``name`` whose labels include ``labels``."""
        return (s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` that match ``labels`` (0 when there are none)."""
        return sum(s.value for s in self.select(name, **labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``label``'s value -> the sum of the samples of ``name`` with that value (e.g. per bin), among those that
        match ``labels``."""
        out: dict[str, float] = {}
        for s in self.select(name, **labels):
            if label in s.labels:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
        return out

    def series(self, prefix: str = "", kind: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """(name, sorted labels) -> value for every sample whose name starts with ``prefix`` (of TYPE ``kind``)."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in self.samples
            if s.name.startswith(prefix) and (kind is None or self.types.get(s.name) == kind)
        }


def fetch(url: str, timeout: float = 10.0) -> Metrics:
    """Scrape and parse a metrics endpoint: ``http://host:port/metrics`` (``/metrics`` added when missing)."""
    url = url.rstrip("/")
    if not url.endswith("/metrics"):
        url += "/metrics"
    if "://" not in url:
        url = f"http://{url}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return Metrics.parse(response.read().decode())
