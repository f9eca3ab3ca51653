"""The RL trainer: one optimizer step on a batch of groups, with the policy loss of glm5.rl.loss.

What trains: every parameter except the DSA indexers (frozen during RL, as GLM-5 does: the indexer was fitted to the
model's attention in the DSA stages, and the policy gradient says nothing about which keys to keep). The MoE router's
load-balancing bias is not updated (the bias update is a pre-training device; RL leaves routing to the gradient).

The MTP layer (optional, mtp_weight > 0): the policy gradient never reaches it (it is not on the path from the ids to
the main head), so after RL its drafts would describe the old policy and speculative decoding would accept fewer of
them. With mtp_weight > 0 it trains on the sampled sequences to predict each sampled token two ahead (cross-entropy,
as in pre-training), with the main model's hidden states, the token embeddings and the shared head detached: it
follows the policy, and the policy's own gradient stays the RL loss's alone.

A sample's ids are fed whole (prompt, sampled turns, tool answers); the loss reads only positions whose next token
the policy sampled (mask 1), so prompt and tool-result ids shape the context but never reach the head.

Letters: B samples in a micro-batch, T tokens (padded), D model dim, N loss tokens, G samples of one group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..train.losses import linear_ce_loss
from .loss import EPS_HIGH, EPS_LOW, grpo_advantages, ppo_head_loss, token_logprobs


@dataclass
class RLTrainConfig:
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    correction: str = "icepop"
    eps_low: float = EPS_LOW
    eps_high: float = EPS_HIGH
    std_normalize: bool = False
    micro_batch_tokens: int = 8192  # padded tokens per forward; a step accumulates micro-batches
    mtp_weight: float = 0.0  # > 0: the MTP layer follows the policy (see the module docstring)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """Freezes the indexers; returns what the optimizer updates."""
    params = []
    for name, p in model.named_parameters():
        if ".indexer." in name:
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    return params


def make_optimizer(model, cfg: RLTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _pack(samples: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], the loss mask of the *next* token at each position [B, T-1], and the behaviour
    log-probs aligned with that mask [B, T-1]. Causal attention: the pad after a sample never reaches its tokens."""
    T = max(len(s["ids"]) for s in samples)
    B = len(samples)
    ids_BT = torch.zeros(B, T, dtype=torch.long)
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    roll_BT = torch.zeros(B, T, dtype=torch.float32)
    for b, s in enumerate(samples):
        n = len(s["ids"])
        ids_BT[b, :n] = torch.tensor(s["ids"])
        mask_BT[b, :n] = torch.tensor(s["mask"], dtype=torch.bool)
        roll_BT[b, :n] = torch.tensor(s["logprobs"], dtype=torch.float32)
    return ids_BT.to(device), mask_BT[:, 1:].to(device), roll_BT[:, 1:].to(device)


def _micro_batches(samples: list[dict], max_tokens: int) -> list[list[int]]:
    """Sample indices in micro-batches of at most max_tokens padded tokens (longest first, so padding stays small)."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["ids"]))
    out, cur, width = [], [], 0
    for i in order:
        n = len(samples[i]["ids"])
        if cur and max(width, n) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, n)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def sample_logprobs(model, samples: list[dict], micro_batch_tokens: int = 8192) -> list[torch.Tensor]:
    """The trainer's log-prob of every sampled token (mask 1), per sample [n_i]: to compare with the engine's."""
    out: list[torch.Tensor | None] = [None] * len(samples)
    W_VD = model.lm_head.weight
    for mb in _micro_batches(samples, micro_batch_tokens):
        ids_BT, mask_BT, _ = _pack([samples[i] for i in mb], W_VD.device)
        h_BTD = model.hidden(ids_BT)[:, :-1]
        for b, i in enumerate(mb):
            m = mask_BT[b]
            out[i] = token_logprobs(h_BTD[b][m], W_VD, ids_BT[b, 1:][m])
    return out


def mtp_loss_sum(model, h_BTD: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the MTP layer's prediction of every sampled token two ahead: from the main hidden
    state at t (h_BTD: positions 0 .. T-2) and token t+1, token t+2 where the policy sampled it (mask_BT[:, t+1]).
    Hidden states, embeddings and the head's weight enter detached: only the MTP layer's own weights get gradients."""
    T = ids_BT.shape[1]
    keep_Bn = mask_BT[:, 1:]  # [B, T-2]: is token t+2 sampled
    if T < 3 or not keep_Bn.any():
        return h_BTD.new_zeros(())
    n = T - 2
    pos_Bn = torch.arange(n, device=ids_BT.device).expand(ids_BT.shape[0], n)
    next_Bn = ids_BT[:, 1:T - 1]
    e_BnD = model.model.embed_tokens(next_Bn).detach()
    x_BnD = model.mtp_hidden(h_BTD[:, :n].detach(), next_Bn, pos_Bn, embeds_BTD=e_BnD)
    x_ND = model.mtp[0].shared_head.norm(x_BnD[keep_Bn])
    return linear_ce_loss(x_ND, model.lm_head.weight.detach(), ids_BT[:, 2:][keep_Bn])


