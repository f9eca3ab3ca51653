"""The engine against plain full-forward greedy decoding (recompute model(all ids) each step, argmax of the last):
mixed prompt lengths, chunked prefill, preemption, contexts past index_topk, prefix reuse; plus abort, n > 1,
seeds, stop conditions, logprobs and weight updates.

The model has perturbed (std 0.15) weights so logits are well separated, and every reference step asserts a top-2
logit margin > 1e-4: a mismatch can then only be a bug, never a rounding-level tie (engine and reference differ
by ~1e-6 because they batch and chunk differently).
"""

import pytest
import torch

import glm5
from glm5.config import tiny
from glm5.engine import Engine, RequestError, SamplingParams
from glm5.engine.kv_cache import BlockManager

from .conftest import perturb

MARGIN = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=10)


def _model(seed=0, **kw):
    # index_topk 8: prompts of 20-45 tokens and their decodes run the sparse (top-k) paths.
    return perturb(glm5.load_model(tiny().replace(index_topk=8, **kw)), seed=seed)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _model()


def reference(model, prompt, n, logits_hook=None):
    """Greedy tokens and the full-forward logits at each step."""
    ids, out, rows = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            if logits_hook is not None:
                logits = logits_hook(logits, out)
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > MARGIN, "reference step too close to a tie for an exact comparison"
            out.append(int(logits.argmax()))
            ids.append(out[-1])
            rows.append(logits)
    return out, torch.stack(rows)


def prompts_of(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def check_greedy(model, engine, prompts, params=GREEDY):
    results = engine.generate(prompts, params)
    for p, res in zip(prompts, results):
        want, _ = reference(model, p, params.max_tokens)
        assert res[0].token_ids == want
        assert res[0].finish_reason == "length"
    assert engine.stats()["blocks_used"] == 0
    return results


# -- equality with full-forward greedy decoding -------------------------------------------------------------------
def test_greedy_mixed_batch_long_contexts(model):
    prompts = prompts_of([3, 17, 30, 9, 45], model.config.vocab_size)
    eng = Engine(model, num_blocks=64, block_size=4)
    check_greedy(model, eng, prompts)
    assert max(map(len, prompts)) > model.config.index_topk  # decode past index_topk: top-k gather path


def test_greedy_chunked_prefill(model):
    prompts = prompts_of([30, 12, 41], model.config.vocab_size, seed=2)
    eng = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=7)
    sizes = []
    schedule = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: (lambda plan: (sizes.append([n for _, n in plan]), plan)[1])(schedule())
    check_greedy(model, eng, prompts)
    assert max(sum(s) for s in sizes) <= 7 and max(map(len, prompts)) > 7  # prompts really were split
    assert any(len(s) > 1 and max(s) > 1 and min(s) == 1 for s in sizes)  # prefill chunks mixed with decodes


def test_greedy_with_preemption(model):
    prompts = prompts_of([20, 25, 18, 30], model.config.vocab_size, seed=3)
    eng = Engine(model, num_blocks=12, block_size=4)  # 48 slots; each request needs up to 40
    check_greedy(model, eng, prompts)
    assert eng.stats()["num_preemptions"] > 0


def test_greedy_with_prefix_reuse(model):
    V = model.config.vocab_size
    shared = prompts_of([24], V, seed=4)[0]
    tails = prompts_of([1, 5, 11], V, seed=5)
    eng = Engine(model, num_blocks=64, block_size=4)
    check_greedy(model, eng, [shared + tails[0]])
    hits = eng.stats()["prefix_cache_hit_tokens"]
    check_greedy(model, eng, [shared + t for t in tails[1:]] + [shared + tails[0]])
    # 24 shared tokens = 6 blocks each; the repeated prompt also reuses nothing more (its last token is recomputed)
    assert eng.stats()["prefix_cache_hit_tokens"] - hits >= 3 * 24


