"""The RL policy loss: GRPO advantages, the off-policy correction of each generated token, and the PPO clip surrogate
with token-level normalisation, the loss slime trains GLM-5 with (slime/utils/ppo_utils.py, the GLM-5 run script):
no KL term, no entropy bonus.

Three log-probs of each generated token y_t meet here:
  logp       log pi_theta(y_t): the weights being optimised; the only one that carries a gradient
  logp_prox  log pi_prox(y_t): the trainer's weights when this batch's first optimizer step began (PPO's "old"
             policy, the decoupled-PPO proximal policy of AReaL). None = this step's own weights, detached: with
             one optimizer step per rollout batch r_t = 1, the clip never acts and no extra forward is needed
  logp_roll  log pi_rollout(y_t): what the engine reported when it sampled y_t, possibly several policy versions
             back and always through other kernels (training/inference mismatch)

Off-policy correction, per token, from rho_t = pi_prox / pi_rollout (slime's icepop_function and
vanilla_tis_function compare the trainer's step-start log-probs with the rollout's):
  icepop  rho_t where lo <= rho_t <= hi (default [0.5, 2]), else 0: the token is dropped (IcePop, from Ring-1T): a
          token whose probability the two sides disagree on by more than 2x (a MoE routing flip, a sparse-attention
          top-k boundary, many versions of staleness) is treated as noise and left out rather than reweighted
  tis     clamp(rho_t, lo, hi) (default [0, 2]): truncated importance sampling, keeps every token
  none    1

Letters: N loss tokens (generated tokens with loss mask 1, of every sample in the batch, flattened), G samples of one
prompt (a group), V vocabulary, D model dim.
"""

from __future__ import annotations

import math

import torch

from ..train.losses import linear_ce

CORRECTIONS = ("icepop", "tis", "none")
DEFAULT_BOUNDS = {"icepop": (0.5, 2.0), "tis": (0.0, 2.0), "none": (0.0, math.inf)}
EPS_LOW, EPS_HIGH = 0.2, 0.28  # DAPO clip-higher: more room to raise unlikely tokens than to lower likely ones


