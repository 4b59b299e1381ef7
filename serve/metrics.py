"""Application metrics of the endpoint, exported through Ray Serve's metrics API.

Ray exports them on every node's metrics port (Prometheus text; ``ray start
--metrics-export-port``, ``clusters/README.md`` has the scrape config) with the prefix
``ray_`` and Serve's ``deployment``/``replica``/``application`` tags:

- ``ray_dcm_requests_total{route, code}``: HTTP requests by route template and status
- ``ray_dcm_jobs_total{outcome}``: submitted, rejected (queue full), retried, succeeded,
  failed, cancelled
- ``ray_dcm_job_queue_depth`` / ``ray_dcm_jobs_in_flight``: jobs waiting in the ingress /
  sent to generator replicas
- ``ray_dcm_generation_seconds{steps, model}``: generation latency histogram (one batch)
- ``ray_dcm_network_evaluations_per_second{model}``: transformer evaluations x batch rows
  per denoising second of the last generation
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0]


class NoMetrics:
    """Stand-in outside a Serve replica (unit tests): every record is a no-op."""

    def request(self, route: str, code: int) -> None: ...

    def job(self, outcome: str) -> None: ...

    def queue(self, waiting: int, in_flight: int) -> None: ...

    def generation(self, seconds: float, steps: int, model: str, nfe_rate: float) -> None: ...


class ServeMetrics(NoMetrics):
    """The metrics above; create one per replica (inside the deployment's constructor)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "dcm_requests", "HTTP requests by route and status code.", ("route", "code")
        )
        self._jobs = metrics.Counter("dcm_jobs", "Video jobs by outcome.", ("outcome",))
        self._waiting = metrics.Gauge("dcm_job_queue_depth", "Jobs waiting in the ingress.")
        self._in_flight = metrics.Gauge("dcm_jobs_in_flight", "Jobs sent to generator replicas.")
        self._latency = metrics.Histogram(
            "dcm_generation_seconds",
            "Generation latency (text, denoise, decode) by step count and model.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("steps", "model"),
        )
        self._nfe = metrics.Gauge(
            "dcm_network_evaluations_per_second",
            "Transformer evaluations (x batch rows) per denoising second.",
            ("model",),
        )

    def request(self, route: str, code: int) -> None:
        self._requests.inc(1, {"route": route, "code": str(code)})

    def job(self, outcome: str) -> None:
        self._jobs.inc(1, {"outcome": outcome})

    def queue(self, waiting: int, in_flight: int) -> None:
        self._waiting.set(waiting)
        self._in_flight.set(in_flight)

    def generation(self, seconds: float, steps: int, model: str, nfe_rate: float) -> None:
        self._latency.observe(seconds, {"steps": str(steps), "model": model})
        self._nfe.set(nfe_rate, {"model": model})


def make_metrics() -> Any:
    """ServeMetrics inside a Serve replica, NoMetrics elsewhere (or if Ray refuses)."""
    try:
        return ServeMetrics()
    except Exception:  # noqa: BLE001 - metrics must never stop the endpoint
        return NoMetrics()