def test_return_hidden_equals_full_forward(model):
    """Hidden states of every fed token, through chunked prefill, preemption (recomputed rows replace the old ones)
    and a prompt whose prefix is cached (computed anyway: a cached block has KV, not hidden states)."""
    V = model.config.vocab_size
    shared = prompts_of([24], V, seed=7)[0]
    eng = Engine(model, num_blocks=14, block_size=4, max_num_batched_tokens=9)
    check_greedy(model, eng, [shared + [1]])  # registers the shared blocks in the prefix cache
    prompts = [shared + [5, 6], *prompts_of([20, 25, 18], V, seed=8)]
    rids = {eng.add_request(p, GREEDY, return_hidden=True): p for p in prompts}
    ids, hidden = {r: list(p) for r, p in rids.items()}, {}
    while eng.has_unfinished():
        for o in eng.step():
            ids[o.request_id] += o.new_token_ids
            assert (o.hidden is not None) == o.finished
            if o.finished:
                hidden[o.request_id] = o.hidden
    assert eng.stats()["num_preemptions"] > 0
    for r, seq in ids.items():
        assert seq[len(rids[r]):] == reference(model, rids[r], GREEDY.max_tokens)[0]
        with torch.no_grad():
            want = model.hidden(torch.tensor([seq]))[0, :-1]
        assert hidden[r].shape == want.shape
        torch.testing.assert_close(hidden[r], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(RequestError, match="n = 1"):
        eng.add_request([1, 2, 3], SamplingParams(n=2), return_hidden=True)


# -- request lifecycle ------------------------------------------------------------------------------------------------
def test_abort_frees_blocks(model):
    prompts = prompts_of([20, 9, 33], model.config.vocab_size, seed=6)
    eng = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=16)
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=30)) for p in prompts]
    for _ in range(4):
        eng.step()
    assert eng.stats()["blocks_used"] > 0 and eng.stats()["num_running"] >= 2
    assert eng.abort(ids[1]) and not eng.abort(ids[1]) and not eng.abort("nope")
    finished = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o.finish_reason
        if eng.stats()["num_running"] == 1 and ids[2] not in finished:
            eng.abort(ids[2])
    assert finished == {ids[0]: "length", ids[1]: "abort", ids[2]: "abort"}
    s = eng.stats()
    assert s["blocks_used"] == 0 and s["num_waiting"] == s["num_running"] == s["num_requests"] == 0


def test_abort_waiting_request(model):
    eng = Engine(model, num_blocks=64, block_size=4, max_num_seqs=1)
    a = eng.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    b = eng.add_request([4, 5, 6], SamplingParams(temperature=0, max_tokens=3, n=2))
    eng.step()
    assert eng.stats()["num_waiting"] == 1
    eng.abort(b)
    outs = [o for _ in range(5) for o in eng.step()]
    assert sorted((o.index, o.finish_reason) for o in outs if o.request_id == b) == [(0, "abort"), (1, "abort")]
    assert [o.finish_reason for o in outs if o.request_id == a and o.finished] == ["length"]
    assert eng.stats()["blocks_used"] == 0


def test_rejects_what_can_never_fit(model):
    eng = Engine(model, num_blocks=10, block_size=4)  # 40 tokens
    with pytest.raises(RequestError, match="= 41 exceeds the limit of 40 tokens"):
        eng.add_request(list(range(30)), SamplingParams(max_tokens=11))
    with pytest.raises(RequestError, match="leaves no room"):
        eng.add_request(list(range(40)))
    big = Engine(model, num_blocks=2000, block_size=4)
    with pytest.raises(RequestError, match="max_position_embeddings 4096"):
        big.add_request([1] * 4000, SamplingParams(max_tokens=97))
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([])
    with pytest.raises(RequestError, match=r"token 512 is not a token id in \[0, 512\)"):
        eng.add_request([1, 512])
    with pytest.raises(RequestError, match="detokenize"):
        eng.add_request([1], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    eng.add_request([1], request_id="a")
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request([2], request_id="a")
    assert eng.add_request(list(range(30)), SamplingParams(max_tokens=10))  # exactly at the limit is fine


# -- sampling ---------------------------------------------------------------------------------------------------------
def test_n_samples_share_prompt_blocks(model):
    prompt = prompts_of([21], model.config.vocab_size, seed=7)[0]
    eng = Engine(model, num_blocks=64, block_size=4)
    (res,) = eng.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=6))
    want, _ = reference(model, prompt, 6)
    assert [c.index for c in res] == [0, 1, 2] and all(c.token_ids == want for c in res)
    assert eng.stats()["prefix_cache_hit_tokens"] == 2 * 20  # samples 1, 2 each reuse the 5 full prompt blocks
    (res,) = eng.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8))
    assert len({tuple(c.token_ids) for c in res}) == 4  # seeds 3..6 (odds of a collision ~ 512^-8)
    assert eng.stats()["blocks_used"] == 0


