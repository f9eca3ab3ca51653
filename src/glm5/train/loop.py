"""`train(cfg)`: the pre-training loop and the two DSA stages, top to bottom, for one process or many (torchrun).

One step:  global batch (every rank packs the same one and takes its rows) -> micro-batches: forward + backward with
losses normalised by global counts -> gradient clip -> optimizer step -> MoE bias update from the expert loads summed
over ranks -> metrics (JSONL, progress bar) -> checkpoint every `save_every` steps. Multi-process is the same loop:
DDP (or FSDP2 `fully_shard`) wraps the loss module; only the all-reduces of statistics are extra.

The caller sets up the process group (glm5/train/cli.py does, from torchrun's environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..loader import load_model
from ..model import Impl
from ..weights import CheckpointError
from . import checkpoint as ckpt
from .balance import all_reduce_loads, imbalance, update_bias
from .data import JsonlDocs, Packer, SyntheticDocs
from .losses import STAGES, ForwardLoss, loss_denominators
from .optim import SCHEDULES, Optimizers, build_optimizer, lr_factor, set_lr

log = logging.getLogger("glm5.train")


@dataclass
class TrainConfig:
    model: str = "tiny"  # preset, config.json, or a checkpoint directory (its weights are the starting point)
    out_dir: str = "runs/train"  # metrics.jsonl, plots and checkpoints/ go here
    stage: str = "pretrain"  # pretrain | dsa_warmup | sparse (see losses.py)
    data: str = "synthetic"  # "synthetic" or a .jsonl file of token-id documents
    synthetic_docs: int = 100_000
    synthetic_max_len: int = 96
    split_docs: bool = True  # False: a document that fits a row is never cut across rows (see data.Packer)
    seq_len: int = 64
    batch_size: int = 8  # rows per optimizer step, over all ranks and micro-batches
    micro_batch: int = 0  # rows per forward per rank; 0 = batch_size / world size (no accumulation)
    steps: int = 100
    optimizer: str = "adamw"  # adamw | muon (Muon for 2-D hidden matrices, AdamW for the rest)
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2  # WSD: the final fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    mtp_depth: int = 1  # MTP depths sharing the one MTP layer (GLM-5: 3); 0 = no MTP loss
    # The MTP loss from this step on (0: every step). Before it the MTP layer stays out of the forward; it and its
    # head are a third of a step of the speedrun's model (dev/LOG.md). Single process only.
    mtp_from: int = 0
    mtp_weight: float = 0.3
    balance_weight: float = 1e-4  # sequence-wise balance loss weight (DeepSeek-V3: "extremely small")
    bias_speed: float = 1e-3  # aux-loss-free bias update speed (DeepSeek-V3: 0.001)
    indexer_weight: float = 1.0  # sparse stage: weight of the indexer KL (it reaches only the indexer)
    recall_every: int = 10  # sparse stage: dense probe of top-k attention-mass recall every N steps (0 = never)
    autocast: str = "none"  # none | bf16 (bf16 autocast; worth it only where bf16 matmuls are fast)
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard); used only with more than one process
    device: str = "cpu"
    seed: int = 0
    save_every: int = 100  # 0 = only at the end
    keep_last: int = 3
    resume: str = ""  # "" fresh start | "auto" newest checkpoint in out_dir (fresh if none) | a checkpoint dir
    log_every: int = 10  # lines to the log when the progress bar is off
    progress: bool = True
    plots: bool = True

    def validate(self, world: int) -> None:
        checks = [
            (self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}"),
            (self.autocast in ("none", "bf16"), f"autocast must be 'none' or 'bf16', got {self.autocast!r}"),
            (self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}"),
            (self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1"),
            (0 <= self.mtp_depth < self.seq_len, f"mtp_depth must be in [0, seq_len), got {self.mtp_depth}"),
            (self.batch_size % world == 0, f"batch_size {self.batch_size} is not divisible by {world} processes"),
            (0 <= self.mtp_from < self.steps, f"mtp_from must be a step in [0, steps), got {self.mtp_from}"),
            (self.mtp_from == 0 or world == 1, f"mtp_from > 0 leaves the MTP layer without gradients for a while, "
                                               f"which DDP / FSDP do not allow: run it in one process, not {world}"),
        ]
        micro = self.micro_batch or self.batch_size // world
        checks.append(((self.batch_size // world) % micro == 0,
                       f"micro_batch {micro} does not divide the {self.batch_size // world} rows of each process"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# -- set-up helpers --------------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def set_stage(model, stage: str, mtp_depth: int) -> None:
    """Which parameters train, and dense or sparse attention, per stage: pretrain trains all but the indexers with
    dense attention; dsa_warmup the indexers alone (their KL to the dense attention); sparse everything, with DSA."""
    for name, p in model.named_parameters():
        indexer = ".indexer." in name
        train = {"pretrain": not indexer, "dsa_warmup": indexer, "sparse": True}[stage]
        if name.startswith("mtp.") and mtp_depth == 0:
            train = False  # unused parameters would stall DDP's gradient buckets
        p.requires_grad_(train)
    model.impl = Impl(attn=model.impl.attn, dsa="auto" if stage == "sparse" else "off", moe=model.impl.moe)


def checkpoint_layers(model) -> None:
    """Activation checkpointing without changing parameter names: each decoder layer's forward is recomputed in the
    backward pass (non-reentrant, so the side outputs the layer records still get gradients)."""
    for layer in [*model.model.layers, *model.mtp]:
        layer.forward = functools.partial(activation_checkpoint, layer.forward, use_reentrant=False)


def wrap_parallel(net, model, parallel: str, world: int, device: torch.device):
    if world == 1:
        return net
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        for layer in model.mtp:
            # mtp_step uses the MTP layer's own enorm / hnorm / eh_proj before calling the layer, so the layer cannot
            # be one FSDP unit: shard its attention and MoE (the bulk), and leave those small parts to the root.
            fully_shard(layer.self_attn)
            fully_shard(layer.mlp)
        fully_shard(net)  # the root: embedding, final norm, head, and the rest
        return net
    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync per forward: the MoE biases are updated identically on every rank from all-reduced loads (the
    # init-time sync is harmless: every rank built the same model).
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)


def build_source(cfg: TrainConfig, vocab_size: int):
    if cfg.data == "synthetic":
        return SyntheticDocs(vocab_size, n_docs=cfg.synthetic_docs, max_len=cfg.synthetic_max_len, seed=cfg.seed)
    return JsonlDocs(cfg.data)


def full_model_state(model, fsdp: bool):
    """Something glm5.save_checkpoint can write (on rank 0): the model itself, or its gathered FSDP2 state."""
    if not fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return SimpleNamespace(config=model.config, state_dict=lambda: sd)


def optimizer_state(model, opt, world: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt.opts, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=world > 1))


def load_optimizer_state(model, opt, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt.opts, osd, options=StateDictOptions(full_state_dict=True))


def gather_rng(world: int) -> list[dict]:
    st = ckpt.rng_state()
    if world == 1:
        return [st]
    out = [None] * world
    dist.all_gather_object(out, st)  # in-memory exchange between our own ranks (no file is unpickled)
    return out


def check_resumable(cfg: TrainConfig, saved: dict, where: Path) -> None:
    """A checkpoint continues the run that wrote it. Another stage or optimizer trains another parameter set with
    another optimizer state: that is a new run starting from the checkpoint's weights."""
    for key in ("stage", "optimizer"):
        if saved.get(key) != getattr(cfg, key):
            raise ValueError(f"{where} was written by a run with {key}={saved.get(key)!r}, this run has "
                             f"{key}={getattr(cfg, key)!r}. To start a new stage from its weights, pass "
                             f"--model {where / 'model'} and a new --out-dir instead of --resume")
    if (saved.get("mtp_depth", 0) > 0) != (cfg.mtp_depth > 0):
        raise ValueError(f"{where}: mtp_depth {saved.get('mtp_depth')} -> {cfg.mtp_depth} changes which parameters "
                         "train; start a new run from its weights (--model DIR/model) instead of --resume")
    for key in ("batch_size", "seq_len", "steps", "lr", "schedule"):
        if key in saved and saved[key] != getattr(cfg, key):
            log.warning("resuming with %s=%r (checkpoint: %r): the run will not repeat an uninterrupted one", key,
                        getattr(cfg, key), saved[key])


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -- the loop ---------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, source=None, on_step=None) -> dict:
    """Run cfg.steps optimizer steps (continuing from a checkpoint with cfg.resume). `source`: any iterable of
    token-id documents (see data.py); default from cfg.data. `on_step(record)` is called on rank 0 after every step
    (e.g. a caller's own progress display). Returns the last step's metrics."""
    rank, world = dist_info()
    cfg.validate(world)
    t = set_up(cfg, source, rank, world)
    steplog = StepLog(cfg, t, on_step)
    record: dict = {}
    saved = t.start
    for step in range(t.start, cfg.steps):
        t0 = time.perf_counter()
        batch = t.packer.next_batch()
        if batch is None:
            log.warning("data ran out after %d steps", step)
            break
        lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)
        totals, grad_norm, loads = train_step(cfg, t, batch, step, lr)
        record = step_record(cfg, step, lr, totals, grad_norm, loads, time.perf_counter() - t0)
        steplog.write(record)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            saved = save(cfg, t, step + 1)
    if record and record["step"] > saved:  # the end of the run (or of the data) is always saved
        save(cfg, t, record["step"])
    steplog.close()
    return record


