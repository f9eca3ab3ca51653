"""The RL policy loss: advantages, the off-policy correction, the clip, a hand-computed example, and the fused head
path against autograd through the full logits."""

import math

import pytest
import torch

from glm5.rl.loss import (correction_weights, grpo_advantages, ppo_head_loss, ppo_loss, ppo_token_terms,
                          token_logprobs)
from glm5.train.losses import HEAD_CHUNK, linear_ce

LOG = math.log


def test_grpo_advantages_mean_and_optional_std():
    r_G = torch.tensor([1.0, 0.0, 0.0, -1.0])
    torch.testing.assert_close(grpo_advantages(r_G), torch.tensor([1.0, 0.0, 0.0, -1.0]))  # mean 0
    r_G = torch.tensor([1.0, 1.0, 1.0, -1.0])  # mean 0.5, population std sqrt(0.75)
    torch.testing.assert_close(grpo_advantages(r_G), torch.tensor([0.5, 0.5, 0.5, -1.5]))
    s = math.sqrt(0.75)
    torch.testing.assert_close(grpo_advantages(r_G, std_normalize=True),
                               torch.tensor([0.5, 0.5, 0.5, -1.5]) / (s + 1e-6))
    # many groups on the last dim, each normalised on its own; an all-equal group gives zeros (no NaN with std)
    r_BG = torch.tensor([[1, 0], [1, 1]])
    torch.testing.assert_close(grpo_advantages(r_BG, std_normalize=True), torch.tensor([[1.0, -1.0], [0.0, 0.0]]),
                               atol=1e-5, rtol=0)


def test_icepop_drops_tokens_outside_half_to_two():
    rho_N = torch.tensor([0.3, 0.49, 0.5, 0.9, 1.0, 1.7, 2.0, 2.01, 5.0, math.inf], dtype=torch.float64)
    logp_roll_N = torch.zeros(10, dtype=torch.float64)
    logp_prox_N = rho_N.log()  # rho = exp(prox - roll); the ends 0.5 and 2 land exactly on the bounds
    w_N = correction_weights(logp_prox_N, logp_roll_N, "icepop")
    keep = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)  # [0.5, 2], both ends included
    torch.testing.assert_close(w_N, torch.where(keep, rho_N, 0.0))
    assert torch.isfinite(w_N).all()  # rho = inf is a dropped token, not a NaN
    # bounds are configurable; TIS clamps to [0, 2] and keeps every token; none weighs all 1
    w_N = correction_weights(logp_prox_N, logp_roll_N, "icepop", bounds=(0.2, 5.0))
    torch.testing.assert_close(w_N, torch.where(rho_N <= 5.0, rho_N, 0.0))
    w_N = correction_weights(logp_prox_N, logp_roll_N, "tis")
    torch.testing.assert_close(w_N, rho_N.clamp(max=2.0))
    torch.testing.assert_close(correction_weights(logp_prox_N, logp_roll_N, "none"),
                               torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="icepop, tis, none"):
        correction_weights(logp_prox_N, logp_roll_N, "is")
    with pytest.raises(ValueError, match="lo <= 1 <= hi"):
        correction_weights(logp_prox_N, logp_roll_N, "icepop", bounds=(1.5, 2.0))


# The 3-token example, written out (eps_low 0.2, eps_high 0.28; rho = pi_prox / pi_roll; r = pi / pi_prox):
#   t1: pi 0.7, pi_prox 0.5, pi_roll 0.4, A = +1: r = 1.4 > 1.28, so max(-1.4, -1.28) = -1.28 (clipped);
#       rho = 1.25 kept: loss -1.25 * 1.28 = -1.6; gradient 0 (the clip acts)
#   t2: pi 0.45, pi_prox 0.5, pi_roll 0.5, A = -1: r = 0.9 inside [0.8, 1.28]: max(0.9, 0.9) = 0.9; rho = 1;
#       loss 0.9; d loss / d logp = -rho A r = 0.9
#   t3: pi 0.5, pi_prox 0.5, pi_roll 0.2, A = +2: rho = 2.5 > 2: IcePop drops it: loss 0, gradient 0
#   L = (-1.6 + 0.9 + 0) / 3 = -0.7 / 3;  dL/dlogp = [0, 0.3, 0]
# With TIS t3 counts with rho clamped to 2: loss_3 = 2 * -(1 * 2) = -4, L = -4.7 / 3, dL/dlogp_3 = -2 * 2 / 3;
# with no correction: (-1.28 + 0.9 - 2) / 3 = -2.38 / 3.
HAND = dict(pi=[0.7, 0.45, 0.5], prox=[0.5, 0.5, 0.5], roll=[0.4, 0.5, 0.2], adv=[1.0, -1.0, 2.0])