def shard(samples: list[dict], world: int) -> list[list[int]]:
    """Sample indices per rank, balanced by tokens: longest first, each to the rank with the fewest tokens so far
    (ties to the lower rank), so the first `world` samples give every rank one. Each rank's list is ascending, so
    one rank's share is the samples in their batch order."""
    if len(samples) < world:
        raise ValueError(f"a batch of {len(samples)} samples cannot be split between {world} trainer ranks")
    shares, load = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i]["ids"])):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += len(samples[i]["ids"])
    return [sorted(s) for s in shares]


class PolicyLoss(torch.nn.Module):
    """The model and the policy loss of one micro-batch (plus the MTP layer's, with mtp_weight), as one module: what
    DDP wraps, since its gradient hooks arm in the wrapper's forward and so the loss must be computed inside it.
    forward -> (loss, ppo_head_loss's stats, the MTP loss or None)."""

    def __init__(self, model, cfg: RLTrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, ids_BT, mask_BT, roll_BT, adv_BT, den: int, den_mtp: int):
        model, cfg = self.model, self.cfg
        h_BTD = model.hidden(ids_BT)[:, :-1]
        loss, st = ppo_head_loss(h_BTD[mask_BT], model.lm_head.weight, ids_BT[:, 1:][mask_BT], adv_BT[mask_BT],
                                 roll_BT[mask_BT], den=den, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                 correction=cfg.correction)
        l_mtp = None
        if cfg.mtp_weight > 0 and den_mtp:
            l_mtp = mtp_loss_sum(model, h_BTD, ids_BT, mask_BT) / den_mtp
            loss = loss + cfg.mtp_weight * l_mtp
        return loss, st, l_mtp


def ddp_policy_loss(model, cfg: RLTrainConfig):
    """PolicyLoss under DDP, in a process group already up (glm5.rl.ray_trainer). Without mtp_weight the MTP layer
    takes no gradient, and DDP fails the next step over a parameter that wants one and never got it: its parameters
    stop wanting one (AdamW skips a parameter without a gradient either way, so nothing else changes). With
    mtp_weight a micro-batch without a token two ahead skips the MTP layer: find_unused_parameters."""
    from torch.nn.parallel import DistributedDataParallel

    if cfg.mtp_weight == 0:
        for p in model.mtp.parameters():
            p.requires_grad_(False)
    # No buffer sync per forward: RL changes no buffer (the router bias stays), and every rank loaded the same.
    return DistributedDataParallel(PolicyLoss(model, cfg), forward_sync_buffers=False,
                                   find_unused_parameters=cfg.mtp_weight > 0)