@dataclass
class Training:
    """What the loop works on, from `set_up`."""
    rank: int
    world: int
    device: torch.device
    out: Path  # cfg.out_dir
    model: torch.nn.Module  # the GLM5 being trained
    net: torch.nn.Module  # its ForwardLoss, wrapped in DDP / FSDP2 with more than one process
    fsdp: bool
    params: list[torch.nn.Parameter]  # the ones this stage trains (gradient clipping)
    opt: Optimizers
    packer: Packer
    start: int  # the first step to run: 0, or the resumed checkpoint's step
    resumed_from: Path | None

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def set_up(cfg: TrainConfig, source, rank: int, world: int) -> Training:
    """The run directory, the model (the resumed checkpoint's weights, verified first, or cfg.model: a preset is
    seeded by cfg.seed), its loss module and optimizer, the data, and on resume their saved state."""
    device = torch.device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = ckpt.resolve(cfg.resume, ckpt_root)
    if not cfg.resume and ckpt.list_checkpoints(ckpt_root):
        raise ValueError(f"{ckpt_root} already holds checkpoints: pass --resume auto to continue that run, or "
                         "choose another --out-dir")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for name in ckpt.clean_stale(ckpt_root):
            log.warning("removed %s/%s, left by a save that did not finish", ckpt_root, name)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    state = None
    if resume_from is not None:
        state = ckpt.load(resume_from)  # raises CheckpointError naming the bad file: training never starts from it
        check_resumable(cfg, state["trainer_state"].get("config", {}), resume_from)
        model = load_model(resume_from / "model", dtype=torch.float32, device=device)
    else:
        model = load_model(cfg.model, dtype=torch.float32, device=device, seed=cfg.seed)
    model.train()
    set_stage(model, cfg.stage, cfg.mtp_depth)
    if cfg.activation_checkpointing:
        checkpoint_layers(model)
    net = ForwardLoss(model, cfg.stage, cfg.mtp_depth, cfg.mtp_weight, cfg.balance_weight, cfg.indexer_weight)
    fsdp = world > 1 and cfg.parallel == "fsdp"
    net = wrap_parallel(net, model, cfg.parallel, world, device)
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), sharded=fsdp)
    packer = Packer(source if source is not None else build_source(cfg, model.config.vocab_size),
                    cfg.batch_size, cfg.seq_len, model.config.vocab_size, split_docs=cfg.split_docs,
                    pad_id=model.config.pad_token_id or 0)
    start = 0
    if state is not None:
        start = state["step"]
        load_optimizer_state(model, opt, state["optimizer"])
        packer.load_state_dict(state["trainer_state"]["data"])
        ckpt.set_rng_state(state["rng"][rank % len(state["rng"])])
        if rank == 0:
            log.info("resumed from %s at step %d", resume_from, start)
    params = [p for p in model.parameters() if p.requires_grad]
    return Training(rank, world, device, out, model, net, fsdp, params, opt, packer, start, resume_from)


