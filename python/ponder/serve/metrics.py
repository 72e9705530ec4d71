"""Prometheus metrics of ``ponder serve`` (``GET /metrics``), on a registry of its own per app.

Counted by the server: ``ponder_requests_total{endpoint,status}``,
``ponder_request_latency_seconds{endpoint}`` (histogram, successful and failed requests),
``ponder_tokens_total{kind}`` (kind: prompt, completion = every policy token generated across
the search tree, prm = tokens the PRM scored), ``ponder_in_flight_requests`` (requests holding
a queue slot). Read from ``engine.stats()`` at every scrape: ``ponder_engine_searches{state}``
(live, queued), ``ponder_engine_preemptions_total``, ``ponder_engine_steps_total``,
``ponder_kv_blocks_in_use{model}`` and ``ponder_kv_blocks_free{model}`` (policy, prm; free
counts free + evictable blocks, from the models' ``kv_free_blocks()``).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector:
    def __init__(self, read: Callable[[], dict]) -> None:
        self.read = read

    def collect(self):
        s = self.read()
        searches = GaugeMetricFamily("ponder_engine_searches", "searches in the engine", labels=["state"])
        searches.add_metric(["live"], float(s.get("live", 0)))
        searches.add_metric(["queued"], float(s.get("queued", 0)))
        yield searches
        yield CounterMetricFamily("ponder_engine_preemptions", "searches preempted for KV memory",
                                  value=float(s.get("preemptions", 0)))
        yield CounterMetricFamily("ponder_engine_steps", "engine steps", value=float(s.get("steps", 0)))
        used = GaugeMetricFamily("ponder_kv_blocks_in_use", "KV blocks held by live sequences", labels=["model"])
        free = GaugeMetricFamily("ponder_kv_blocks_free", "KV blocks free or evictable", labels=["model"])
        for model in ("policy", "prm"):
            if f"{model}_kv_blocks_in_use" in s:
                used.add_metric([model], float(s[f"{model}_kv_blocks_in_use"]))
            if f"{model}_kv_blocks_free" in s:
                free.add_metric([model], float(s[f"{model}_kv_blocks_free"]))
        yield used
        yield free


class Metrics:
    """The server's metrics; ``read_stats`` gives the engine's (and models') numbers."""

    def __init__(self, read_stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ponder_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ponder_request_latency_seconds", "request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("ponder_tokens", "tokens spent", ["kind"], registry=self.registry)
        self.in_flight = Gauge("ponder_in_flight_requests", "requests holding a queue slot", registry=self.registry)
        self.registry.register(_EngineCollector(read_stats))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def add_usage(self, prompt: int, completion: int, prm: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)
        self.tokens.labels("prm").inc(prm)

    def render(self) -> bytes:
        return generate_latest(self.registry)
