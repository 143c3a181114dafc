"""Prometheus metrics of one server: its requests, tokens, provenance and the engine's running batch.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (never the process-wide default), so
several servers in one process (tests, a host embedding two models) keep separate counts. The engine's
state (rows running and queued, batch size, totals) is read from ``ProxyAligner.status()`` when
``/metrics`` is scraped, so it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxyalign.engine.results import Generation, Source

__all__ = ["OUTCOMES", "ServerMetrics"]

#: How a generation request ended (the ``outcome`` label of ``proxyalign_requests_total``).
OUTCOMES = ("success", "invalid", "rejected", "unavailable", "disconnected", "failed")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class EngineCollector(Collector):
    """The aligner's ``status()`` as gauges and counters, read at scrape time."""

    def __init__(self, aligner: Any) -> None:
        self.aligner = aligner

    def collect(self) -> Iterator[Metric]:
        status = self.aligner.status()
        totals = status.get("totals", {})
        gauges = {
            "proxyalign_running_rows": ("rows in the running batch (decoding or prefilling)", "running"),
            "proxyalign_queued_rows": ("rows waiting for a place in the running batch", "waiting"),
            "proxyalign_batch_size": ("rows decoding in the running batch", "decoding"),
            "proxyalign_prefilling_rows": ("rows whose prompts are being prefilled", "prefilling"),
            "proxyalign_reserved_cache_tokens": (
                "cache positions reserved by admitted rows",
                "reserved_tokens",
            ),
            "proxyalign_max_rows": ("the running batch's row limit", "max_rows"),
            "proxyalign_max_cached_tokens": ("the running batch's cache limit", "max_cached_tokens"),
        }
        for name, (documentation, key) in gauges.items():
            yield GaugeMetricFamily(name, documentation, value=float(status.get(key, 0)))
        rows = CounterMetricFamily(
            "proxyalign_engine_rows", "rows the engine ended, by how they ended", labels=["state"]
        )
        for state in ("finished", "aborted", "failed"):
            rows.add_metric([state], float(totals.get(state, 0)))
        yield rows
        yield CounterMetricFamily(
            "proxyalign_engine_steps",
            "decoding steps of the running batch",
            value=float(totals.get("steps", 0)),
        )
        drafts, rejected = totals.get("drafts", 0), totals.get("rejected_drafts", 0)
        yield GaugeMetricFamily(
            "proxyalign_engine_rejection_rate",
            "fraction of p's drafts the criteria rejected, over every finished row",
            value=rejected / drafts if drafts else 0.0,
        )


class ServerMetrics:
    """Every metric of one server, registered in a registry of its own."""

    def __init__(self, aligner: Any) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "proxyalign_requests",
            "generation requests, by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.http = Counter(
            "proxyalign_http_responses",
            "HTTP responses by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.in_progress = Gauge(
            "proxyalign_requests_in_progress", "generation requests being answered", registry=registry
        )
        self.prompt_tokens = Counter(
            "proxyalign_prompt_tokens", "prompt tokens of answered requests", registry=registry
        )
        self.completion_tokens = Counter(
            "proxyalign_completion_tokens", "tokens generated for answered requests", registry=registry
        )
        self.tokens_by_source = Counter(
            "proxyalign_generated_tokens",
            "generated tokens by the model (distribution) that produced them",
            ["source"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "proxyalign_tool_calls", "tool calls parsed from the answers' text", registry=registry
        )
        self.tool_call_errors = Counter(
            "proxyalign_tool_call_errors",
            "call-like blocks that were malformed and stayed in the content",
            registry=registry,
        )
        self.drafts = Counter("proxyalign_drafts", "p's drafts checked by a criterion", registry=registry)
        self.rejected_drafts = Counter(
            "proxyalign_rejected_drafts", "p's drafts the criterion rejected", registry=registry
        )
        self.rejection_rate = Histogram(
            "proxyalign_rejection_rate",
            "per choice: fraction of p's drafts the criterion rejected",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=registry,
        )
        self.auto_steps = Counter(
            "proxyalign_auto_steps",
            'mode="auto": decoding steps of answered choices, by what was chosen ("token", "gamma 4", ...)',
            ["choice"],
            registry=registry,
        )
        self.latency = Histogram(
            "proxyalign_request_latency_seconds",
            "from request arrival to its last token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "proxyalign_time_to_first_token_seconds",
            "from request arrival to its first generated token",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        registry.register(EngineCollector(aligner))
        for source in Source:  # every series exists from the start, at zero
            self.tokens_by_source.labels(str(source))

    def record_generation(self, generation: Generation) -> None:
        """Tokens, provenance, tool calls and rejection rate of one finished choice."""
        stats = generation.stats
        self.completion_tokens.inc(stats.new_tokens)
        for source in Source:
            count = sum(1 for s in generation.sources if s == source)
            if count:
                self.tokens_by_source.labels(str(source)).inc(count)
        self.tool_calls.inc(len(generation.tool_calls))
        self.tool_call_errors.inc(len(generation.tool_call_errors))
        self.drafts.inc(stats.drafts)
        self.rejected_drafts.inc(stats.rejected_drafts)
        if stats.rejection_rate is not None:
            self.rejection_rate.observe(stats.rejection_rate)
        for choice, steps in stats.choices.items():
            self.auto_steps.labels(choice).inc(steps)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