def train_step(cfg: TrainConfig, t: Training, batch, step: int, lr: float) -> tuple[dict, float, dict]:
    """One optimizer step on the global batch: this rank's rows in micro-batches (forward + backward), gradient clip,
    optimizer step, MoE bias update, the sparse stage's recall probe. Returns the loss and statistic sums over all
    ranks, the gradient norm and the expert loads per layer."""
    set_lr(t.opt, lr)
    depth = cfg.mtp_depth if step >= cfg.mtp_from else 0
    if cfg.mtp_from:  # one process (validate): net is the ForwardLoss itself
        t.net.mtp_depth = depth
    den = loss_denominators(batch.tokens_BT1, batch.doc_BT1, depth, batch.loss_BT1)
    rows_per_rank = cfg.batch_size // t.world
    mine = batch.rows(t.rank * rows_per_rank, (t.rank + 1) * rows_per_rank).to(t.device)
    micro = cfg.micro_batch or rows_per_rank
    sums, loads = forward_backward(cfg, t, mine, den, micro)

    grad_norm = torch.nn.utils.clip_grad_norm_(t.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    loads = all_reduce_loads(loads)
    if cfg.stage != "dsa_warmup":  # the warm-up trains the indexers and nothing else
        update_bias(t.model, loads, cfg.bias_speed)

    if cfg.stage == "sparse" and cfg.recall_every and (step + 1) % cfg.recall_every == 0:
        mb = mine.rows(0, micro)
        with torch.no_grad():  # outside the wrapper too: DDP must not expect a backward for this forward
            s, n = t.net(mb.tokens_BT1, mb.doc_BT1, mb.pos_BT1, den, None, probe_recall=True)
        sums["recall_sum"], sums["recall_n"] = s, torch.tensor(float(n))
    keys = sorted(sums)
    vec = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).reshape(()) for k in keys]),
                         t.world)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    return dict(zip(keys, vec.tolist())), float(grad_norm), loads


