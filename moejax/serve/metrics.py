"""Prometheus metrics of a server (prometheus_client, one registry per server): request latencies
(TTFT, TBT, end to end), the engine's running / waiting requests and KV blocks, expert bytes read,
preemptions, tokens and requests by how they ended."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model": model}

        def metric(kind, name, doc, **kw):
            return kind(name, doc, labelnames=["model", *kw.pop("labelnames", [])], registry=r, **kw)

        self.ttft = metric(Histogram, "moejax_time_to_first_token_seconds", "Arrival to first token",
                           buckets=LATENCY_BUCKETS).labels(**labels)
        self.tbt = metric(Histogram, "moejax_time_between_tokens_seconds", "Time between a request's tokens",
                          buckets=LATENCY_BUCKETS).labels(**labels)
        self.e2e = metric(Histogram, "moejax_e2e_request_latency_seconds", "Arrival to last token",
                          buckets=LATENCY_BUCKETS).labels(**labels)
        self.running = metric(Gauge, "moejax_num_requests_running", "Requests the engine runs").labels(**labels)
        self.waiting = metric(Gauge, "moejax_num_requests_waiting", "Requests waiting for admission (or "
                              "preempted)").labels(**labels)
        self.kv_blocks_used = metric(Gauge, "moejax_kv_blocks_used", "KV cache blocks in use").labels(**labels)
        self.kv_blocks_total = metric(Gauge, "moejax_kv_blocks_total", "KV cache blocks").labels(**labels)
        self.expert_bytes = metric(Counter, "moejax_expert_bytes_read", "Routed-expert weight bytes read").labels(
            **labels)
        self.preemptions = metric(Counter, "moejax_preemptions", "Requests preempted (KV freed, to be "
                                  "recomputed)").labels(**labels)
        self.prompt_tokens = metric(Counter, "moejax_prompt_tokens", "Prompt tokens of admitted requests").labels(
            **labels)
        self.generation_tokens = metric(Counter, "moejax_generation_tokens", "Tokens generated").labels(**labels)
        self.iterations = metric(Counter, "moejax_iterations", "Engine iterations").labels(**labels)
        self._finished = metric(Counter, "moejax_requests_finished", "Engine requests by finish reason",
                                labelnames=["finish_reason"])
        self._rejected = metric(Counter, "moejax_requests_rejected", "HTTP requests refused, by status",
                                labelnames=["status"])
        self._labels = labels

    def finished(self, reason: str) -> None:
        self._finished.labels(**self._labels, finish_reason=reason).inc()

    def rejected(self, status: int) -> None:
        self._rejected.labels(**self._labels, status=str(status)).inc()