def test_loss_equals_hand_computed_three_token_example():
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND.items()}
    for correction, want, want_grad in (("icepop", -0.7 / 3, [0.0, 0.3, 0.0]),
                                        ("tis", -4.7 / 3, [0.0, 0.3, -4.0 / 3]),
                                        ("none", -2.38 / 3, [0.0, 0.3, -2.0 / 3])):
        logp_N = t["pi"].log().requires_grad_()
        loss, stats = ppo_loss(logp_N, t["roll"].log(), t["adv"], logp_prox_N=t["prox"].log(), correction=correction)
        assert loss.item() == pytest.approx(want, abs=1e-6), correction
        loss.backward()
        torch.testing.assert_close(logp_N.grad.float(), torch.tensor(want_grad), atol=1e-6, rtol=0)
        assert stats["clipped"].tolist() == [True, False, False]
    # icepop's per-token stats: token 3 dropped
    _, stats = ppo_loss(t["pi"].log(), t["roll"].log(), t["adv"], logp_prox_N=t["prox"].log())
    torch.testing.assert_close(stats["corr"], torch.tensor([1.25, 1.0, 0.0], dtype=torch.float64))
    # den is the token count of the whole step: a micro-batch divides by it, not by its own length
    loss, _ = ppo_loss(t["pi"].log(), t["roll"].log(), t["adv"], logp_prox_N=t["prox"].log(), den=6)
    assert loss.item() == pytest.approx(-0.7 / 6, abs=1e-6)


@pytest.mark.parametrize("adv", [1.5, -1.5])
def test_clip_acts_on_the_right_side_for_each_advantage_sign(adv):
    """A > 0: a ratio above 1 + eps_high is clipped (no push further up), below 1 - eps_low it is not. A < 0: below
    1 - eps_low is clipped (no push further down), above 1 + eps_high it is not (a bad token that grew keeps its
    full penalty)."""
    r_N = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0], dtype=torch.float64)
    logp_N = r_N.log().requires_grad_()  # logp_prox = 0
    zeros_N = torch.zeros(7, dtype=torch.float64)
    adv_N = torch.full((7,), adv, dtype=torch.float64)
    loss, stats = ppo_loss(logp_N, zeros_N, adv_N, logp_prox_N=zeros_N, correction="none", den=1)
    loss.backward()
    if adv > 0:
        clipped = r_N > 1.28
        want_loss_N = -torch.minimum(r_N, torch.tensor(1.28, dtype=torch.float64)) * adv
    else:
        clipped = r_N < 0.8
        want_loss_N = torch.maximum(r_N, torch.tensor(0.8, dtype=torch.float64)) * -adv
    assert stats["clipped"].tolist() == clipped.tolist()
    assert 0 < int(clipped.sum()) < 7
    assert loss.item() == pytest.approx(want_loss_N.sum().item(), abs=1e-9)
    # gradient: -A r where the clip does not act, 0 where it does
    torch.testing.assert_close(logp_N.grad, torch.where(clipped, 0.0, -adv * r_N))
    # the closed-form weight the fused path uses is minus that gradient (CE = -logp)
    _, w_N, clip_N = ppo_token_terms(logp_N.detach(), zeros_N, adv_N, torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(w_N, -logp_N.grad)
    assert clip_N.tolist() == clipped.tolist()


def test_linear_ce_per_token_weights_match_weighted_full_logits():
    g = torch.Generator().manual_seed(0)
    N, D, V = HEAD_CHUNK + 37, 6, 13
    h = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, V, (N,), generator=g)
    w_N = torch.randn(N, generator=g, dtype=torch.float64)
    loss, gh, gW = linear_ce(h.detach(), W.detach(), lab, True, True, w_N)
    want = (torch.nn.functional.cross_entropy(h @ W.T, lab, reduction="none") * w_N).sum()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh.double(), h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gW.double(), W.grad, rtol=1e-5, atol=1e-6)