def forward_backward(cfg: TrainConfig, t: Training, mine, den: dict, micro: int) -> tuple[dict, dict]:
    """Forward + backward over this rank's rows, `micro` rows at a time, gradients synced after the last one.
    Returns this rank's loss and statistic sums and its expert loads per layer."""
    n_micro = cfg.batch_size // t.world // micro
    amp = torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16")
    sums: dict[str, torch.Tensor] = {}
    loads: dict[int, torch.Tensor] = {}
    for i in range(n_micro):
        mb = mine.rows(i * micro, (i + 1) * micro)
        last = i == n_micro - 1
        if t.fsdp:
            t.net.set_requires_gradient_sync(last)
        sync = t.net.no_sync() if (t.world > 1 and not t.fsdp and not last) else contextlib.nullcontext()
        with sync:
            with amp:
                total, losses, stats = t.net(mb.tokens_BT1, mb.doc_BT1, mb.pos_BT1, den, mb.loss_BT1)
            # DDP / FSDP average gradients over ranks; the losses are already global means: undo the average.
            (total * t.world).backward()
        for k, v in {"loss": total, **losses}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        if "recall_sum" in stats:
            sums["recall_sum"] = sums.get("recall_sum", 0.0) + stats["recall_sum"]
            sums["recall_n"] = sums.get("recall_n", 0.0) + torch.tensor(float(stats["recall_n"]))
        for layer, load in stats["loads"].items():
            loads[layer] = loads[layer] + load if layer in loads else load
    return sums, loads


