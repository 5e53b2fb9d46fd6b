"""Every Prometheus metric of the service, in one place (names are a contract with the dashboards)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "prune_serve_request_duration_seconds",
            "HTTP request duration",
            ["model", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "prune_serve_queue_wait_seconds",
            "time a window waited in the queue",
            ["model"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.tokenize = Histogram(
            "prune_serve_tokenize_seconds",
            "tokenization time per request",
            ["model"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "prune_serve_inference_seconds",
            "backend time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "prune_serve_batch_size", "windows per batch", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "prune_serve_batch_tokens",
            "padded tokens per batch",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "prune_serve_padding_ratio",
            "padding tokens / all tokens per batch",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("prune_serve_queue_depth", "windows waiting", ["model"], registry=r)
        self.in_flight = Gauge("prune_serve_in_flight_requests", "requests being handled", registry=r)
        self.batch_reruns = Counter(
            "prune_serve_batch_reruns_total",
            "failed batches re-run request by request so that only the culprit fails",
            ["model"],
            registry=r,
        )
        self.errors = Counter("prune_serve_errors_total", "errors by type", ["model", "type"], registry=r)
        self.cpu_worker_restarts = Counter(
            "prune_serve_cpu_worker_restarts_total",
            "tokenization worker processes that died and were started again (PRUNE_SERVE_CPU_POOL=processes)",
            registry=r,
        )
        self.model_state = Gauge(
            "prune_serve_model_ready",
            "1 while the model serves, 0 when it failed to load",
            ["model"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "prune_serve_model_load_failures_total", "loads and reloads that failed", ["model"], registry=r
        )
        self.model_info = Gauge(
            "prune_serve_model_info", "served models", ["model", "variant", "backend", "params"], registry=r
        )