def grpo_advantages(rewards_G: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean(r) over the group (the last dim, so [..., G] holds many groups), optionally / (std + eps).
    GLM-5-era slime runs leave std normalisation off: it inflates near-uniform groups (one lucky sample among
    identical ones gets a huge advantage) and biases towards easy and impossible prompts (Dr. GRPO). The std is the
    population one (unbiased=False), so a group of 2 gives advantages of +-1 exactly."""
    r_G = rewards_G.float()  # rewards may come as ints or bf16; advantages are fp32
    adv_G = r_G - r_G.mean(-1, keepdim=True)
    if std_normalize:
        adv_G = adv_G / (r_G.std(-1, unbiased=False, keepdim=True) + eps)
    return adv_G


def _fp32_up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, for reference computations): exp(logp - logp_prox) amplifies bf16 rounding."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bounds(method: str, bounds: tuple[float, float] | None) -> tuple[float, float]:
    if method not in CORRECTIONS:
        raise ValueError(f"off-policy correction must be one of {', '.join(CORRECTIONS)}, got {method!r}")
    lo, hi = DEFAULT_BOUNDS[method] if bounds is None else bounds
    if not 0 <= lo <= 1 <= hi:
        raise ValueError(f"correction bounds must satisfy 0 <= lo <= 1 <= hi (rho = 1 is on-policy and must be "
                         f"kept), got ({lo}, {hi})")
    return lo, hi


def correction_weights(logp_prox_N: torch.Tensor, logp_roll_N: torch.Tensor, method: str = "icepop",
                       bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """The per-token weight of the off-policy correction (detached; at least fp32). See the module docstring."""
    lo, hi = _bounds(method, bounds)
    log_rho_N = _fp32_up(logp_prox_N.detach()) - _fp32_up(logp_roll_N.detach())
    if method == "none":
        return torch.ones_like(log_rho_N)
    # Compare and clamp in log space: a token the rollout thought near-impossible has rho = exp(+large) = inf, and
    # inf * 0 would turn a dropped token into NaN.
    log_lo = math.log(lo) if lo > 0 else -math.inf
    rho_N = log_rho_N.clamp(max=math.log(hi)).exp()
    if method == "tis":
        return rho_N.clamp(min=lo)
    keep_N = (log_rho_N >= log_lo) & (log_rho_N <= math.log(hi))
    return torch.where(keep_N, rho_N, torch.zeros_like(rho_N))


def ppo_token_terms(logp_N: torch.Tensor, logp_prox_N: torch.Tensor, adv_N: torch.Tensor, corr_N: torch.Tensor,
                    eps_low: float = EPS_LOW, eps_high: float = EPS_HIGH):
    """Per token: (loss_N, w_N = d loss / d CE_N, clipped_N). loss_N is differentiable in logp_N (the reference path
    lets autograd take its gradient); w_N is that gradient in closed form, which the fused path uses.

    loss_t = c_t * max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t),  r_t = exp(logp_t - logp_prox_t),
    with c_t (the correction weight), logp_prox_t and A_t constants: only logp_t depends on theta.

    Its gradient: d r_t / d theta = r_t * d logp_t / d theta. The clipped term is constant in theta wherever the
    clip acts, so the max passes a gradient only when the unclipped term is the larger (r_t <= 1 + eps_high for
    A_t >= 0, r_t >= 1 - eps_low for A_t < 0; where both are equal, inside the clip range, their gradients agree):
        d loss_t / d theta = -c_t A_t r_t [unclipped_t] d logp_t / d theta
    and since CE_t = -logp_t,
        d loss_t / d theta = w_t d CE_t / d theta,   w_t = c_t A_t r_t [unclipped_t]   (a detached constant).
    So the policy gradient is a cross-entropy gradient with per-token weights w_t: what linear_ce computes, chunk by
    chunk, without the [N, V] logits. With logp_prox = logp (one step per batch), r_t = 1 and w_t = c_t A_t:
    REINFORCE with the group mean as baseline, corrected token by token."""
    r_N = (logp_N - logp_prox_N).exp()
    unclipped_N = -r_N * adv_N
    clipped_N = -r_N.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_N
    loss_N = corr_N * torch.maximum(unclipped_N, clipped_N)
    w_N = corr_N * adv_N * r_N * (unclipped_N >= clipped_N)
    return loss_N, w_N, unclipped_N < clipped_N


def _check(adv_N, logp_roll_N, logp_prox_N, n: int, den: float | None) -> float:
    for name, t in (("adv_N", adv_N), ("logp_roll_N", logp_roll_N), ("logp_prox_N", logp_prox_N)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}] (one value per loss token), got {tuple(t.shape)}")
    den = float(n if den is None else den)
    if den <= 0:
        raise ValueError(f"den (the number of loss tokens in the whole batch) must be > 0, got {den}")
    return den


def ppo_loss(logp_N: torch.Tensor, logp_roll_N: torch.Tensor, adv_N: torch.Tensor,
             logp_prox_N: torch.Tensor | None = None, den: float | None = None, eps_low: float = EPS_LOW,
             eps_high: float = EPS_HIGH, correction: str = "icepop", bounds: tuple[float, float] | None = None):
    """The reference path: the loss from log-probs already computed (logp_N differentiable, e.g. from full logits),
    differentiated by autograd through the max and the clip. Returns (loss, stats) with stats as in ppo_head_loss.
    den: the number of loss tokens of the whole optimizer step (default N): token-level normalisation, so a long
    answer weighs by its tokens, and micro-batches sum to the step's mean."""
    den = _check(adv_N, logp_roll_N, logp_prox_N, logp_N.shape[0], den)
    logp_N = _fp32_up(logp_N)
    prox_N = logp_N.detach() if logp_prox_N is None else _fp32_up(logp_prox_N.detach())
    corr_N = correction_weights(prox_N, logp_roll_N, correction, bounds)
    loss_N, _, clip_N = ppo_token_terms(logp_N, prox_N, _fp32_up(adv_N.detach()), corr_N, eps_low, eps_high)
    return loss_N.sum() / den, {"logp": logp_N.detach(), "corr": corr_N, "clipped": clip_N.detach()}