def train_step(model, opt: torch.optim.Optimizer, groups: list, cfg: RLTrainConfig, net=None, rank: int = 0,
               world: int = 1) -> dict:
    """One optimizer step on the groups (glm5.rl.buffer.Group, data = {"samples": [{"ids", "mask", "logprobs"}]}).
    Token-level normalisation over the whole step: every loss token weighs the same, however the micro-batches
    fall.

    With world > 1 ranks (glm5.rl.ray_trainer), every rank holds the whole batch and this runs on each: net is
    ddp_policy_loss(model), the rank trains on its share (shard), and the denominator is still the whole batch's
    token count, which every rank computes alike from the batch it holds. Each rank's loss is its tokens' sum over
    that global count, so the sum over ranks is the one-rank loss; DDP averages gradients over ranks, and each
    backward is scaled by world to undo the average (as glm5.train.loop does). The statistics are summed over
    ranks; every rank clips the same all-reduced gradients and steps the same replica."""
    samples, adv = [], []
    for g in groups:
        a_G = grpo_advantages(torch.tensor([float(r) for r in g.rewards]), cfg.std_normalize)
        samples += g.data["samples"]
        adv += a_G.tolist()
    den = sum(sum(s["mask"][1:]) for s in samples)
    if den == 0:
        raise ValueError("the batch has no sampled token to train on")
    mtp = cfg.mtp_weight > 0
    if mtp and not len(model.mtp):
        raise ValueError("mtp_weight > 0 but the model has no MTP layer (num_nextn_predict_layers = 0)")
    den_mtp = sum(sum(s["mask"][2:]) for s in samples)
    if net is None and world > 1:
        raise ValueError(f"train_step on rank {rank} of {world}: pass net = ddp_policy_loss(model, cfg)")
    net = PolicyLoss(model, cfg) if net is None else net
    mine = shard(samples, world)[rank]
    model.train()
    W = model.lm_head.weight
    stats = {"loss": 0.0, "tokens": den, "masked": 0, "clipped": 0, "kl_roll": 0.0}
    mbs = [[mine[j] for j in mb] for mb in _micro_batches([samples[i] for i in mine], cfg.micro_batch_tokens)]
    for n, mb in enumerate(mbs):
        ids_BT, mask_BT, roll_BT = _pack([samples[i] for i in mb], W.device)
        adv_BT = torch.tensor([adv[i] for i in mb], dtype=torch.float32, device=W.device)[:, None].expand_as(roll_BT)
        # DDP all-reduces the gradients in the last micro-batch's backward; the others accumulate locally
        sync = net.no_sync() if world > 1 and n < len(mbs) - 1 else contextlib.nullcontext()
        with sync:
            loss, st, l_mtp = net(ids_BT, mask_BT, roll_BT, adv_BT, den, den_mtp)
            (loss * world).backward()  # world 1: exactly loss.backward()
        if l_mtp is not None:
            stats["mtp_loss"] = stats.get("mtp_loss", 0.0) + float(l_mtp.detach())
        stats["loss"] += float(loss.detach())
        stats["masked"] += int((st["corr"] == 0).sum())
        stats["clipped"] += int(st["clipped"].sum())
        stats["kl_roll"] += float((roll_BT[mask_BT] - st["logp"]).sum())  # E[log pi_roll - log pi_train] (k1)
    if world > 1:
        _sum_over_ranks(stats, ("loss", "masked", "clipped", "kl_roll") + (("mtp_loss",) if mtp and den_mtp else ()))
    stats["kl_roll"] /= den
    params = [p for grp in opt.param_groups for p in grp["params"]]
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return stats


def _sum_over_ranks(stats: dict, keys: tuple) -> None:
    import torch.distributed as dist

    v = torch.tensor([float(stats.get(k, 0.0)) for k in keys], dtype=torch.float64)  # fp64: the counts stay exact
    dist.all_reduce(v)
    for k, x in zip(keys, v.tolist()):
        stats[k] = int(x) if isinstance(stats.get(k), int) else x


def save_state(root, step: int, model, opt, rl_state: dict, keep_last: int):
    """An RL checkpoint (glm5.train.checkpoint): the model, the optimizer's full state, this process's RNG and the
    loop's state. Written by the one process that holds the trainer: the driver, or trainer rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from ..train import checkpoint as ckpt

    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return ckpt.save(root, step, model, osd, [ckpt.rng_state()], {"rl": rl_state}, keep_last)


def load_state(path, saved: dict, model, opt=None) -> None:
    """The model, the optimizer (when there is one) and the RNG of checkpoint `path` (saved = ckpt.load(path))."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from ..train import checkpoint as ckpt

    ckpt.load_model_weights(model, path)
    if opt is not None:
        set_optimizer_state_dict(model, opt, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    ckpt.set_rng_state(saved["rng"][0])
