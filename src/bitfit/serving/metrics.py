"""``GET /metrics`` for the bank's service, in Prometheus' text format (``prometheus_client``).

Per request (counted by a pure-ASGI middleware when the answer has been sent, streamed answers at their
end): ``bitfit_requests_total{route, task, status}`` and the latency histogram
``bitfit_request_seconds{route, task}``. ``task`` is the task (or OpenAI ``model``) the request named once its
body was read, or empty (unknown names are not used as labels). Read from the bank and the batcher at each
scrape: ``bitfit_queue_depth`` (requests waiting for the worker), ``bitfit_tasks_resident`` and
``bitfit_task_resident{task}``, ``bitfit_rows_total{task}`` and ``bitfit_generated_tokens_total{task}``,
``bitfit_batches_total`` and ``bitfit_mixed_batches_total``. ``/health`` stays as cheap as it was.

Each app has its own registry, so several apps in one process do not share counters.
"""

import time

ROUTES = frozenset({"/v1/predict", "/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models",
                    "/v1/tasks", "/health", "/metrics"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class _BankCollector:
    """Gauges and counters read from the bank and the batcher at each scrape."""

    def __init__(self, bank, batcher, base_label):
        self.bank, self.batcher, self.base_label = bank, batcher, base_label

    def _label(self, task) -> str:
        return self.base_label() if task is None else str(task)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        b = self.batcher
        with b._stats_lock:
            stats = dict(b.stats)
            rows = dict(getattr(b, "task_rows", {}))
            tokens = dict(getattr(b, "task_tokens", {}))
        yield GaugeMetricFamily("bitfit_queue_depth", "requests waiting for the model worker", value=b.waiting)
        names = self.bank.tasks
        yield GaugeMetricFamily("bitfit_tasks_resident", "tasks loaded in the bank", value=len(names))
        g = GaugeMetricFamily("bitfit_task_resident", "1 for each task loaded in the bank", labels=["task"])
        for n in names:
            g.add_metric([n], 1)
        yield g
        c = CounterMetricFamily("bitfit_rows", "rows (inputs) run, by task", labels=["task"])
        for t, v in rows.items():
            c.add_metric([self._label(t)], v)
        yield c
        c = CounterMetricFamily("bitfit_generated_tokens", "tokens generated, by task", labels=["task"])
        for t, v in tokens.items():
            c.add_metric([self._label(t)], v)
        yield c
        yield CounterMetricFamily("bitfit_batches", "bank calls run", value=stats.get("batches", 0))
        yield CounterMetricFamily("bitfit_mixed_batches", "bank calls holding more than one task",
                                  value=stats.get("mixed_batches", 0))


class MetricsMiddleware:
    """Pure-ASGI middleware counting each answered request and its latency (until its last byte was sent)."""

    def __init__(self, app, *, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})
        status = {"code": 0}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.observe(scope, status["code"] or 499, time.perf_counter() - t0)


class Metrics:
    """The app's Prometheus registry: request counters and latency histograms, and the bank collector."""

    def __init__(self, bank, batcher, base_label):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.bank, self.base_label = bank, base_label
        self.registry = CollectorRegistry()
        self.requests = Counter("bitfit_requests", "HTTP requests answered, by route, task and status",
                                ["route", "task", "status"], registry=self.registry)
        self.latency = Histogram("bitfit_request_seconds", "seconds from a request's arrival to its answer's end",
                                 ["route", "task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_BankCollector(bank, batcher, base_label))

    def observe(self, scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        task = (scope.get("state") or {}).get("task")
        if not isinstance(task, str) or (task not in self.bank and task != self.base_label()):
            task = ""
        self.requests.labels(route, task, str(status)).inc()
        self.latency.labels(route, task).observe(seconds)

    def render(self) -> tuple:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def add_metrics(app, bank, batcher, base_label) -> None:
    """``GET /metrics`` and the counting middleware on ``app`` (501 on /metrics without prometheus_client)."""
    from starlette.responses import Response

    from .guard import ApiError

    metrics = Metrics(bank, batcher, base_label) if available() else None
    app.state.metrics = metrics
    if metrics is not None:
        app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise ApiError(501, "not_available", "/metrics needs prometheus_client: pip install 'bitfit[serve]'")
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)


__all__ = ["Metrics", "MetricsMiddleware", "add_metrics", "available"]
