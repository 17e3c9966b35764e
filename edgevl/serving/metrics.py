"""Prometheus metrics for ``edgevl serve`` (prometheus-client, one registry per app).

Per request, measured by the server: requests by outcome, time to first token, end-to-end
latency, queue wait (from the scheduler's timings), prompt and generated tokens. Read from the
schedulers at scrape time: queue depth, KV slots in use and available, decode and prefill batch
sizes (as histograms), and the scheduler's own request counters (accepted, completed,
cancelled, failed, rejected), so a disconnect that freed its slot is visible from outside.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

OUTCOMES = ("ok", "bad_request", "unauthorized", "not_found", "too_large", "rejected", "timeout", "cancelled",
            "unavailable", "error")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class SchedulerCollector:
    """Scrape-time view of each model's scheduler (``models``: name -> VLM with batching)."""

    def __init__(self, models: dict):
        self.models = models

    def collect(self):
        depth = GaugeMetricFamily("edgevl_queue_depth", "Requests waiting for a KV slot", labels=["model"])
        used = GaugeMetricFamily("edgevl_kv_slots_in_use", "KV cache slots held by generating requests",
                                 labels=["model"])
        slots = GaugeMetricFamily("edgevl_kv_slots", "KV cache slots (max batch size)", labels=["model"])
        alive = GaugeMetricFamily("edgevl_scheduler_alive", "1 while the scheduler thread runs", labels=["model"])
        events = CounterMetricFamily("edgevl_scheduler_requests", "Scheduler request events", labels=["model", "event"])
        batches = {key: HistogramMetricFamily(f"edgevl_{key}_size", f"Sequences per {key.replace('_', ' ')} call",
                                              labels=["model"]) for key in ("decode_batch", "prefill_batch")}
        for name, vlm in self.models.items():
            scheduler = vlm.scheduler
            stats = scheduler.metrics.snapshot()
            depth.add_metric([name], stats["gauges"].get("queue_depth", 0))
            used.add_metric([name], stats["gauges"].get("active", 0))
            slots.add_metric([name], scheduler.max_batch_size)
            alive.add_metric([name], 1 if scheduler.alive else 0)
            for event in ("accepted", "completed", "cancelled", "failed", "rejected"):
                events.add_metric([name, event], stats["counters"].get(event, 0))
            for key, family in batches.items():
                counts = stats["histograms"].get(key, {})
                cumulative, buckets = 0, []
                for size in range(1, scheduler.max_batch_size + 1):
                    cumulative += counts.get(size, 0)
                    buckets.append((str(float(size)), cumulative))
                buckets.append(("+Inf", sum(counts.values())))
                family.add_metric([name], buckets, sum_value=float(sum(k * v for k, v in counts.items())))
        yield from (depth, used, slots, alive, events, *batches.values())


class ServerMetrics:
    def __init__(self, models: dict):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgevl_requests", "Chat completion requests by model and outcome",
                                ["model", "outcome"], registry=r)
        self.ttft = Histogram("edgevl_time_to_first_token_seconds", "Request arrival to first token",
                              ["model"], buckets=_SECONDS, registry=r)
        self.latency = Histogram("edgevl_request_latency_seconds", "Request arrival to last token",
                                 ["model"], buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram("edgevl_queue_wait_seconds", "Submission to admission into a KV slot",
                                    ["model"], buckets=_SECONDS, registry=r)
        self.generated = Counter("edgevl_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt = Counter("edgevl_prompt_tokens", "Prompt tokens (image tokens included)", ["model"], registry=r)
        r.register(SchedulerCollector(models))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
