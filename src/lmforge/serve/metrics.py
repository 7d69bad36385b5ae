"""`GET /metrics`: the server's counters, gauges and histograms in Prometheus' text format."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the time-to-first-token and request-latency histograms."""


class Histogram:
    """Cumulative buckets, sum and count of observed values (Prometheus' histogram)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        """Count one value in every bucket whose bound it does not exceed."""
        for i in range(bisect.bisect_left(self.buckets, value), len(self.buckets)):
            self.counts[i] += 1
        self.sum, self.count = self.sum + value, self.count + 1

    def lines(self, name: str) -> list[str]:
        """The histogram's exposition lines."""
        out = [f'{name}_bucket{{le="{b:g}"}} {n}' for b, n in zip(self.buckets, self.counts, strict=True)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                f"{name}_count {self.count}"]  # fmt: skip


class Metrics:
    """What the server counts; thread-safe (routes run in a thread pool)."""

    def __init__(self, gauges: Callable[[], dict[str, int]]) -> None:
        self.lock = threading.Lock()
        self.gauges = gauges  # now: {"waiting": requests queued, "running": requests decoding, "batch": rows}
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> requests
        self.tokens: Counter[str] = Counter()  # "prompt" / "completion" -> tokens
        self.ttft, self.latency = Histogram(), Histogram()

    def request(self, route: str, status: int, seconds: float) -> None:
        """One finished request."""
        with self.lock:
            self.requests[route, status] += 1
            self.latency.observe(seconds)

    def generation(self, prompt_tokens: int, completion_tokens: int, ttft: float | None) -> None:
        """One generation's tokens and time to its first token."""
        with self.lock:
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens
            if ttft is not None:
                self.ttft.observe(ttft)

    def render(self) -> str:
        """Every metric in Prometheus' text exposition format."""
        now = self.gauges()
        with self.lock:
            lines = ["# TYPE lmforge_requests_total counter"]
            lines += [f'lmforge_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]  # fmt: skip
            lines += ["# TYPE lmforge_tokens_total counter"]
            lines += [
                f'lmforge_tokens_total{{kind="{k}"}} {self.tokens[k]}' for k in ("prompt", "completion")
            ]
            lines += ["# TYPE lmforge_time_to_first_token_seconds histogram",
                      *self.ttft.lines("lmforge_time_to_first_token_seconds"),
                      "# TYPE lmforge_request_seconds histogram", *self.latency.lines("lmforge_request_seconds"),
                      "# TYPE lmforge_queue_depth gauge", f"lmforge_queue_depth {now['waiting']}",
                      "# TYPE lmforge_running_requests gauge", f"lmforge_running_requests {now['running']}",
                      "# TYPE lmforge_batch_size gauge", f"lmforge_batch_size {now['batch']}"]  # fmt: skip
        return "\n".join(lines) + "\n"
