"""Schema fuzzing of the HTTP server: schemathesis generates requests from /openapi.json (valid and invalid ones)
for a fixed time against `glm5 serve` on the tiny model, and this reports what it finds:

- server errors: 5xx answers (schemathesis' check, and the server's own /metrics count of them) and tracebacks in
  the server's log;
- hangs: a request that does not answer within --request-timeout, or /health silent for --health-timeout while the
  fuzzer runs;
- schema violations: JSON bodies, statuses and content types that /openapi.json does not describe (schemathesis),
  and streams whose events are not chat / completion chunks or error bodies ending in `data: [DONE]` (a check
  added here: schemathesis does not look inside server-sent events);
- leaks: requests or KV-cache blocks still held on /metrics once the fuzzer is done.

max_tokens is bounded (the server's --max-tokens, and generated values above it lowered to it) so each request
costs milliseconds on the tiny model. Generated chat messages without a role get one: otherwise nearly every chat
request stops at the chat-format check and the fields behind it are never reached. The exit status is 0 when
nothing was found.

    python bench/fuzz_server.py                      # 300 s
    python bench/fuzz_server.py --duration 30 --seed 0

This file is also the schemathesis hooks module (SCHEMATHESIS_HOOKS=fuzz_server): imported under that name, it
registers the body hook and the stream check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import free_port, metric_values, start_server  # bench/machine.py (python puts bench/ on sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# -------------------------------------------------------------------------------------- schemathesis hooks module
def _register_hooks():
    import schemathesis
    from pydantic import ValidationError

    from glm5.server.protocol import ChatCompletionChunk, Completion, ErrorResponse

    cap = int(os.environ.get("GLM5_FUZZ_MAX_TOKENS", "16"))
    max_events = 128 * (cap + 2) + 8  # as written to schemathesis.toml below

    @schemathesis.hook
    def map_body(ctx, body):
        if not isinstance(body, dict):
            return body
        for k, v in list(body.items()):
            # JSON Schema's "integer" admits 71.0, which this server's strict types refuse (400): sent as 71, the
            # request reaches the code behind the type check.
            if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 63:
                body[k] = v = int(v)
            if k in ("max_tokens", "max_completion_tokens") and type(v) is int and v > cap:
                body[k] = cap
        msgs = body.get("messages")
        if isinstance(msgs, list):
            for m in msgs:
                if isinstance(m, dict) and "role" not in m:
                    m["role"] = "user"
                    m.setdefault("content", "hi")
        return body

    @schemathesis.check
    def stream_events_follow_the_schema(ctx, response, case):
        """Every event of a 200 text/event-stream is a chunk of its endpoint or an error body; the last is [DONE]."""
        if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith(
                "text/event-stream"):
            return None
        chunk = ChatCompletionChunk if case.path.endswith("/chat/completions") else Completion
        data = [ln[6:] for ln in response.text.split("\n") if ln.startswith("data: ")]
        # schemathesis stops reading a stream after max-stream-events events (set above any stream here) or at the
        # request timeout (a hang: no stream of a few tokens takes that long).
        cut = getattr(response, "stream_cut_short", False)
        if cut and len(data) < max_events:
            raise AssertionError(f"the stream stalled: {len(data)} events before the request timeout")
        if not cut and (not data or data[-1] != "[DONE]"):
            raise AssertionError(f"the stream does not end with `data: [DONE]` (last events: {data[-2:]})")
        for d in data[:-1] if not cut else [d for d in data if d != "[DONE]"]:
            try:
                obj = json.loads(d)
                (ErrorResponse if "error" in obj else chunk).model_validate(obj)
            except (ValueError, ValidationError) as e:
                raise AssertionError(f"stream event is not a {chunk.__name__} or an error: {d[:300]}\n{e}") from None
        return None


if __name__ != "__main__" and os.environ.get("SCHEMATHESIS_HOOKS") == __name__:
    _register_hooks()


# ---------------------------------------------------------------------------------------------------------- runner
def _get(url: str, timeout: float):
    import httpx

    return httpx.get(url, timeout=timeout)


class HealthWatch(threading.Thread):
    """Polls /health once a second; records each time it took longer than `limit` (or failed)."""

    def __init__(self, url: str, limit: float):
        super().__init__(daemon=True)
        self.url, self.limit, self.stalls, self.polls = url, limit, [], 0
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(1.0):
            t0 = time.monotonic()
            try:
                ok = _get(self.url + "/health", self.limit).status_code == 200
            except Exception as e:
                ok, why = False, f"{type(e).__name__}"
            else:
                why = "not 200"
            self.polls += 1
            if not ok:
                self.stalls.append(f"/health at +{t0:.0f} s: {why}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300, help="seconds of fuzzing (default 300)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-tokens", type=int, default=16, help="the server's max_tokens limit (default 16)")
    p.add_argument("--seed", type=int, default=None, help="schemathesis seed (default: random; printed)")
    # One worker: with several, schemathesis' threads call ast.parse concurrently (Hypothesis describing lambdas),
    # which CPython 3.11 can fail with "SystemError: AST constructor recursion depth mismatch": a fuzzer crash, not
    # a server finding.
    p.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers (default 1)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="a request slower than this is a hang")
    p.add_argument("--health-timeout", type=float, default=5.0, help="/health slower than this is a hang")
    p.add_argument("--out", type=Path, default=None, help="directory for the server log and the reports "
                   "(default: a temporary one, kept)")
    args = p.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="glm5-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / "server.log", "w")
    proc = start_server(port, ["--model", args.model, "--max-tokens", str(args.max_tokens), "--threads",
                              str(args.threads)], log)
    watch = HealthWatch(url, args.health_timeout)
    # Two runs: every operation (stateful links included) for a tenth of the time, then the generation endpoints
    # alone. In one run the GET routes, answered in a millisecond, take most of the cases, while a generation
    # request's body takes ~0.2 s to generate.
    first = min(max(10.0, 0.1 * args.duration), args.duration / 2)
    runs = [("all operations", [], first),
            ("POST operations", ["--include-method", "POST", "--phases", "coverage,fuzzing"], args.duration - first)]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="fuzz_server", GLM5_FUZZ_MAX_TOKENS=str(args.max_tokens),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    st = Path(sys.executable).with_name("schemathesis")
    # schemathesis reads only a stream's first 20 events by default; a stream here has at most n=128 samples x
    # (max_tokens + 2) events, so it is read whole and its end checked.
    config = out / "schemathesis.toml"
    config.write_text(f"max-stream-events = {128 * (args.max_tokens + 2) + 8}\n")
    results = []
    t0 = time.monotonic()
    watch.start()
    try:
        for i, (what, extra, seconds) in enumerate(runs):
            cmd = [str(st) if st.exists() else "schemathesis", "--config-file", str(config), "run",
                   f"{url}/openapi.json", "--checks", "all",
                   # A schema-valid request can still be refused for what a schema cannot say (a prompt longer than
                   # the context, json mode without "json" in the messages, tool_choice without tools): 400s are
                   # right there, so "positive data must be accepted" does not apply.
                   "--exclude-checks", "positive_data_acceptance",
                   "--max-time", str(max(1, round(seconds))), "--request-timeout", str(args.request_timeout),
                   "--suppress-health-check", "all", "--workers", str(args.workers), "--output-truncate", "true",
                   "--report", "junit", "--report-junit-path", str(out / f"junit-{i}.xml"), *extra]
            if args.seed is not None:
                cmd += ["--seed", str(args.seed)]
            text_path = out / f"schemathesis-{i}.txt"
            with open(text_path, "w") as st_log:
                rc = subprocess.run(cmd, stdout=st_log, stderr=subprocess.STDOUT, env=env, cwd=out,
                                    timeout=seconds + 600).returncode
            results.append((what, rc, text_path.read_text(), (out / f"junit-{i}.xml")))
        watch.done.set()
        wall = time.monotonic() - t0
        time.sleep(1.0)  # let the server finish aborting what the fuzzer's last requests left
        metrics_text = _get(url + "/metrics", 10).text
        (out / "metrics.txt").write_text(metrics_text)
        metrics = metric_values(metrics_text)
    finally:
        watch.done.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    server_log = (out / "server.log").read_text()
    by_status: dict[str, int] = {}
    posts = 0
    for k, v in metrics.items():
        m = re.match(r'glm5_http_requests_total\{method="([^"]*)",route="([^"]*)",status="(\d+)"\}', k)
        if m:
            by_status[m.group(3)] = by_status.get(m.group(3), 0) + int(v)
            posts += int(v) if m.group(1) == "POST" and m.group(2).startswith("/v1/") else 0
    five = sum(v for s, v in by_status.items() if s.startswith("5"))
    tracebacks = server_log.count("Traceback (most recent call last)")
    # Distinct server failures: each "unhandled error on ROUTE" with the exception line closing its traceback.
    distinct: dict[str, int] = {}
    for block in re.split(r"(?m)^(?=ERROR:)", server_log):
        if "Traceback" in block:
            head = block.splitlines()[0]
            last = [ln for ln in block.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
            key = f"{head} -> {last[-1] if last else '?'}"
            distinct[key] = distinct.get(key, 0) + 1
    kinds: dict[str, int] = {}
    cases, errors = 0, 0
    for _, _, text, junit in results:
        for f in re.findall(r"^- (.+)$", text, re.M):  # schemathesis lists each failure as "- <title>"
            kinds[f.strip()] = kinds.get(f.strip(), 0) + 1
        n = re.search(r"(\d+) generated", text)
        cases += int(n.group(1)) if n else 0
        j = junit.read_text() if junit.exists() else ""
        e = re.search(r'<testsuites errors="(\d+)"', j)
        errors += int(e.group(1)) if e else 0
    failures = sum(kinds.values())
    stalled = sum(text.count("the stream stalled") for _, _, text, _ in results)
    hangs = [f"{v} x {k}" for k, v in kinds.items() if re.search(r"time ?out", k, re.I)] + watch.stalls \
        + ([f"{stalled} streams stalled (see the schemathesis output)"] if stalled else [])
    schema = sum(v for k, v in kinds.items() if re.search(r"schema|Content-Type|status code|stream", k, re.I))
    held = {k: metrics.get(k, 0) for k in ("glm5_requests_in_flight", "glm5_num_requests_running",
                                           "glm5_num_requests_waiting", 'glm5_kv_cache_blocks{state="used"}')}
    seeds = [m.group(1) for _, _, text, _ in results if (m := re.search(r"Seed: (\d+)", text))]

    print(f"fuzzed {url} for {wall:.0f} s with schemathesis (seeds {', '.join(seeds) or '?'}): {cases} test cases, "
          f"{posts} generation requests (max_tokens <= {args.max_tokens})")
    print(f"  responses by status: {dict(sorted(by_status.items()))}")
    print(f"  server errors: {five} 5xx answers, {tracebacks} tracebacks in the server log"
          + "".join(f"\n    {v} x {k}" for k, v in sorted(distinct.items())))
    print(f"  hangs: {len(hangs)} ({watch.polls} /health polls during the run)" + "".join(f"\n    {h}" for h in hangs))
    print(f"  schemathesis failures: {failures}, of which schema violations {schema}; errors {errors}"
          + "".join(f"\n    {v} x {k}" for k, v in sorted(kinds.items())))
    print(f"  held after the run: {held}")
    for what, rc, _, _ in results:
        print(f"  {what}: schemathesis exit status {rc}")
    print(f"  outputs in {out}: schemathesis-*.txt, junit-*.xml, server.log, metrics.txt")
    bad = five or tracebacks or hangs or failures or errors or any(held.values()) or any(rc for _, rc, _, _ in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