# -- logging ----------------------------------------------------------------------------------------------------------
def step_record(cfg: TrainConfig, step: int, lr: float, totals: dict, grad_norm: float, loads: dict,
                seconds: float) -> dict:
    """One line of metrics.jsonl; raises FloatingPointError on a non-finite loss or gradient norm."""
    tokens_per_step = cfg.batch_size * cfg.seq_len
    record = {"step": step + 1, "stage": cfg.stage, "lr": lr, "loss": totals["loss"], "grad_norm": grad_norm,
              "tokens": (step + 1) * tokens_per_step, "tok_per_s": tokens_per_step / seconds, "step_s": seconds}
    for k in ("lm", "mtp", "balance", "indexer_kl"):
        if k in totals:
            record[k] = totals[k]
    if totals.get("recall_n", 0) > 0:
        record["recall"] = totals["recall_sum"] / totals["recall_n"]
    if loads:
        record["imbalance"] = {str(k): imbalance(v) for k, v in sorted(loads.items())}
        if (step + 1) % max(1, cfg.log_every) == 0:  # full per-expert fractions: E floats per layer, not every step
            record["expert_load"] = {str(k): (v / v.sum()).tolist() for k, v in sorted(loads.items())}
    if not all(math.isfinite(record[k]) for k in ("loss", "grad_norm")):
        raise FloatingPointError(f"step {step + 1}: loss {record['loss']}, grad norm {record['grad_norm']}")
    return record


class StepLog:
    """Where each step's record goes, on rank 0: metrics.jsonl, the caller's on_step, and the progress bar or (with
    it off) a log line every cfg.log_every steps. Other ranks write nothing."""

    def __init__(self, cfg: TrainConfig, t: Training, on_step=None):
        self.cfg, self.on_step = cfg, on_step
        self.metrics = self.bar = None
        self.active = t.rank == 0
        if not self.active:
            return
        self.metrics = (t.out / "metrics.jsonl").open("a")
        if t.resumed_from is not None:
            self.metrics.write(json.dumps({"event": "resume", "step": t.start, "from": str(t.resumed_from)}) + "\n")
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=t.start, desc=f"train {cfg.stage}", unit="step",
                            dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.on_step is not None:
            self.on_step(record)
        step, lr = record["step"], record["lr"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tok_per_s']:.0f}")
            self.bar.update(1)
        elif step % max(1, self.cfg.log_every) == 0:
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, self.cfg.steps, record["loss"], lr,
                     record["tok_per_s"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


# -- checkpoints ------------------------------------------------------------------------------------------------------
def save(cfg: TrainConfig, t: Training, step: int) -> int:
    """Gather everything a resume needs (collectives on every rank), write it on rank 0, refresh the plots."""
    osd = optimizer_state(t.model, t.opt, t.world)
    full = full_model_state(t.model, t.fsdp)
    rngs = gather_rng(t.world)
    if t.rank == 0:
        trainer_state = {"data": t.packer.state_dict(), "world_size": t.world, "config": dataclasses.asdict(cfg)}
        ckpt.save(t.ckpt_root, step, full, osd, rngs, trainer_state, cfg.keep_last)
        if cfg.plots:
            from .plots import write_plots

            write_plots(t.out / "metrics.jsonl", t.out)
    if t.world > 1:
        dist.barrier()  # no rank runs ahead (and could be killed) before the checkpoint exists
    return step


__all__ = ["TrainConfig", "train", "CheckpointError"]
