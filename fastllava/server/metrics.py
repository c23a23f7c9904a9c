"""Prometheus metrics of the server (``GET /metrics``), on a registry of its own per app.

Server-side counters and histograms are updated by the routes (requests by endpoint and status, rejections by
reason, client disconnects, prompt/generation tokens, time to first token, inter-token latency, end-to-end latency,
media fetch time); the engine's own numbers (queue depth, running requests, cache hits and misses, tokens generated)
are read from ``engine.stats()`` at scrape time. Rates (tokens/s, cache hit rate) are ``rate()`` of the counters.
"""

from __future__ import annotations

import logging
import numbers
import re
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("fastllava.server")

PREFIX = "fastllava"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# engine.stats() entries (nested dicts flattened with "_") that only grow: exported as counters, the rest as gauges.
_ENGINE_COUNTERS = {"steps", "tokens_generated", "prompt_tokens_computed", "requests_finished", "requests_aborted",
                    "requests_failed", "preemptions", "prefix_cache_hits", "prefix_cache_misses",
                    "prefix_cache_hit_tokens", "prefix_cache_queried_tokens", "prefix_cache_evictions",
                    "image_cache_hits", "image_cache_misses"}


def _flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in stats.items():
        name = prefix + re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "_"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _ratio(hits: float | None, total: float | None) -> float | None:
    return None if hits is None or not total else hits / total


class _EngineCollector:
    """Exports the numbers of ``engine.stats()`` (queue depth, running, KV bytes, cache hits...) at scrape time,
    plus the cache hit rates derived from them."""

    def __init__(self, get_engine: Callable[[], Any]):
        self._get_engine = get_engine

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        engine = self._get_engine()
        if engine is None or not hasattr(engine, "stats"):
            return
        try:
            stats = engine.stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine is busy or gone
            logger.exception("engine.stats() failed during a metrics scrape")
            return
        flat = _flatten(stats if isinstance(stats, dict) else getattr(stats, "__dict__", {}))
        for name, value in sorted(flat.items()):
            base = name[: -len("_total")] if name.endswith("_total") else name
            if name.endswith("_total") or base in _ENGINE_COUNTERS:
                yield CounterMetricFamily(f"{PREFIX}_engine_{base}", f"engine.stats(): {name}", value=value)
            else:
                yield GaugeMetricFamily(f"{PREFIX}_engine_{name}", f"engine.stats(): {name}", value=value)
        rates = {
            "prefix_cache_hit_rate": _ratio(flat.get("prefix_cache_hit_tokens"),
                                            flat.get("prefix_cache_queried_tokens")),
            "image_cache_hit_rate": _ratio(flat.get("image_cache_hits"),
                                           flat.get("image_cache_hits", 0) + flat.get("image_cache_misses", 0)),
        }
        for name, value in rates.items():
            if value is not None:
                yield GaugeMetricFamily(f"{PREFIX}_engine_{name}", f"since start: {name.replace('_', ' ')}",
                                        value=value)


class ServerMetrics:
    def __init__(self, get_engine: Callable[[], Any] = lambda: None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "Requests refused, by reason (error code)",
                                ["reason"], registry=r)
        self.disconnects = Counter(f"{PREFIX}_client_disconnects",
                                   "Requests whose client went away before the answer was complete", registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed (image tokens included)",
                                     registry=r)
        self.cached_tokens = Counter(f"{PREFIX}_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=r)
        self.images = Counter(f"{PREFIX}_images", "Images received in requests", registry=r)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight",
                               "Requests admitted by the server and not finished (queued + running, n counts n)",
                               registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from request to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between streamed outputs",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Time from request to its last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.media_fetch = Histogram(f"{PREFIX}_media_load_seconds", "Time to fetch and decode a request's images",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(get_engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