def _tiny_batch(seed: int):
    """A tiny 'model' (a linear layer and an RMSNorm in front of the head) over more rows than one head chunk,
    with proximal and rollout log-probs perturbed so that some tokens are clipped and some dropped by IcePop."""
    g = torch.Generator().manual_seed(seed)
    N, D, V = HEAD_CHUNK + 90, 8, 17
    torch.manual_seed(seed)
    body, norm = torch.nn.Linear(D, D).double(), torch.nn.RMSNorm(D).double()
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    x_ND = torch.randn(N, D, generator=g, dtype=torch.float64)
    tok_N = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        logp_N = (norm(body(x_ND)) @ W.T).log_softmax(-1).gather(1, tok_N[:, None])[:, 0]
    logp_prox_N = logp_N + torch.randn(N, generator=g, dtype=torch.float64) * 0.3
    logp_roll_N = logp_prox_N + torch.randn(N, generator=g, dtype=torch.float64) * 0.5
    adv_N = torch.randn(N // 6 + 1, generator=g, dtype=torch.float64).repeat_interleave(6)[:N]  # 6 tokens a sample
    return body, norm, W, x_ND, tok_N, adv_N, logp_roll_N, logp_prox_N


@pytest.mark.parametrize("correction", ["icepop", "tis", "none"])
@pytest.mark.parametrize("with_prox", [True, False])
def test_fused_head_loss_matches_autograd_through_full_logits(correction, with_prox):
    body, norm, W, x_ND, tok_N, adv_N, logp_roll_N, logp_prox_N = _tiny_batch(seed=1)
    prox = logp_prox_N if with_prox else None
    results = []
    for fused in (True, False):
        body.zero_grad(), norm.zero_grad()
        W.grad = None
        h_ND = norm(body(x_ND))
        if fused:
            loss, stats = ppo_head_loss(h_ND, W, tok_N, adv_N, logp_roll_N, prox, den=700, correction=correction)
        else:  # the reference: [N, V] logits, log-softmax, autograd through the surrogate
            logp_N = (h_ND @ W.T).log_softmax(-1).gather(1, tok_N[:, None])[:, 0]
            loss, stats = ppo_loss(logp_N, logp_roll_N, adv_N, prox, den=700, correction=correction)
        loss.mul(1.3).backward()  # a non-unit upstream gradient
        results.append((loss.detach(), stats, W.grad.clone(), body.weight.grad.clone(), norm.weight.grad.clone()))
    (lf, sf, *gf), (lr, sr, *gr) = results
    if correction == "icepop":
        assert 0 < int((sf["corr"] == 0).sum()) < len(tok_N) // 2  # some tokens really are dropped
    if with_prox:
        assert 0 < int(sf["clipped"].sum())  # and some really are clipped
    else:
        assert not sf["clipped"].any()  # r = 1: the clip never acts
    assert abs(lr.item()) > 1e-3
    # linear_ce's softmax is fp32 even for fp64 inputs: fp32-level agreement, far below the gradients' size
    torch.testing.assert_close(lf.double(), lr, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sf["logp"].double(), sr["logp"].double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(sf["corr"] == 0, sr["corr"] == 0) and torch.equal(sf["clipped"], sr["clipped"])
    for a, b in zip(gf, gr):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_head_loss_without_grad_and_token_logprobs():
    body, norm, W, x_ND, tok_N, adv_N, logp_roll_N, logp_prox_N = _tiny_batch(seed=2)
    with torch.no_grad():
        h_ND = norm(body(x_ND))
        want_N = (h_ND @ W.T).log_softmax(-1).gather(1, tok_N[:, None])[:, 0]
        got, stats = ppo_head_loss(h_ND, W, tok_N, adv_N, logp_roll_N, logp_prox_N)
        want, _ = ppo_loss(want_N, logp_roll_N, adv_N, logp_prox_N)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(token_logprobs(h_ND, W, tok_N).double(), want_N, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["logp"].double(), want_N, rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_den_are_clear_errors():
    z3 = torch.zeros(3)
    with pytest.raises(ValueError, match=r"adv_N must have shape \[3\]"):
        ppo_loss(z3, z3, torch.zeros(4))
    with pytest.raises(ValueError, match="den"):
        ppo_loss(z3, z3, z3, den=0)
