"""Prometheus text exposition (format 0.0.4), hand-written: counters, gauges and histograms in a few lines, so the
server needs no prometheus_client. All updates happen on the event loop thread (handlers and the ASGI
middleware); engine gauges are read from the worker's stats snapshot at scrape time. No locks needed.
"""

from __future__ import annotations

import bisect
import math

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc)) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(buckets) + 1)  # last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float):
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.sum += x
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip((*self.bounds, math.inf), self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{_num(b)}"}} {acc}')
        out += [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.http: dict[tuple[str, str, int], int] = {}  # (method, route, status) -> count
        self.requests_finished: dict[str, int] = {}  # finish_reason -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.rejected_queue_full = 0
        self.in_flight = 0  # accepted generation requests not yet answered
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def count_http(self, method: str, route: str, status: int):
        key = (method, route, status)
        self.http[key] = self.http.get(key, 0) + 1

    def count_finish(self, reason: str | None):
        r = reason or "unknown"
        self.requests_finished[r] = self.requests_finished.get(r, 0) + 1

    def render(self, engine_stats: dict, worker=None) -> str:
        L: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]] | None = None,
                   lines: list[str] | None = None):
            L.append(f"# HELP {name} {help_}")
            L.append(f"# TYPE {name} {kind}")
            for labels, v in samples or ():
                L.append(f"{name}{_labels(labels)} {_num(v)}")
            L.extend(lines or ())

        s = engine_stats
        metric("glm5_http_requests_total", "counter", "HTTP requests by method, route and status code.",
               [({"method": m, "route": r, "status": str(c)}, v) for (m, r, c), v in sorted(self.http.items())])
        metric("glm5_request_success_total", "counter", "Generation requests answered, by finish reason of the "
               "first sample.", [({"finish_reason": k}, v) for k, v in sorted(self.requests_finished.items())])
        metric("glm5_requests_rejected_queue_full_total", "counter", "Requests refused with 429 (queue full).",
               [({}, self.rejected_queue_full)])
        metric("glm5_prompt_tokens_total", "counter", "Prompt tokens of answered requests.",
               [({}, self.prompt_tokens)])
        metric("glm5_generation_tokens_total", "counter", "Generated tokens of answered requests.",
               [({}, self.generation_tokens)])
        metric("glm5_requests_in_flight", "gauge", "Generation requests accepted by the server and not yet "
               "answered.", [({}, self.in_flight)])
        metric("glm5_num_requests_running", "gauge", "Sequences in the engine's running batch.",
               [({}, s.get("num_running", 0))])
        metric("glm5_num_requests_waiting", "gauge", "Sequences waiting for the engine (queue depth).",
               [({}, s.get("num_waiting", 0))])
        total = s.get("blocks_total", 0) or 1
        metric("glm5_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks held by sequences.",
               [({}, s.get("blocks_used", 0) / total)])
        metric("glm5_kv_cache_blocks", "gauge", "KV cache blocks by state (used: held; cached: free but holding "
               "a reusable prefix; total).", [({"state": "used"}, s.get("blocks_used", 0)),
                                               ({"state": "cached"}, s.get("blocks_cached", 0)),
                                               ({"state": "total"}, s.get("blocks_total", 0))])
        metric("glm5_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [({}, s.get("prefix_cache_hit_tokens", 0))])
        metric("glm5_num_preemptions_total", "counter", "Sequences preempted (KV recomputed later).",
               [({}, s.get("num_preemptions", 0))])
        if s.get("speculative_tokens"):  # speculative decoding is on (--speculative-tokens)
            metric("glm5_spec_decode_num_draft_tokens_total", "counter", "Tokens the MTP layer drafted.",
                   [({}, s["spec_draft_tokens"])])
            metric("glm5_spec_decode_num_accepted_tokens_total", "counter", "Drafted tokens the model accepted.",
                   [({}, s["spec_accepted_tokens"])])
            metric("glm5_spec_decode_acceptance_rate", "gauge", "Accepted / drafted tokens so far.",
                   [({}, s.get("spec_acceptance_rate") or 0.0)])
        if worker is not None:
            metric("glm5_engine_steps_total", "counter", "Engine steps run.", [({}, worker.steps)])
            metric("glm5_engine_busy_seconds_total", "counter", "Time spent inside engine steps.",
                   [({}, worker.busy_s)])
            metric("glm5_engine_step_failures_total", "counter", "Engine steps that raised.",
                   [({}, worker.failures)])
        metric("glm5_time_to_first_token_seconds", "histogram", "Request arrival to first generated token.",
               lines=self.ttft.lines("glm5_time_to_first_token_seconds"))
        metric("glm5_inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a sample.",
               lines=self.itl.lines("glm5_inter_token_latency_seconds"))
        metric("glm5_e2e_request_latency_seconds", "histogram", "Request arrival to its last token.",
               lines=self.e2e.lines("glm5_e2e_request_latency_seconds"))
        return "\n".join(L) + "\n"
