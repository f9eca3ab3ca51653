"""Shared pieces of the server tests: a live server on the tiny model, and `ScriptedEngine`, a stand-in engine
that emits a given token script (for parser / plumbing tests: a random model cannot be made to write a tool call).
"""

from __future__ import annotations

import time

import glm5
from glm5.config import tiny
from glm5.engine import RequestError, SamplingParams, StepOutput
from glm5.server import BackgroundServer, Limits, build_engine, create_app
from glm5.tokenizer import Tokenizer

TOK = Tokenizer.default()


def tiny_engine(max_position_embeddings: int = 1024, cache_bytes: int = 16 << 20, **kw):
    model = glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size, max_position_embeddings=max_position_embeddings))
    return build_engine(model, TOK, cache_bytes=cache_bytes, **kw)


def start(engine, **kw) -> BackgroundServer:
    kw.setdefault("model_name", "tiny")
    return BackgroundServer(create_app(engine, tokenizer=TOK, **kw)).start()


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def idle(engine) -> bool:
    s = engine.stats()
    return s["num_requests"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 and s["blocks_used"] == 0


class ScriptedEngine:
    """Plays `script` (token ids) for every sample of every request, one token per step, then stops as the real
    engine does: at an eos id (hidden by the server), at a stop string, or at max_tokens. Records each prompt.
    A parser / plumbing test double, not a model: it proves that given these tokens, the server answers this."""

    def __init__(self, script: list[int], eos_ids=None, max_model_len: int = 4096, step_delay: float = 0.0):
        self.script = list(script)
        self.eos = set(TOK.eos_ids if eos_ids is None else eos_ids)
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.requests: dict[str, dict] = {}
        self.prompts: list[list[int]] = []
        self.fail_next_step = False
        self._pending: list[StepOutput] = []

    def add_request(self, prompt, params: SamplingParams, request_id: str):
        params.validate()
        if not prompt or any(not 0 <= t < TOK.vocab_size for t in prompt):
            raise RequestError("bad prompt")
        self.prompts.append(list(prompt))
        room = self.max_model_len - len(prompt)
        self.requests[request_id] = {"params": params, "script": list(self.script), "prompt": len(prompt),
                                     "out": {i: [] for i in range(params.n)},
                                     "max": params.max_tokens or room}
        return request_id

    def abort(self, request_id):
        r = self.requests.pop(request_id, None)
        if r is not None:
            for i in r["out"]:
                self._pending.append(StepOutput(request_id, i, [], [], [], None, [], True, "abort"))
        return r is not None

    def has_unfinished(self):
        return bool(self.requests) or bool(self._pending)

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("scripted failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        outs, self._pending = self._pending, []
        for rid, r in list(self.requests.items()):
            p: SamplingParams = r["params"]
            for i, out in list(r["out"].items()):
                tok = r["script"][len(out)] if len(out) < len(r["script"]) else TOK.eos_ids[0]
                out.append(tok)
                reason = stop = None
                text = TOK.decode(out)
                hit = [s for s in p.stop if s in text]
                if tok in self.eos and not p.ignore_eos:
                    reason = "stop"
                elif hit:
                    reason, stop = "stop", hit[0]
                elif len(out) >= r["max"]:
                    reason = "length"
                k = p.top_logprobs
                tops = [[(tok, -0.5)] + [((tok + j) % TOK.vocab_size, -1.0 - j) for j in range(1, k)]] if k else None
                outs.append(StepOutput(rid, i, [tok], [-0.5], [-0.5], tops, [0], reason is not None, reason, stop,
                                       r["prompt"], len(out)))
                if reason is not None:
                    del r["out"][i]
            if not r["out"]:
                del self.requests[rid]
        return outs

    def stats(self):
        return {"num_requests": len(self.requests), "num_running": len(self.requests), "num_waiting": 0,
                "blocks_used": 0, "blocks_total": 1, "block_size": 16, "max_model_len": self.max_model_len}


def script(text: str, end: str | None = "<|observation|>") -> list[int]:
    ids = TOK.encode(text, allow_special=True)
    return ids + ([TOK.token_id(end)] if end else [])


__all__ = ["TOK", "Limits", "ScriptedEngine", "idle", "script", "start", "tiny_engine", "wait_for"]