def test_seed_reproducible_whatever_the_batch(model):
    V = model.config.vocab_size
    prompt = prompts_of([15], V, seed=8)[0]
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12)
    alone = Engine(model, num_blocks=64, block_size=4).generate([prompt], p)[0][0].token_ids
    others = prompts_of([3, 40, 22], V, seed=9)
    crowd = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=9).generate(
        others[:2] + [prompt] + others[2:], [SamplingParams(temperature=0.7, max_tokens=15)] * 2 + [p] +
        [SamplingParams(temperature=1.0, max_tokens=5)])[2][0].token_ids
    assert alone == crowd
    other_seed = Engine(model, num_blocks=64, block_size=4).generate([prompt], SamplingParams(
        temperature=1.0, top_p=0.95, seed=99, max_tokens=12))[0][0].token_ids
    assert other_seed != alone


def test_stop_token_ids_eos_ignore_eos_min_tokens(model):
    prompt = prompts_of([19], model.config.vocab_size, seed=10)[0]
    want, logits = reference(model, prompt, 10)
    stop = want[4]
    first = want.index(stop)
    eng = Engine(model, num_blocks=64, block_size=4)
    (c,), = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]))
    assert c.token_ids == want[:first + 1] and (c.finish_reason, c.stop_reason) == ("stop", stop)

    eos = Engine(model, num_blocks=64, block_size=4, eos_token_ids=[stop])
    (c,), = eos.generate([prompt], GREEDY)
    assert c.token_ids == want[:first + 1] and (c.finish_reason, c.stop_reason) == ("stop", None)
    (c,), = eos.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert c.token_ids == want and c.finish_reason == "length"
    # min_tokens masks eos until first + 2 tokens exist: the first eos is replaced by the runner-up token.
    (c,), = eos.generate([prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=first + 2))
    top3 = logits[first].topk(3)
    assert top3.values[1] - top3.values[2] > MARGIN
    runner_up = int(top3.indices[1])
    assert c.token_ids[:first + 1] == want[:first] + [runner_up] and stop not in c.token_ids[:first + 2]


def test_stop_strings_with_detokenize(model):
    prompt = prompts_of([12], model.config.vocab_size, seed=11)[0]
    want, _ = reference(model, prompt, 10)
    detok = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    text = detok(want)
    stop = text[3:5]
    end = text.index(stop) + len(stop)  # tokens are one character each here
    eng = Engine(model, num_blocks=64, block_size=4, detokenize=detok)
    (c,), = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop=[stop, "zzzzzz"]))
    assert c.token_ids == want[:end] and (c.finish_reason, c.stop_reason) == ("stop", stop)


def test_penalties_match_a_hand_written_reference(model):
    prompt = prompts_of([14], model.config.vocab_size, seed=12)[0]

    def penalize(logits, out):
        count = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        return logits - 1.5 * count - 0.5 * (count > 0).float()

    want, _ = reference(model, prompt, 10, penalize)
    eng = Engine(model, num_blocks=64, block_size=4)
    (c,), = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=10, frequency_penalty=1.5,
                                                  presence_penalty=0.5))
    assert c.token_ids == want
    plain, _ = reference(model, prompt, 10)
    assert plain != want  # the penalty mattered


