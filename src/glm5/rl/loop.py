"""`glm5 rl`: asynchronous RL in the slime style, one loop for three modes.

The driver (this process) owns the trainer, the buffer, the prompt stream and the version counters; rollout workers
own the engines (glm5.rl.worker). The driver starts groups only while the buffer's capacity allows (AReaL's admission
control: a group started while the engines hold version p is trained by version p + tau at the latest), trains on
the oldest B groups as soon as they are there, and pushes its weights to the workers.

Where the workers live is the backend, and the loop sees it only through a WorkerPool: `local` is one worker
process beside the driver (glm5.rl.worker.LocalWorker); `ray` is R workers as Ray actors on any nodes of a cluster,
weights through the object store, a dead worker restarted and its unfinished groups started again
(glm5.rl.ray_backend.RayPool). Both run this same loop; with R = 1 they train the same weights bit for bit. On Ray
the trainer may be W > 1 ranks, Ray actors under DDP (glm5.rl.ray_trainer.TrainerGroup), each training on 1/W of
every batch with the same train_step; the driver then keeps a copy of rank 0's weights to push and export.

    mode           tau (max staleness)   weights reach the engine
    sync           0                     after the rollout drained: rollout, then train, then rollout ...
    one-step-off   1                     after the rollout drained (slime's train_async: rollout k+1 runs while
                                         step k trains)
    async          --max-staleness       in flight, between two engine steps (running samples go on with the new
                                         weights; every token carries the version that sampled it), or with
                                         --recompute-on-update, after recomputing their KV

With tau = 0 the async mode cannot start a group before the previous step's weights arrived, so it runs exactly the
sync schedule and produces the same weights bit for bit.

Nothing is lost on a crash: a checkpoint holds the model, the optimizer, the buffer (queued groups and the uids of
every group ever received), the version counters and the groups that were being generated; `--resume auto`
regenerates those with the current weights and trains every other group exactly once.

Letters: B groups per optimizer step, G samples per group.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .buffer import Group, RolloutBuffer
from .trainer import RLTrainConfig, load_state, make_optimizer, save_state, train_step
from .worker import LocalWorker, RLError, WorkerConfig

log = logging.getLogger("glm5.rl")

MODES = ("sync", "one-step-off", "async")
BACKENDS = ("local", "ray")
# what becomes of a sample a worker returns: every generated one ends in exactly one other fate, or is still queued
SAMPLE_FATES = ("generated", "skipped_reward", "dropped_failed", "dropped_uniform", "dropped_stale", "trained")


@dataclass
class RLConfig:
    model: str
    out_dir: str
    tokenizer: str | None = None  # directory with tokenizer.json, if not the model's
    mode: str = "async"
    max_staleness: int = 2  # async only: sync is 0, one-step-off 1
    push_every: int = 1  # async: push weights every K optimizer steps
    recompute_on_update: bool = False
    steps: int = 20
    groups_per_step: int = 8
    group_size: int = 8
    families: tuple[str, ...] = ("world", "unknown", "arithmetic", "tool")
    reward: str = "glm5.rl.rewards:honesty_reward"
    generate: str | None = None  # a rollout hook, module:function (glm5.rl.worker.WorkerConfig.generate)
    dynamic_sampling: bool = True
    # dynamic sampling gives up for a step after dropping this many batches' worth of groups with equal rewards, and
    # trains on what comes (zero-advantage groups add no gradient): a model with no signal at all still finishes
    max_oversample: int = 4
    max_tokens: int = 256
    max_tool_rounds: int = 2
    seed: int = 0
    rollout_threads: int | None = None  # default: all cores in sync mode, half in the others
    train_threads: int | None = None
    checkpoint_every: int = 10
    keep_last: int = 2
    resume: str = ""  # "" fresh, "auto" the newest checkpoint under out_dir, or a checkpoint path
    backend: str = "local"  # where the rollout workers live: "local" (one process) or "ray" (actors)
    ray_address: str | None = None  # ray: join this cluster (HOST:PORT, ray://HOST:PORT, auto); None starts one here
    rollout_workers: int = 1  # R, ray only
    trainer_ranks: int = 1  # W, ray only: > 1 trains in W Ray actors under DDP (glm5.rl.ray_trainer)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    progress: bool = True

    def staleness(self) -> int:  # tau
        return {"sync": 0, "one-step-off": 1}.get(self.mode, self.max_staleness)


class TrainerFailed(RLError):
    """The optimizer step raised: the run stopped, to resume from its last checkpoint."""


def check_config(cfg: RLConfig) -> None:
    from ..data import VARIANTS
    from ..data.example import FAMILIES

    problems = []
    if cfg.mode not in MODES:
        problems.append(f"--mode {cfg.mode!r}: expected one of {', '.join(MODES)}")
    if not isinstance(cfg.max_staleness, int) or cfg.max_staleness < 0:
        problems.append(f"--max-staleness {cfg.max_staleness}: must be an integer >= 0 (0 = on-policy)")
    for name in ("steps", "groups_per_step", "push_every", "max_tokens", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1")
    if cfg.backend not in BACKENDS:
        problems.append(f"--backend {cfg.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.rollout_workers < 1:
        problems.append(f"--rollout-workers {cfg.rollout_workers}: must be >= 1")
    elif cfg.backend == "local" and cfg.rollout_workers > 1:
        problems.append(f"--rollout-workers {cfg.rollout_workers} needs --backend ray (the local backend runs one "
                        f"rollout worker)")
    B = cfg.groups_per_step
    if cfg.trainer_ranks < 1:
        problems.append(f"--trainer-ranks {cfg.trainer_ranks}: must be >= 1")
    elif cfg.trainer_ranks > 1 and cfg.backend != "ray":
        problems.append(f"--trainer-ranks {cfg.trainer_ranks} needs --backend ray (the ranks are Ray actors; the "
                        f"local backend trains in the driver, one rank)")
    elif cfg.trainer_ranks > 2 * B:
        # a group whose reward failed on all but two samples is still trained: a batch may hold only 2 B samples
        problems.append(f"--trainer-ranks {cfg.trainer_ranks}: each rank trains on at least one sample, and a batch "
                        f"of --groups-per-step {B} groups may hold as few as {2 * B} (two scored samples a group)")
    if cfg.backend == "local" and cfg.ray_address:
        problems.append(f"--ray-address {cfg.ray_address} needs --backend ray")
    if cfg.group_size < 2:
        problems.append(f"--group-size {cfg.group_size}: GRPO compares samples of one prompt, so at least 2")
    unknown = [f for f in cfg.families if f not in FAMILIES and f not in VARIANTS]
    if unknown or not cfg.families:
        problems.append(f"--families: unknown {', '.join(map(repr, unknown)) or '(none given)'}; known: "
                        f"{', '.join(FAMILIES + tuple(VARIANTS))}")
    elif cfg.reward == RLConfig.reward:
        from .rewards import HONESTY

        no_reward = [f for f in cfg.families if VARIANTS.get(f, (f,))[0] not in HONESTY]
        if no_reward:
            problems.append(f"--families {', '.join(no_reward)}: the honesty reward does not score them (it scores "
                            f"{', '.join(HONESTY)}); pass --reward module:function")
    if problems:
        raise RLError("glm5 rl: " + "; ".join(problems))
    from .rewards import load_function

    for flag, spec, what in (("--reward", cfg.reward, "reward function"), ("--generate", cfg.generate, "rollout hook")):
        try:
            if spec is not None:
                load_function(spec, what)
        except ValueError as e:
            raise RLError(f"glm5 rl: {flag}: {e}") from None
    from ..config import read_hf_config
    from ..quant.format import read_quant_config

    if (Path(cfg.model) / "config.json").is_file() and read_quant_config(*read_hf_config(cfg.model)) is not None:
        raise RLError(f"glm5 rl: {cfg.model} is an FP8 checkpoint; RL trains BF16/FP32 weights. Convert it first: "
                      f"glm5 quantize {cfg.model} OUT --to bf16")
    if (Path(cfg.model) / "config.json").is_file() and cfg.train.mtp_weight > 0 \
            and not read_hf_config(cfg.model)[0].get("num_nextn_predict_layers", 0):
        raise RLError(f"glm5 rl: --mtp-weight {cfg.train.mtp_weight}: {cfg.model} has no MTP layer "
                      f"(num_nextn_predict_layers = 0); leave --mtp-weight at 0")
    if cfg.backend == "ray":  # before the model loads: Ray missing or a cluster out of reach is one clear line
        from .ray_backend import check_ray

        check_ray(cfg.ray_address)


class PromptStream:
    """Prompt i of the run, the same in every run with this seed: families interleaved, each from its seeded
    training split."""

    def __init__(self, families: tuple[str, ...], seed: int, per_family: int):
        from ..data import examples

        self.families = families
        self.pools = {f: examples(f, "train", per_family, seed) for f in families}

    def __getitem__(self, i: int):
        fam = self.families[i % len(self.families)]
        pool = self.pools[fam]
        return pool[(i // len(self.families)) % len(pool)]


class WorkerPool(Protocol):
    """Where the rollout workers live (glm5.rl.worker.LocalWorker, glm5.rl.ray_backend.RayPool). get() returns the
    next of:
        ("group", gid, [sample dicts], worker index)    a finished, scored group
        ("pushed", version, seconds to apply, seconds since the push began)    one worker holds new weights
        ("lost", [gids], reason)    a worker died with these groups unfinished: none of their samples came back, and
                                    the driver starts them again (the pool has restarted the worker)
    A failure the pool cannot recover from raises."""

    restarts: int  # workers restarted so far

    def push(self, version: int, state_dict: dict) -> None:
        """Every worker gets these weights (copied: the trainer goes on changing its own), and so does any worker
        started later."""

    def submit(self, orders: list) -> None:
        """Start groups: [(gid, example, group_size, seed), ...]."""

    def get(self, timeout: float) -> tuple: ...

    def stop(self) -> dict:
        """Stop every worker (idempotent): mean busy_s and idle_s, and "workers": where each ran, what it did."""


class RLRun:
    """One `glm5 rl` run. `run()` trains to cfg.steps and returns the summary."""

    def __init__(self, cfg: RLConfig):
        from ..loader import load

        check_config(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        split = cfg.staleness() > 0  # rollout and training overlap: each its own cores
        train_cores = max(1, cores // 2) if split else cores
        # per trainer rank and per rollout worker; the Ray backend reserves as many CPUs for each (num_cpus)
        self.train_threads = cfg.train_threads or max(1, train_cores // cfg.trainer_ranks)
        self.rollout_threads = cfg.rollout_threads or max(
            1, (max(1, cores - self.train_threads * cfg.trainer_ranks) if split else cores) // cfg.rollout_workers)
        torch.set_num_threads(self.train_threads)
        loaded = load(cfg.model, tokenizer_dir=cfg.tokenizer)
        self.model, self.tok = loaded.model.float(), loaded.tokenizer
        # W > 1: the ranks hold the optimizer; the driver's model is the copy it pushes and exports
        self.opt = make_optimizer(self.model, cfg.train) if cfg.trainer_ranks == 1 else None
        self.trainers = None  # the TrainerGroup of W > 1 ranks, while run() runs
        self.tau = cfg.staleness()
        self.buffer = RolloutBuffer(self.tau, cfg.dynamic_sampling)
        B = cfg.groups_per_step
        self.prompts = PromptStream(cfg.families, cfg.seed, per_family=max(64, 2 * cfg.steps * B // len(cfg.families)))
        self.step = 0  # optimizer steps done = the trainer's policy version
        self.pushed = 0  # the version the engine holds (or will, once its queue is read)
        self.next_prompt = 0
        self.inflight: dict[int, float] = {}  # group id -> when it was started
        self.redo: deque[int] = deque()  # groups to start again (lost with a killed worker before a resume)
        self.skipped_samples = 0  # samples whose reward function failed
        self.dropped_failed = 0  # groups left with fewer than two scored samples
        # every sample a worker returns, counted once by its fate; queued: gid -> samples of groups still queued
        self.samples: Counter = Counter(dict.fromkeys(SAMPLE_FATES, 0))
        self.queued: dict = {}
        self.groups_requeued = 0  # groups a dead worker took with it, started again
        self.metrics_path = self.out / "metrics.jsonl"
        self.ckpt_root = self.out / "checkpoints"
        self.resumed_from = self._resume()

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "pushed": self.pushed, "next_prompt": self.next_prompt,
                "inflight": sorted(set(self.inflight) | set(self.redo)), "skipped_samples": self.skipped_samples,
                "dropped_failed": self.dropped_failed, "samples": dict(self.samples),
                "groups_requeued": self.groups_requeued, "buffer": self.buffer.state_dict(), "config": asdict(self.cfg)}

    def save(self) -> Path:
        """A checkpoint, written by whoever holds the optimizer: this process, or trainer rank 0."""
        if self.trainers is not None:
            return self.trainers.save(self.ckpt_root, self.step, self._state(), self.cfg.keep_last)
        return save_state(self.ckpt_root, self.step, self.model, self.opt, self._state(), self.cfg.keep_last)

    def _resume(self) -> Path | None:
        from ..train import checkpoint as ckpt

        path = ckpt.resolve(self.cfg.resume, self.ckpt_root)
        if path is None:
            if self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run (nothing to resume) starts a fresh log
            return None
        saved = ckpt.load(path)
        st = saved["trainer_state"].get("rl")
        if st is None:
            raise RLError(f"glm5 rl: {path} is not an RL checkpoint (no rl state)")
        if st["config"]["mode"] != self.cfg.mode or st["config"]["families"] != list(self.cfg.families):
            raise RLError(f"glm5 rl: {path} was written with --mode {st['config']['mode']} --families "
                          f"{','.join(st['config']['families'])}; resume with the same")
        load_state(path, saved, self.model, self.opt)  # W > 1: the ranks load the optimizer themselves
        self.buffer.load_state_dict(st["buffer"])
        self.step, self.pushed, self.next_prompt = st["step"], st["step"], st["next_prompt"]
        self.redo = deque(st["inflight"])
        self.skipped_samples, self.dropped_failed = st["skipped_samples"], st["dropped_failed"]
        self.queued = {d["uid"]: len(d["data"]["samples"]) for d in st["buffer"]["queue"]}
        # a checkpoint from before the sample counts: count from here, the queued groups as generated
        self.samples.update(st.get("samples", {"generated": sum(self.queued.values())}))
        self.groups_requeued = st.get("groups_requeued", 0)
        # metrics past the checkpoint belong to steps that will be trained again
        if self.metrics_path.exists():
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if _step_of(ln) <= self.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in lines))
        return path

    def export(self, dest: Path) -> Path:
        """The trained model as a servable checkpoint: weights in the starting checkpoint's dtype, its tokenizer
        and generation_config.json (`glm5 serve --model dest`, `glm5 eval --model dest`)."""
        import shutil

        from ..weights import save_checkpoint

        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dtype = getattr(torch, str(self.model.config.dtype or "float32"), torch.float32)
        save_checkpoint(self.model, tmp, dtype=dtype)
        self.tok.save(tmp)
        gen = Path(self.cfg.model) / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, tmp / gen.name)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return dest

    # -- the loop --------------------------------------------------------------------------------------------------
    def _push(self, pool: WorkerPool) -> float:
        t0 = time.perf_counter()
        pool.push(self.step, self.model.state_dict())
        self.pushed = self.step
        return time.perf_counter() - t0

    def _dispatch(self, pool: WorkerPool) -> int:
        cap = self.buffer.capacity(self.pushed, self.cfg.groups_per_step, running=len(self.inflight))
        orders = []
        while cap > 0:
            gid = self.redo.popleft() if self.redo else self.next_prompt
            if gid == self.next_prompt:
                self.next_prompt += 1
            orders.append((gid, self.prompts[gid], self.cfg.group_size, _group_seed(self.cfg.seed, gid)))
            self.inflight[gid] = time.perf_counter()
            cap -= 1
        if orders:
            pool.submit(orders)
        return len(orders)

    def _receive(self, msg, stats) -> None:
        kind = msg[0]
        if kind == "pushed":
            stats["push_apply_s"].append(msg[2])
            stats["push_e2e_s"].append(msg[3])
            return
        if kind == "lost":  # a dead worker's unfinished groups: nothing of them arrived, so they start again
            _, gids, reason = msg
            log.warning("rollout worker lost (%s): starting groups %s again", reason, gids)
            for gid in gids:
                if self.inflight.pop(gid, None) is not None:
                    self.redo.append(gid)
                    stats["requeued"].append(gid)
                    self.groups_requeued += 1
            return
        if kind != "group":
            return
        _, gid, samples, worker = msg
        self.inflight.pop(gid, None)
        stats["by_worker"][worker] += 1
        kept = [s for s in samples if s["reward"] is not None]
        self.skipped_samples += len(samples) - len(kept)
        self.samples["generated"] += len(samples)
        self.samples["skipped_reward"] += len(samples) - len(kept)
        stats["tokens"] += sum(sum(s["mask"]) for s in samples)
        for s in samples:
            stats["outcomes"][s["family"]][s["outcome"]] += 1
            if s["reward"] is not None:
                stats["rewards"][s["family"]].append(s["reward"])
        if len(kept) < 2:  # GRPO needs two samples to compare
            self.dropped_failed += 1
            self.samples["dropped_failed"] += len(kept)
            failed = stats["arrivals"]["dropped_failed"]
            failed.append(gid)
            if len(failed) > self.cfg.max_oversample * self.cfg.groups_per_step:
                raise RLError(f"glm5 rl: the reward function failed on {len(failed)} groups in a row (fewer than two "
                              f"scored samples each; see the warnings above): {self.cfg.reward} cannot score "
                              f"--families {','.join(self.cfg.families)}")
            return
        # past the over-sampling limit of this step, admit groups with equal rewards rather than sample forever
        self.buffer.dynamic_sampling = self.cfg.dynamic_sampling and (
            len(stats["arrivals"].get("dropped_uniform", ())) < self.cfg.max_oversample * self.cfg.groups_per_step)
        group = Group(gid, [s["reward"] for s in kept], [[v for v in s["versions"] if v >= 0] for s in kept],
                      {"samples": [{k: s[k] for k in ("ids", "mask", "logprobs")} for s in kept],
                       "family": kept[0]["family"]})
        outcome = self.buffer.put(group, self.step)
        stats["arrivals"][outcome].append(gid)
        if outcome == "admitted":
            self.queued[gid] = len(kept)
        else:
            self.samples[outcome] += len(kept)

    def _take_batch(self) -> list[Group] | None:
        """The buffer's next batch, its samples counted as trained (and any that went stale in the queue as
        dropped)."""
        stale = self.buffer.counts["dropped_stale"]
        batch = self.buffer.get_batch(self.cfg.groups_per_step, self.step)
        for g in batch or ():
            self.samples["trained"] += self.queued.pop(g.uid)
        if self.buffer.counts["dropped_stale"] != stale:  # the draw dropped groups that turned stale in the queue
            still = {d["uid"] for d in self.buffer.state_dict()["queue"]}
            for gid in [g for g in self.queued if g not in still]:
                self.samples["dropped_stale"] += self.queued.pop(gid)
        return batch

    def sample_counts(self) -> dict:
        """Every sample a worker returned, by fate; raises if they do not add up (one lost or counted twice)."""
        counts = {**self.samples, "queued": sum(self.queued.values())}
        fates = sum(v for k, v in counts.items() if k != "generated")
        if fates != counts["generated"] or len(self.queued) != len(self.buffer):
            raise AssertionError(f"sample counts do not add up: {counts} ({len(self.queued)} groups queued by the "
                                 f"count, {len(self.buffer)} in the buffer)")
        return counts

    def _start_workers(self) -> WorkerPool:
        cfg = self.cfg
        wcfg = WorkerConfig(model=cfg.model, tokenizer=cfg.tokenizer, reward=cfg.reward, generate=cfg.generate,
                            threads=self.rollout_threads, max_tokens=cfg.max_tokens,
                            max_tool_rounds=cfg.max_tool_rounds, seed=cfg.seed,
                            update_in_flight=cfg.mode == "async", recompute_on_update=cfg.recompute_on_update)
        if cfg.backend == "ray":
            from .ray_backend import RayPool

            trainer_cpus = self.train_threads * cfg.trainer_ranks if cfg.trainer_ranks > 1 else 0
            return RayPool(wcfg, cfg.rollout_workers, cfg.ray_address, other_cpus=trainer_cpus)
        return LocalWorker(wcfg)

    def _start_trainers(self):
        """W > 1: the trainer ranks, on the Ray cluster the pool joined (glm5.rl.ray_trainer)."""
        from .ray_trainer import TrainerGroup

        log.info("rl: %d trainer ranks, %d threads each", self.cfg.trainer_ranks, self.train_threads)
        return TrainerGroup(self.cfg.model, self.cfg.tokenizer, self.cfg.train, self.cfg.trainer_ranks,
                            self.train_threads, resume=str(self.resumed_from) if self.resumed_from else None)

    def run(self, on_step=None) -> dict:
        """Train to cfg.steps; on_step(record) after each step (the record metrics.jsonl gets)."""
        from tqdm import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        pool = self._start_workers()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"rl {cfg.mode}", disable=not cfg.progress,
                   dynamic_ncols=True)
        totals = Counter()
        try:
            if cfg.trainer_ranks > 1:
                self.trainers = self._start_trainers()
            self._push(pool)  # the engines start from the trainer's weights (a resumed run's, too)
            stats = _new_stats()
            t_wait = 0.0
            while self.step < cfg.steps:
                self._dispatch(pool)
                batch = self._take_batch()
                if batch is None:
                    t0 = time.perf_counter()
                    self._receive(pool.get(timeout=3600), stats)
                    t_wait += time.perf_counter() - t0
                    continue
                batch.sort(key=lambda g: g.uid)  # the same sum order whatever order the groups arrived in
                t0 = time.perf_counter()
                tstats = self._train(batch)
                t_train = time.perf_counter() - t0
                self.step += 1
                # async pushes every K steps, and always before the engines' weights fall more than tau behind:
                # capacity is measured from them, and would reach 0 with nothing left running
                due = cfg.mode != "async" or self.step % cfg.push_every == 0 or self.step - self.pushed > self.tau
                push_s = self._push(pool) if due else None
                rec = self._record(batch, tstats, stats, t_train, t_wait, push_s, time.perf_counter() - t_start,
                                   pool.restarts)
                totals.update({"train_s": t_train, "wait_s": t_wait})
                stats, t_wait = _new_stats(), 0.0
                bar.set_postfix(reward=f"{rec['reward_mean']:+.2f}", stale=rec["staleness_max"],
                                tok_s=f"{rec['rollout_tok_s']:.0f}")
                bar.update()
                if on_step is not None:
                    on_step(rec)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
        finally:
            bar.close()
            if self.trainers is not None:
                self.trainers.stop()
                self.trainers = None
            pool_info = pool.stop()
        self.buffer.check()
        samples = self.sample_counts()
        self.export(self.out / "model")
        wall = time.perf_counter() - t_start
        summary = {"mode": cfg.mode, "backend": cfg.backend, "trainer_ranks": cfg.trainer_ranks, "steps": self.step,
                   "seconds": round(wall, 2),
                   "buffer": self.buffer.stats(), "samples": samples, "skipped_samples": self.skipped_samples,
                   "dropped_failed": self.dropped_failed, "groups_requeued": self.groups_requeued,
                   "worker_restarts": pool.restarts, "workers": pool_info.get("workers", []),
                   "trainer_idle_share": totals["wait_s"] / wall,
                   "rollout_idle_share": pool_info.get("idle_s", 0.0) / wall,
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _train(self, batch: list[Group]) -> dict:
        """One optimizer step. A failure stops the run, which resumes from the last checkpoint (`--resume auto`):
        nothing is saved here, since a step that failed half-way may have moved some weights and not others."""
        from ..train import checkpoint as ckpt

        try:
            if self.trainers is None:
                return train_step(self.model, self.opt, batch, self.cfg.train)
            stats, state_dict = self.trainers.step(batch)
            self.model.load_state_dict(state_dict)  # rank 0's new weights: what the workers get, and the export
            return stats
        except Exception as e:
            log.error("the trainer failed at step %d", self.step + 1, exc_info=True)
            last = ckpt.resolve("auto", self.ckpt_root)
            where = f"resume from {last} with --resume auto" if last else "no checkpoint yet: start again"
            cause = getattr(e, "cause", None) or e  # a trainer rank's exception, not Ray's wrapper of it
            first = (str(cause).strip().splitlines() or [""])[0]
            raise TrainerFailed(f"glm5 rl: the trainer failed at step {self.step + 1} ({type(cause).__name__}: "
                                f"{first}); the run stopped; {where}") from e

    def _record(self, batch, tstats, stats, t_train, t_wait, push_s, elapsed, restarts) -> dict:
        rewards = [r for g in batch for r in g.rewards]
        fam_rewards = defaultdict(list)
        for g in batch:
            fam_rewards[g.data["family"]] += list(g.rewards)
        stale = [self.step - 1 - g.oldest for g in batch]
        oc = stats["outcomes"]
        rec = {"step": self.step, "elapsed_s": round(elapsed, 3), "reward_mean": sum(rewards) / len(rewards),
               "reward_by_family": {f: sum(v) / len(v) for f, v in fam_rewards.items()},
               "rollout_reward_by_family": {f: sum(v) / len(v) for f, v in stats["rewards"].items() if v},
               "rollout_reward_mean": _mean([r for v in stats["rewards"].values() for r in v]),
               "outcomes": {f: dict(c) for f, c in oc.items()},
               "hallucination_rate": _hallucination(oc),
               "staleness": stale, "staleness_max": max(stale),
               "train_s": round(t_train, 3), "trainer_wait_s": round(t_wait, 3),
               "push_s": None if push_s is None else round(push_s, 4),
               "push_apply_s": stats["push_apply_s"], "push_e2e_s": stats["push_e2e_s"],
               "rollout_tokens": stats["tokens"],
               "rollout_tok_s": stats["tokens"] / max(1e-9, t_train + t_wait),
               "icepop_masked_share": tstats["masked"] / tstats["tokens"], **{k: tstats[k] for k in
                                                                              ("loss", "tokens", "clipped",
                                                                               "grad_norm", "kl_roll")},
               "trained_groups": [g.uid for g in batch], "arrivals": dict(stats["arrivals"]),
               "groups_by_worker": {str(w): n for w, n in sorted(stats["by_worker"].items())},
               "requeued": stats["requeued"], "worker_restarts": restarts, "samples": dict(self.samples),
               "buffer": self.buffer.stats()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


def _new_stats() -> dict:
    return {"tokens": 0, "outcomes": defaultdict(Counter), "rewards": defaultdict(list), "push_apply_s": [],
            "push_e2e_s": [], "arrivals": defaultdict(list), "by_worker": Counter(), "requeued": []}


def _hallucination(oc) -> float | None:
    """wrong / (wrong + abstained) over the world and unknown samples generated since the last step."""
    w = sum(oc[f]["wrong"] for f in ("world", "unknown") if f in oc)
    a = sum(oc[f]["abstained"] for f in ("world", "unknown") if f in oc)
    return w / (w + a) if w + a else None


def _step_of(line: str) -> int:
    """The step of a metrics.jsonl line; a line torn by a kill counts as past any checkpoint."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def _mean(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _group_seed(seed: int, gid: int) -> int:
    return (seed * 1_000_003 + gid * 7919) % (1 << 31)
