"""Serve metrics (ray.serve.metrics): exported on Ray's Prometheus endpoint with a `ray_` prefix
and the deployment / replica / application tags Serve adds. Created inside replicas only."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = Counter("lvm_requests", description="requests by endpoint and model",
                                tag_keys=("endpoint", "model"))
        self.errors = Counter("lvm_errors", description="requests answered with an error status",
                              tag_keys=("endpoint", "model", "status"))
        self.latency = Histogram("lvm_request_latency_ms", description="router-side latency",
                                 boundaries=LATENCY_MS, tag_keys=("endpoint", "model"))
        self.model_latency = Histogram("lvm_model_call_latency_ms",
                                       description="router -> model deployment call latency",
                                       boundaries=LATENCY_MS, tag_keys=("model",))
        self.routes = Counter("lvm_route_decisions", description="routing decisions",
                              tag_keys=("model", "reason"))
        self.rollbacks = Counter("lvm_rollbacks", description="automatic Phase-3 rollbacks",
                                 tag_keys=("reason",))
        self.rolled_back = Gauge("lvm_phase3_rolled_back",
                                 description="1 while Phase-3 is rolled back on this router")
        self.phase3_p95 = Gauge("lvm_phase3_rolling_p95_ms",
                                description="rolling P95 of Phase-3 calls seen by this router")
        self.phase3_error_rate = Gauge("lvm_phase3_rolling_error_rate",
                                       description="rolling error rate of Phase-3 calls")


class ModelMetrics:
    def __init__(self) -> None:
        self.forward = Histogram("lvm_model_forward_ms",
                                 description="model forward + kNN time per batch",
                                 boundaries=LATENCY_MS, tag_keys=("model", "kind"))
        self.batch_size = Histogram("lvm_model_batch_size", description="requests per batch",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64],
                                    tag_keys=("model", "kind"))