def test_logprobs_equal_full_forward_log_softmax(model):
    prompt = prompts_of([26], model.config.vocab_size, seed=13)[0]
    want, logits = reference(model, prompt, 8)
    eng = Engine(model, num_blocks=64, block_size=4)
    (c,), = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=8, top_logprobs=3))
    lsm = logits.log_softmax(-1)
    assert c.token_ids == want
    assert torch.allclose(torch.tensor(c.logprobs), lsm[torch.arange(8), torch.tensor(want)], atol=1e-4)
    assert c.sampling_logprobs == [0.0] * 8  # greedy draws from a point mass
    for t, top in enumerate(c.top_logprobs):
        vals, idx = lsm[t].topk(3)
        assert [i for i, _ in top] == idx.tolist()
        assert torch.allclose(torch.tensor([v for _, v in top]), vals, atol=1e-4)
    # sampled at temperature 0.5: raw and sampling log-probs from the full forward of the sampled sequence
    (c,), = eng.generate([prompt], SamplingParams(temperature=0.5, seed=0, max_tokens=8))
    with torch.no_grad():
        full = model(torch.tensor([prompt + c.token_ids]))[0, len(prompt) - 1:-1]
    tok = torch.tensor(c.token_ids)
    assert torch.allclose(torch.tensor(c.logprobs), full.log_softmax(-1)[torch.arange(8), tok], atol=1e-4)
    assert torch.allclose(torch.tensor(c.sampling_logprobs), (full / 0.5).log_softmax(-1)[torch.arange(8), tok],
                          atol=1e-4)


def test_update_weights_changes_outputs_and_version():
    a, b = _model(seed=0), _model(seed=21)
    prompt = prompts_of([18], a.config.vocab_size, seed=14)[0]
    want_a, _ = reference(a, prompt, 8)
    want_b, _ = reference(b, prompt, 8)
    assert want_a != want_b
    eng = Engine(a, num_blocks=64, block_size=4)
    p = SamplingParams(temperature=0, max_tokens=8)
    (c,), = eng.generate([prompt], p)
    assert c.token_ids == want_a and c.policy_versions == [0] * 8
    assert eng.update_weights(b.state_dict()) == 1 and eng.policy_version == 1
    assert eng.stats()["blocks_cached"] == 0  # the old prefix KV is gone
    (c,), = eng.generate([prompt], p)
    assert c.token_ids == want_b and c.policy_versions == [1] * 8
    with pytest.raises(ValueError, match="unknown names"):
        eng.update_weights({"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="wrong shapes"):
        eng.update_weights({"lm_head.weight": torch.zeros(3, 3)})
    assert eng.policy_version == 1


def test_update_weights_mid_generation_versions_and_recompute():
    a, b = _model(seed=0), _model(seed=21)
    prompt = prompts_of([10], a.config.vocab_size, seed=15)[0]
    eng = Engine(a, num_blocks=64, block_size=4)
    rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=8))
    toks, versions = [], []
    while eng.has_unfinished():
        for o in eng.step():
            toks += o.new_token_ids
            versions += o.policy_versions
        if len(toks) == 3 and eng.policy_version == 0:
            eng.update_weights(b.state_dict(), version=7, recompute_running=True)
    assert versions == [0] * 3 + [7] * 5
    # recomputed under b: the rest equals b's greedy continuation of prompt + the 3 tokens a chose
    want_b, _ = reference(b, prompt + toks[:3], 5)
    assert toks[3:] == want_b and rid not in eng.requests and eng.stats()["blocks_used"] == 0


# -- block bookkeeping --------------------------------------------------------------------------------------------
def test_block_manager_prefix_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(3)
    chain = 0
    for i, b in enumerate(a[:2]):
        chain = bm.register(b, chain, [i, i])
    bm.release(a)
    assert bm.num_free == 4 and bm.num_cached == 2
    got, _ = bm.take_prefix([0, 0, 1, 1, 2, 2], max_blocks=3)
    assert got == a[:2] and bm.num_free == 2
    bm.release(got)
    # the never-registered blocks go first, then the LRU's oldest: a[1] was released (tail first) before a[0]
    order = bm.allocate(4)
    assert order[2:] == [a[1], a[0]] and bm.num_cached == 0
    assert bm.take_prefix([0, 0], 1) == ([], 0)
