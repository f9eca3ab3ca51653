"""The rollout worker: an engine in its own process, so that sampling and training really run at the same time.

It takes orders from one inbox, in order, and answers in one outbox:
    ("weights", version, state_dict, t) swap weights between two engine steps (in flight: running samples go on,
                                        their next tokens carry the new version); answered ("pushed", version,
                                        seconds to apply, seconds since the driver began the push at time t)
    ("generate", [(group, example, group_size, seed), ...])    start these groups
    ("stop",)                           abort what runs and stop (it jumps the queue)
    -> ("ready", info) once, ("group", group, [sample dicts]) per finished group, ("error", text) if it dies.
Rewards are computed here, beside the engine (slime's reward model runs in the rollout too): the driver receives
finished, scored groups. A sample whose reward function fails is sent with reward None and left out of training.

`RolloutWorker` is the engine and its rollout, driven in-process by `handle` / `poll`; `serve` is the loop around it
that both backends run: in a spawned process (`LocalWorker`, the local backend) or on a thread of a Ray actor
(glm5.rl.ray_backend). The driver sees either through the same worker-pool interface (glm5.rl.loop.WorkerPool).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections import deque
from dataclasses import dataclass

import torch


class RLError(ValueError):
    """A run that cannot start (bad options, a checkpoint RL cannot train, Ray missing or out of reach) or cannot go
    on; its message is one line for the person running it. (Here, below the loop and both backends, so that each
    can raise it; glm5.rl.loop exports it.)"""


@dataclass
class WorkerConfig:
    model: str  # checkpoint directory (the driver pushes the trainer's weights before any work anyway)
    tokenizer: str | None = None  # directory with tokenizer.json, if not the model's
    reward: str = "glm5.rl.rewards:honesty_reward"
    # another environment: "module:function", called as fn(engine, tokenizer, example, group_size, seed) -> the
    # group's G glm5.rl.rollout.Sample (ids, mask, logprobs, versions, finish_reason, output filled); it owns the
    # engine until it returns (slime's --custom-generate-function-path). None: the built-in chat / tool rollout.
    generate: str | None = None
    threads: int = 1
    max_tokens: int = 256
    max_tool_rounds: int = 2
    temperature: float = 1.0
    max_num_seqs: int = 64
    cache_mib: int | None = None
    seed: int = 0
    update_in_flight: bool = True  # False: new weights wait until the running groups finished
    recompute_on_update: bool = False  # in flight: recompute running samples' KV under the new weights


def sample_dict(s, reward) -> dict:
    """What travels to the trainer of one sample: plain lists (JSON-able, for the buffer's checkpoint)."""
    return {"ids": s.ids, "mask": s.mask, "logprobs": s.logprobs, "versions": s.versions, "reward": reward,
            "outcome": s.outcome, "finish_reason": s.finish_reason, "turns": s.turns, "prompt_len": s.prompt_len,
            "family": s.example.family}


class RolloutWorker:
    def __init__(self, cfg: WorkerConfig):
        from ..engine import Engine
        from ..loader import load
        from .rewards import RewardSample, load_function, load_reward_fn, outcome, safe_reward
        from .rollout import Rollout

        self.cfg = cfg
        # the reward and hook modules first: a module may set torch's threads when imported, and the engine's are
        # cfg.threads (more than its share of the cores makes OpenMP threads wait on each other)
        fn = load_reward_fn(cfg.reward)
        self.generate_fn = load_function(cfg.generate, "rollout hook") if cfg.generate else None
        torch.set_num_threads(cfg.threads)
        loaded = load(cfg.model, tokenizer_dir=cfg.tokenizer)
        self.tok = loaded.tokenizer

        def score(s):
            rs = RewardSample(s.uid, s.example, s.output, s.finish_reason, s.ids[: s.prompt_len],
                              s.ids[s.prompt_len:])
            r = safe_reward(fn, rs)
            try:
                oc = outcome(rs)
            except Exception:  # noqa: BLE001 -- a family the eval cannot score (a custom environment)
                oc = None
            return (None if not isinstance(r, float) else r), oc

        self.engine = Engine(loaded.model, eos_token_ids=self.tok.eos_ids, max_num_seqs=cfg.max_num_seqs,
                             cache_bytes=None if cfg.cache_mib is None else cfg.cache_mib << 20, seed=cfg.seed)
        self.rollout = Rollout(self.engine, self.tok, max_tokens=cfg.max_tokens, max_tool_rounds=cfg.max_tool_rounds,
                               temperature=cfg.temperature, score=score)
        self.busy_s = self.idle_s = 0.0
        self.score = score
        self._hooked: list = []  # groups a rollout hook finished, sent at the next poll

    @property
    def busy(self) -> bool:
        return self.rollout.busy or bool(self._hooked)

    def can_take(self, msg) -> bool:
        """Orders run in the order sent; weights wait for a drained rollout unless they may land in flight."""
        return msg[0] != "weights" or self.cfg.update_in_flight or not self.busy

    def handle(self, msg) -> list:
        """Apply one order; returns the replies."""
        kind = msg[0]
        if kind == "weights":  # ("weights", version, state_dict, time.time() when sent)
            t0 = time.perf_counter()
            self.engine.update_weights(msg[2], version=msg[1], recompute_running=self.cfg.recompute_on_update)
            return [("pushed", msg[1], time.perf_counter() - t0, time.time() - msg[3])]
        if kind == "generate":
            for group, example, size, seed in msg[1]:
                if self.generate_fn is None:
                    self.rollout.submit(group, example, size, seed)
                    continue
                samples = self.generate_fn(self.engine, self.tok, example, size, seed)
                for s in samples:
                    s.group = group
                    s.reward, s.outcome = self.score(s)
                self._hooked.append(samples)
            return []
        raise ValueError(f"rollout worker: unknown order {kind!r}")

    def poll(self) -> list:
        """One engine step -> ("group", ...) replies for the groups it finished."""
        t0 = time.perf_counter()
        groups, self._hooked = self._hooked + self.rollout.step(), []
        out = [("group", g[0].group, [sample_dict(s, s.reward) for s in g]) for g in groups]
        self.busy_s += time.perf_counter() - t0
        return out


def serve(cfg: WorkerConfig, inbox, outbox, alive=lambda: True, info: dict | None = None) -> None:
    """The worker loop: orders in, replies out, until ("stop",) or until alive() says the driver is gone. inbox and
    outbox are queues (multiprocessing's in a local worker process, queue.Queue in a Ray actor's thread)."""
    try:
        w = RolloutWorker(cfg)
        outbox.put(("ready", {"max_model_len": w.engine.max_model_len, "pid": os.getpid(), **(info or {})}))
        orders: deque = deque()
        while True:
            if not alive():  # the driver died: whatever this would generate is regenerated on resume
                return
            if not w.busy and not orders:
                t0 = time.perf_counter()
                try:  # nothing to do: wait for orders (and look for a dead driver every 2 s)
                    orders.append(inbox.get(timeout=2.0))
                except queue.Empty:
                    continue
                finally:
                    w.idle_s += time.perf_counter() - t0
            while True:
                try:
                    orders.append(inbox.get_nowait())
                except queue.Empty:
                    break
            if any(m[0] == "stop" for m in orders):  # stop jumps the queue: nothing still running will be trained
                w.rollout.abort_all()
                outbox.put(("stopped", {"busy_s": w.busy_s, "idle_s": w.idle_s}))
                return
            while orders and w.can_take(orders[0]):
                for r in w.handle(orders.popleft()):
                    outbox.put(r)
            if w.busy:
                for r in w.poll():
                    outbox.put(r)
    except Exception:  # noqa: BLE001 -- reported to the driver, which stops the run with it
        outbox.put(("error", traceback.format_exc()))


def worker_main(cfg: WorkerConfig, inbox, outbox) -> None:
    """The local worker process: `serve` until the driver that spawned it is gone."""
    parent = os.getppid()
    # Replies nobody reads (a killed driver) must not keep this process alive at exit.
    outbox.cancel_join_thread()
    serve(cfg, inbox, outbox, alive=lambda: os.getppid() == parent)


class LocalWorker:
    """The local backend: one rollout worker in a child process (spawned: a fresh interpreter, no forked torch
    state), behind the worker-pool interface of glm5.rl.loop.WorkerPool."""

    def __init__(self, cfg: WorkerConfig, ready_timeout: float = 600):
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=worker_main, args=(cfg, self.inbox, self.outbox), daemon=True,
                                name="glm5-rollout")
        self.proc.start()
        kind, info = self._get(timeout=ready_timeout)
        if kind != "ready":
            raise RuntimeError(f"rollout worker did not start: {info}")
        self.info = {"index": 0, "node": "local", **info}
        self.restarts = 0  # a local worker is not restarted: its death stops the run (resume from a checkpoint)
        self.stopped: dict | None = None

    def push(self, version: int, state_dict: dict) -> None:
        t = time.time()
        # a copy: the queue moves tensors into shared memory, and the trainer's own must not be shared (the next
        # optimizer step would change what the engine reads before it has copied it)
        sd = {k: v.detach().clone() for k, v in state_dict.items()}
        self.inbox.put(("weights", version, sd, t))

    def submit(self, orders: list) -> None:
        self.inbox.put(("generate", orders))

    def get(self, timeout: float):
        msg = self._get(timeout)
        return (*msg, 0) if msg[0] == "group" else msg  # the group's worker: index 0

    def _get(self, timeout: float):
        while True:
            try:
                msg = self.outbox.get(timeout=min(timeout, 5.0))
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"rollout worker died (exit code {self.proc.exitcode})") from None
                timeout -= 5.0
                if timeout <= 0:
                    raise TimeoutError("rollout worker sent nothing") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"rollout worker failed:\n{msg[1]}")
            return msg

    def stop(self) -> dict:
        """Stop the worker (idempotent); its busy and idle seconds, and where it ran."""
        if self.stopped is not None:
            return self.stopped
        info = {}
        if self.proc.is_alive():
            self.inbox.put(("stop",))
            try:
                while True:
                    msg = self.outbox.get(timeout=30)
                    if msg[0] == "stopped":
                        info = msg[1]
                        break
            except queue.Empty:
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
        self.stopped = {**info, "workers": [{**self.info, **info, "restarts": 0}]}
        return self.stopped
