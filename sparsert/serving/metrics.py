"""Prometheus text metrics for the server, counted across processes.

The HTTP process counts requests, errors, latency and requests in flight; the
model workers (other processes) count batch sizes and forward-pass time in
shared-memory arrays created before they start. ``render()`` writes the
Prometheus text exposition format (no client library needed).
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if v <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += v


def _fmt(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _hist_lines(name: str, labels: str, bounds, counts, total_sum) -> list[str]:
    out, acc = [], 0
    sep = "," if labels else ""
    for b, c in zip(bounds, counts):
        acc += c
        out.append(f'{name}_bucket{{{labels}{sep}le="{_fmt(float(b))}"}} {acc}')
    acc += counts[len(bounds)]
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {acc}')
    lab = f"{{{labels}}}" if labels else ""
    out.append(f"{name}_sum{lab} {_fmt(float(total_sum))}")
    out.append(f"{name}_count{lab} {acc}")
    return out


class Metrics:
    """One server's metrics. Create it before the workers start (it holds shared memory)."""

    def __init__(self, model: str, format_mix: dict[str, int], workers: int, threads_per_worker: int):
        self.model = model
        self.format_mix = dict(format_mix)
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        # worker side, shared: batch-size histogram counts, then batches, then forward seconds (x1e6)
        ctx = mp.get_context("spawn")  # the context LitServe starts its model workers in
        self._batch = ctx.Array("q", len(BATCH_BUCKETS) + 1, lock=True)
        self._batch_sum = ctx.Value("q", 0, lock=True)
        self._forward_us = ctx.Value("q", 0, lock=True)
        # HTTP side (one HTTP process): plain Python
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, _Histogram] = {}
        self.in_flight = 0
        self.rejected = 0

    def __getstate__(self):
        # pickled into worker processes: shared arrays travel, HTTP-side counts start empty
        state = self.__dict__.copy()
        state.update(_requests={}, _latency={}, in_flight=0, rejected=0)
        return state

    # -- worker side ---------------------------------------------------------
    def observe_batch(self, size: int, seconds: float) -> None:
        i = next((k for k, b in enumerate(BATCH_BUCKETS) if size <= b), len(BATCH_BUCKETS))
        with self._batch.get_lock():
            self._batch[i] += 1
        with self._batch_sum.get_lock():
            self._batch_sum.value += size
        with self._forward_us.get_lock():
            self._forward_us.value += int(seconds * 1e6)

    # -- HTTP side -----------------------------------------------------------
    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._requests[(route, status)] = self._requests.get((route, status), 0) + 1
        self._latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self) -> str:
        m = self.model.replace("\\", "\\\\").replace('"', '\\"')
        lines = [
            "# HELP sparsert_model_info The model this server runs.",
            "# TYPE sparsert_model_info gauge",
            f'sparsert_model_info{{model="{m}"}} 1',
            "# HELP sparsert_model_layers Weight layers of the model by the format they run in.",
            "# TYPE sparsert_model_layers gauge",
            *(f'sparsert_model_layers{{format="{k}"}} {v}' for k, v in self.format_mix.items()),
            "# HELP sparsert_workers Model worker processes.",
            "# TYPE sparsert_workers gauge",
            f"sparsert_workers {self.workers}",
            "# HELP sparsert_threads_per_worker Intra-op threads of each worker.",
            "# TYPE sparsert_threads_per_worker gauge",
            f"sparsert_threads_per_worker {self.threads_per_worker}",
            "# HELP sparsert_requests_total Requests answered, by route and HTTP status.",
            "# TYPE sparsert_requests_total counter",
            *(f'sparsert_requests_total{{route="{r}",code="{c}"}} {n}'
              for (r, c), n in sorted(self._requests.items())),
            "# HELP sparsert_request_errors_total Requests answered with a 4xx or 5xx status.",
            "# TYPE sparsert_request_errors_total counter",
            f"sparsert_request_errors_total {sum(n for (_, c), n in self._requests.items() if c >= 400)}",
            "# HELP sparsert_rejected_total Requests refused because the queue was full (503).",
            "# TYPE sparsert_rejected_total counter",
            f"sparsert_rejected_total {self.rejected}",
            "# HELP sparsert_queue_depth Requests accepted and not yet answered.",
            "# TYPE sparsert_queue_depth gauge",
            f"sparsert_queue_depth {self.in_flight}",
            "# HELP sparsert_request_duration_seconds Time from request to answer, by route.",
            "# TYPE sparsert_request_duration_seconds histogram",
        ]
        for route, h in sorted(self._latency.items()):
            lines += _hist_lines("sparsert_request_duration_seconds", f'route="{route}"', h.bounds, h.counts, h.sum)
        with self._batch.get_lock():
            counts = list(self._batch)
        lines += ["# HELP sparsert_batch_size Requests run together in one model call.",
                  "# TYPE sparsert_batch_size histogram",
                  *_hist_lines("sparsert_batch_size", "", BATCH_BUCKETS, counts, self._batch_sum.value),
                  "# HELP sparsert_forward_seconds_total Time the workers spent running the model.",
                  "# TYPE sparsert_forward_seconds_total counter",
                  f"sparsert_forward_seconds_total {self._forward_us.value / 1e6}"]
        return "\n".join(lines) + "\n"
