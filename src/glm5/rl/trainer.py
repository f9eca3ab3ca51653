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


def train_step(model, opt: torch.optim.Optimizer, groups: list, cfg: RLTrainConfig) -> dict:
    """One optimizer step on the groups (glm5.rl.buffer.Group, data = {"samples": [{"ids", "mask", "logprobs"}]}).
    Token-level normalisation over the whole step: every loss token weighs the same, however the micro-batches
    fall."""
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
    model.train()
    W = model.lm_head.weight
    stats = {"loss": 0.0, "tokens": den, "masked": 0, "clipped": 0, "kl_roll": 0.0}
    for mb in _micro_batches(samples, cfg.micro_batch_tokens):
        ids_BT, mask_BT, roll_BT = _pack([samples[i] for i in mb], W.device)
        adv_BT = torch.tensor([adv[i] for i in mb], dtype=torch.float32, device=W.device)[:, None].expand_as(roll_BT)
        h_BTD = model.hidden(ids_BT)[:, :-1]
        loss, st = ppo_head_loss(h_BTD[mask_BT], W, ids_BT[:, 1:][mask_BT], adv_BT[mask_BT], roll_BT[mask_BT],
                                 den=den, eps_low=cfg.eps_low, eps_high=cfg.eps_high, correction=cfg.correction)
        if mtp and den_mtp:
            l_mtp = mtp_loss_sum(model, h_BTD, ids_BT, mask_BT) / den_mtp
            stats["mtp_loss"] = stats.get("mtp_loss", 0.0) + float(l_mtp.detach())
            loss = loss + cfg.mtp_weight * l_mtp
        loss.backward()
        stats["loss"] += float(loss.detach())
        stats["masked"] += int((st["corr"] == 0).sum())
        stats["clipped"] += int(st["clipped"].sum())
        stats["kl_roll"] += float((roll_BT[mask_BT] - st["logp"]).sum())  # E[log pi_roll - log pi_train] (k1)
    stats["kl_roll"] /= den
    params = [p for grp in opt.param_groups for p in grp["params"]]
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return stats
