"""Minimal Prometheus text exposition (format 0.0.4): counters, gauges and histograms.

Written here rather than pulled in from ``prometheus_client``: the service needs a handful of
series, updated from one event-loop thread, and the text format is a few lines of code.
"""
from __future__ import annotations

import bisect
import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fmt(v) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names, values, extra=None) -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name, help, labelnames=()):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def header(self):
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self.values = {}

    def inc(self, *labels, amount=1):
        self.values[labels] = self.values.get(labels, 0) + amount

    def get(self, *labels):
        return self.values.get(labels, 0)

    def expose(self):
        out = self.header()
        items = sorted(self.values.items()) if self.labelnames else [((), self.values.get((), 0))]
        for labels, v in items:
            out.append(f"{self.name}{_labels(self.labelnames, labels)} {_fmt(v)}")
        return out


class Gauge(_Metric):
    """A gauge whose value is read from a callable at exposition time."""

    kind = "gauge"

    def __init__(self, name, help, fn, kind="gauge"):
        super().__init__(name, help)
        self.fn = fn
        self.kind = kind  # "counter" for a monotonic value kept elsewhere

    def expose(self):
        return self.header() + [f"{self.name} {_fmt(self.fn())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets):
        super().__init__(name, help)
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v, n=1):
        self.counts[bisect.bisect_left(self.bounds, v)] += n
        self.sum += v * n
        self.count += n

    def quantile(self, q):
        """Upper bucket bound holding quantile q (an estimate, for logs)."""
        if not self.count:
            return float("nan")
        target = q * self.count
        acc = 0
        for b, c in zip(self.bounds + [math.inf], self.counts):
            acc += c
            if acc >= target:
                return b
        return math.inf

    def expose(self):
        out = self.header()
        acc = 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {acc}')
        acc += self.counts[-1]
        out.append(f'{self.name}_bucket{{le="+Inf"}} {acc}')
        out.append(f"{self.name}_sum {_fmt(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class Registry:
    def __init__(self):
        self.metrics = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def expose(self) -> str:
        lines = []
        for m in self.metrics:
            lines.extend(m.expose())
        return "\n".join(lines) + "\n"
