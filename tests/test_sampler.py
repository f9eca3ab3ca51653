"""The sampler on hand-made distributions: filters keep exactly the tokens their definitions keep, draws follow
the processed distribution (chi-square, stated odds), log-probs are the raw and the processed ones, a row's draws
depend only on its own generator."""

import math

import pytest
import torch

from glm5.engine.sampler import SamplingParams, SeqSampling, make_generator, sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def state(seed=0, eos=(), **kw):
    return SeqSampling(SamplingParams(**kw), make_generator(seed, "cpu"), list(eos))


def draws(n, **kw):
    st = state(**kw)
    counts, lps = torch.zeros(4), {}
    for _ in range(n):
        got = sample(LOGITS[None], [st], [[]])
        counts[got.tokens[0]] += 1
        lps[got.tokens[0]] = got.sampling_logprobs[0]
        assert math.isclose(got.logprobs[0], PROBS.log()[got.tokens[0]].item(), abs_tol=1e-6)  # always raw
    return counts, lps


def chi2(counts, p):
    expected = counts.sum() * p
    keep = p > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# chi-square critical values at p = 0.001: df 1 -> 10.83, df 3 -> 16.27. Each check fails by chance 1 time in 1000.
def test_plain_sampling_follows_softmax():
    counts, lps = draws(3000, temperature=1.0)
    assert chi2(counts, PROBS) < 16.27
    assert all(math.isclose(v, PROBS[t].log().item(), abs_tol=1e-5) for t, v in lps.items())


@pytest.mark.parametrize("kw, kept", [
    ({"top_k": 2}, [0, 1]),
    ({"top_p": 0.7}, [0, 1]),  # 0.5 < 0.7, 0.5 + 0.3 reaches it: two tokens
    ({"top_p": 0.5}, [0]),  # the first token alone reaches 0.5
    ({"min_p": 0.5}, [0, 1]),  # keep p >= 0.5 * 0.5
    ({"min_p": 0.05, "top_k": 3, "top_p": 0.99}, [0, 1, 2]),
])
def test_filters_keep_what_they_should_and_renormalise(kw, kept):
    counts, lps = draws(2000, temperature=1.0, **kw)
    assert set(torch.nonzero(counts).flatten().tolist()) == set(kept)
    p = torch.zeros(4)
    p[kept] = PROBS[kept] / PROBS[kept].sum()
    if len(kept) > 1:
        assert chi2(counts, p) < {2: 10.83, 3: 13.82}[len(kept)]  # 13.82: df 2 at p = 0.001
    assert all(math.isclose(v, p[t].log().item(), abs_tol=1e-5) for t, v in lps.items())


def test_temperature_scales_the_processed_distribution():
    counts, lps = draws(3000, temperature=2.0)
    p = (LOGITS / 2).softmax(-1)
    assert chi2(counts, p) < 16.27
    assert all(math.isclose(v, p[t].log().item(), abs_tol=1e-5) for t, v in lps.items())


def test_greedy_and_degenerate_filters_pick_the_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    for kw in ({"temperature": 0}, {"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        got = sample(logits, [state(seed=i, **kw) for i in range(6)], [[]] * 6)
        assert got.tokens == logits.argmax(-1).tolist(), kw
        assert got.sampling_logprobs == [0.0] * 6


def test_rows_draw_only_from_their_own_generator():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 100, generator=g)
    alone = sample(logits[2:3], [state(seed=42)], [[]]).tokens[0]
    mixed = sample(logits, [state(seed=s, temperature=t) for s, t in [(1, 1.0), (2, 0.0), (42, 1.0), (3, 0.5), (4, 1.0)]],
                   [[]] * 5)
    assert mixed.tokens[2] == alone
    st = state(seed=7)
    seq1 = [sample(logits[:1], [st], [[]]).tokens[0] for _ in range(20)]
    st = state(seed=7)
    seq2 = [sample(logits[:1], [st], [[]]).tokens[0] for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_min_tokens_mask_and_penalties():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    st = state(eos=[0], temperature=0, min_tokens=2, stop_token_ids=[1])
    assert sample(logits, [st], [[3]]).tokens == [2]  # eos 0 and stop id 1 masked while < 2 outputs
    assert sample(logits, [st], [[3, 3]]).tokens == [0]
    pen = state(temperature=0, presence_penalty=1.5, frequency_penalty=0.0)
    assert sample(logits, [pen], [[0]]).tokens == [1]  # 5 - 1.5 < 4
    freq = state(temperature=0, frequency_penalty=0.6)
    assert sample(logits, [freq], [[0]]).tokens == [0] and sample(logits, [freq], [[0, 0]]).tokens == [1]
    top = sample(logits, [state(temperature=0, top_logprobs=2)], [[]]).top_logprobs[0]
    lsm = logits[0].log_softmax(-1)
    assert [i for i, _ in top] == [0, 1] and math.isclose(top[1][1], lsm[1].item(), abs_tol=1e-6)


@pytest.mark.parametrize("kw, msg", [({"n": 0}, "n must"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                                     ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
                                     ({"presence_penalty": 3}, "presence_penalty"), ({"stop": [""]}, "stop")])
def test_params_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)