def _ppo_head(h_ND, W_VD, want_h, want_W, tok_N, adv_N, logp_roll_N, logp_prox_N, den, eps_low, eps_high,
              correction, bounds):
    """One linear_ce pass whose per-token weights are computed inside its chunk loop from each chunk's own
    log-probs -> (loss, d/dh or None, d/dW or None, logp_N, corr_N, clipped_N)."""
    n, dev = tok_N.shape[0], h_ND.device
    loss_N, logp_N, corr_N = torch.zeros(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    clip_N = torch.zeros(n, dtype=torch.bool, device=dev)

    def weight(rows: slice, ce_c: torch.Tensor) -> torch.Tensor:
        logp_c = -ce_c
        prox_c = logp_c if logp_prox_N is None else logp_prox_N[rows].float()
        corr_c = correction_weights(prox_c, logp_roll_N[rows], correction, bounds)
        loss_c, w_c, clip_c = ppo_token_terms(logp_c, prox_c, adv_N[rows].float(), corr_c, eps_low, eps_high)
        loss_N[rows], logp_N[rows], corr_N[rows], clip_N[rows] = loss_c, logp_c, corr_c, clip_c
        return w_c / den

    _, gh_ND, gW_VD = linear_ce(h_ND, W_VD, tok_N, want_h, want_W, weight)
    return loss_N.sum() / den, gh_ND, gW_VD, logp_N, corr_N, clip_N


class _PPOHead(torch.autograd.Function):
    """_ppo_head under autograd: the forward already holds the gradients (the loss is a scalar), backward scales."""

    @staticmethod
    def forward(ctx, h_ND, W_VD, *args):
        loss, gh_ND, gW_VD, logp_N, corr_N, clip_N = _ppo_head(h_ND, W_VD, ctx.needs_input_grad[0],
                                                               ctx.needs_input_grad[1], *args)
        ctx.save_for_backward(gh_ND, gW_VD)
        ctx.dtypes = h_ND.dtype, W_VD.dtype
        ctx.n_args = len(args)
        ctx.mark_non_differentiable(logp_N, corr_N, clip_N)
        return loss, logp_N, corr_N, clip_N

    @staticmethod
    def backward(ctx, g, *_):
        gh_ND, gW_VD = ctx.saved_tensors
        gh = None if gh_ND is None else (gh_ND * g).to(ctx.dtypes[0])
        gW = None if gW_VD is None else (gW_VD * g).to(ctx.dtypes[1])
        return gh, gW, *([None] * ctx.n_args)


def ppo_head_loss(h_ND: torch.Tensor, W_VD: torch.Tensor, tok_N: torch.Tensor, adv_N: torch.Tensor,
                  logp_roll_N: torch.Tensor, logp_prox_N: torch.Tensor | None = None, den: float | None = None,
                  eps_low: float = EPS_LOW, eps_high: float = EPS_HIGH, correction: str = "icepop",
                  bounds: tuple[float, float] | None = None):
    """The policy loss straight from the final hidden states of the loss tokens (h_ND, already normed; the caller
    selects rows by loss mask, so prompt and tool-result tokens never reach the head) and the vocabulary head W_VD:
    the same value and gradients as ppo_loss over log_softmax(h @ W.T), without the [N, V] logits (one fused pass;
    ppo_token_terms says why a weighted cross-entropy gradient is the policy gradient).
    Returns (loss, stats): stats["logp"] [N] this pass's log-probs (detached), stats["corr"] [N] the correction
    weights (0 = dropped by IcePop), stats["clipped"] [N] where the clip removed the gradient."""
    den = _check(adv_N, logp_roll_N, logp_prox_N, tok_N.shape[0], den)
    _bounds(correction, bounds)  # a bad option fails here, not inside the chunk loop
    args = (tok_N, adv_N.detach(), logp_roll_N.detach(), None if logp_prox_N is None else logp_prox_N.detach(), den,
            eps_low, eps_high, correction, bounds)
    if torch.is_grad_enabled() and (h_ND.requires_grad or W_VD.requires_grad):
        loss, logp_N, corr_N, clip_N = _PPOHead.apply(h_ND, W_VD, *args)
    else:
        loss, _, _, logp_N, corr_N, clip_N = _ppo_head(h_ND.detach(), W_VD.detach(), False, False, *args)
    return loss, {"logp": logp_N, "corr": corr_N, "clipped": clip_N}


@torch.no_grad()
def token_logprobs(h_ND: torch.Tensor, W_VD: torch.Tensor, tok_N: torch.Tensor) -> torch.Tensor:
    """log p(tok[n] | h[n]) = -CE [N] (fp32), chunked through linear_ce: the trainer's log-probs of the sampled
    tokens, for logp_prox before several optimizer steps on one batch, and to compare with the engine's."""
    logp_N = torch.zeros(tok_N.shape[0], device=h_ND.device)

    def record(rows: slice, ce_c: torch.Tensor) -> torch.Tensor:
        logp_N[rows] = -ce_c
        return torch.zeros_like(ce_c)  # the weighted sum linear_ce returns is not needed

    linear_ce(h_ND, W_VD, tok_N, w_N=record)
    return logp_N
