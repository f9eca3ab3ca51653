"""MTP speculative decoding (glm5/engine/speculative.py) against plain decoding: greedy output equals full-forward
greedy decoding; the accept / resample rule keeps every token's distribution exact (checked exactly on given p, q and
statistically through the engine); rejected drafts leave no trace in the cache rows of accepted tokens nor in the
prefix cache; stops, max_tokens, min_tokens, penalties, logprobs, weight updates and grammar rows behave as without
speculation.

Two tiny models (index_topk 8, so the verify calls run DSA's top-k gather path with several query tokens):
  - `model`, test_engine's perturbed model: its random MTP layer drafts almost nothing acceptable (rejections);
  - `bigram`, the same with every layer's output scaled by 0.01 and an MTP layer that passes the next token's
    embedding through: the main model is then close to a bigram model and the MTP layer predicts it, so about 3 in
    4 depth-1 drafts are accepted, with rejections mixed in. Its draft confidences are low (a flat random head), so
    tests that need chained drafts turn the confidence cut off (drafter.confidence = 0).
Statistical tests state their odds; seeds are fixed, so every run is deterministic.
"""

import pytest
import torch

import glm5
from glm5.config import tiny
from glm5.engine import Engine, SamplingParams
from glm5.engine import speculative
from glm5.engine.sampler import SeqSampling, make_generator
from glm5.model.cache import DenseCache

from .conftest import perturb
from .test_engine import _model, prompts_of, reference

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [3, 17, 30, 9, 45]


def near_bigram(seed=0, alpha=0.01):
    model = perturb(glm5.load_model(tiny().replace(index_topk=8)), seed=seed)
    D = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.mul_(alpha)
        mtp = model.mtp[0]
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :D] = torch.eye(D)  # the next token's embedding, the main hidden state ignored
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(model.model.norm.weight)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def bigram():
    return near_bigram()


def engine(model, k, confidence=0.0, **kw):
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    eng = Engine(model, speculative_tokens=k, **kw)
    eng.drafter.confidence = confidence
    return eng


def run(eng, prompts, params):
    """Step the engine to the end; per prompt its tokens and the StepOutputs."""
    ids = {eng.add_request(p, params): i for i, p in enumerate(prompts)}
    toks, outs = [[] for _ in prompts], [[] for _ in prompts]
    while eng.has_unfinished():
        for o in eng.step():
            toks[ids[o.request_id]] += o.new_token_ids
            outs[ids[o.request_id]].append(o)
    return toks, outs


# -- greedy: the same tokens as full-forward greedy decoding --------------------------------------------------------
@pytest.mark.parametrize("which,k", [("model", 2), ("bigram", 1), ("bigram", 3)])
def test_greedy_equals_full_forward(which, k, request):
    m = request.getfixturevalue(which)
    prompts = prompts_of(LENGTHS, m.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=12, top_logprobs=2)
    wants = [reference(m, p, 12) for p in prompts]
    for batch in (len(prompts), 1):  # continuous batching of rows that accept different counts; one at a time
        eng = engine(m, k)
        for i in range(0, len(prompts), batch):
            toks, outs = run(eng, prompts[i:i + batch], params)
            for j, (t, o) in enumerate(zip(toks, outs)):
                want, logits = wants[i + j]
                assert t == want
                # the reported log-probs are the target model's, as without speculation
                lsm = logits.log_softmax(-1)
                lps = torch.tensor([lp for x in o for lp in x.logprobs])
                assert torch.allclose(lps, lsm[torch.arange(12), torch.tensor(want)], atol=1e-4)
                tops = [top for x in o for top in x.top_logprobs]
                assert [[i for i, _ in top] for top in tops] == lsm.topk(2).indices.tolist()
                assert o[-1].finish_reason == "length"
        st = eng.stats()
        assert st["blocks_used"] == 0 and st["spec_draft_tokens"] > 0
        if which == "bigram":
            assert st["spec_acceptance_by_depth"][0] > 0.5 and st["spec_acceptance_rate"] < 1  # accepts and rejects
            if k > 1:
                assert st["spec_acceptance_by_depth"][1] > 0.2  # runs of several accepted drafts
    assert max(LENGTHS) > m.config.index_topk


def test_greedy_chunked_prefill_budget_and_preemption(bigram):
    """A step budget of 7 tokens (prefill chunks beside verifying rows, drafts cut to fit: the lookahead shrinks
    before anything waits), then 12 blocks of 4 slots (preemption: drafts dropped, sequences recomputed): output
    unchanged both times, every block returned."""
    prompts = prompts_of([20, 25, 18, 30], bigram.config.vocab_size, seed=3)
    want = [reference(bigram, p, 10)[0] for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=10)
    eng = engine(bigram, 3, max_num_batched_tokens=7)
    sizes = []
    schedule = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: (lambda plan: (sizes.append([n for _, n in plan]), plan)[1])(schedule())
    assert run(eng, prompts, params)[0] == want
    assert max(map(sum, sizes)) <= 7 and eng.stats()["spec_accepted_tokens"] > 0
    assert any(len(s) > 1 and max(s) > 4 for s in sizes)  # a prefill chunk beside a (shortened) verify row
    eng = engine(bigram, 3, num_blocks=12)
    assert run(eng, prompts, params)[0] == want
    st = eng.stats()
    assert st["num_preemptions"] > 0 and st["spec_accepted_tokens"] > 0 and st["blocks_used"] == 0


@pytest.mark.skipif(not glm5.loader.shipped_model_available(), reason="no shipped model in this checkout")
def test_shipped_model_greedy_identical():
    from glm5.chat import render_chat
    from glm5.loader import load

    loaded = load()
    tok = loaded.tokenizer
    msgs = ["What is 37 + 48?", "What is the capital of France?", "Write a haiku about rain.", "What is 12 * 9?"]
    prompts = [render_chat(tok, [{"role": "user", "content": m}], enable_thinking=True).ids for m in msgs]
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = Engine(loaded.model, cache_bytes=1 << 26, eos_token_ids=tok.eos_ids).generate(prompts, params)
    for k in (1, 3):
        eng = Engine(loaded.model, cache_bytes=1 << 26, eos_token_ids=tok.eos_ids, speculative_tokens=k)
        got = eng.generate(prompts, params)
        assert [g[0].token_ids for g in got] == [g[0].token_ids for g in plain]
        assert [g[0].finish_reason for g in got] == [g[0].finish_reason for g in plain]
        assert eng.stats()["spec_acceptance_rate"] > 0.6  # the shipped MTP layer drafts well (~0.9 at depth 1)


# -- the accept / resample rule ------------------------------------------------------------------------------------
def _dists(V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(3, V, generator=g)
    q = torch.rand(2, V, generator=g)
    p[0, 0] = 0.0  # a draft the target never takes
    q[0, 1] = 0.0  # a token the draft never proposes
    p[1, 2] = q[1, 3] = 0.0
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def test_judge_emits_exactly_p():
    """Exact, with no sampling: over drafts d ~ q (weights q(d)) and u on a grid of 4000 midpoints, the first
    emitted token is d when accepted, else a draw from the returned distribution; its law must be p0. Then given
    the first draft accepted (u1 = 0), the second emitted token must follow p1 (the quadrature's error is < 1/4000).
    """
    p, q = _dists()
    V, G = p.shape[1], 4000
    u_grid = (torch.arange(G) + 0.5) / G
    first = torch.zeros(V, dtype=torch.float64)
    for d in range(V):
        if q[0, d] == 0:
            continue
        for u in u_grid:
            a, final = speculative.judge(p[:2], q[:1], [d], u[None])
            if a == 1:
                first[d] += q[0, d] / G
            else:
                first += q[0, d] / G * (final / final.sum()).double()
    assert torch.allclose(first, p[0].double(), atol=5e-4)
    second = torch.zeros(V, dtype=torch.float64)
    d1 = 2  # p0(2) > 0: accepted at u1 = 0
    for d2 in range(V):
        if q[1, d2] == 0:
            continue
        for u in u_grid[::8]:
            a, final = speculative.judge(p, q, [d1, d2], torch.stack([torch.tensor(0.0), u]))
            assert a >= 1
            if a == 2:
                second[d2] += q[1, d2] / (G // 8)
            else:
                second += q[1, d2] / (G // 8) * (final / final.sum()).double()
    assert torch.allclose(second, p[1].double(), atol=2e-3)


def test_residual_is_p_where_p_is_at_most_q():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert torch.equal(speculative.residual(p, p.clone()), p)
    assert torch.equal(speculative.residual(p, torch.tensor([0.2, 0.5, 0.3])), torch.tensor([0.3, 0.0, 0.0]))


def chi2(counts, p):
    expected = counts.sum() * p
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_verify_draws_follow_the_processed_target():
    """verify() on 20000 rows of the same target logits and draft distribution, drafts drawn by draft(): the first
    emitted token follows the processed target (temperature 0.7, top_k 4; df 3, critical value 16.27 at p = 0.001:
    fails by chance 1 time in 1000), and drafts are both accepted and rejected."""
    p, q = _dists(V=6, seed=1)
    logits_2V = p[:2].log()
    logits_2V[0] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    params = SamplingParams(temperature=0.7, top_k=4)
    R = 20000
    states = [SeqSampling(params, make_generator(r, "cpu"), []) for r in range(R)]
    draft_logits = q[:1].log().expand(R, -1)
    toks, qs, _ = speculative.draft(draft_logits, states, [[] for _ in range(R)])
    res = speculative.verify(logits_2V.repeat(R, 1), [[t] for t in toks], [[q_V] for q_V in qs], states,
                             [[] for _ in range(R)])
    counts = torch.bincount(torch.tensor([v.tokens[0] for v in res]), minlength=6).float()
    target = torch.zeros(6)
    target[:4] = (logits_2V[0, :4] / 0.7).softmax(-1)
    assert chi2(counts, target) < 16.27
    acc = sum(v.accepted for v in res)
    assert 0.2 * R < acc < 0.9 * R
    # reported: the raw target log-prob, and the log-prob under the processed target
    v = res[0]
    assert v.logprobs[0] == pytest.approx(logits_2V[0].log_softmax(-1)[v.tokens[0]].item(), abs=1e-5)
    assert v.sampling_logprobs[0] == pytest.approx(target[v.tokens[0]].log().item(), abs=1e-5)


def test_engine_samples_the_target_distribution(bigram):
    """Through the engine at temperature 1: the second output token (the first one verified against a draft) of 3000
    seeded requests follows the exact marginal sum_t1 P(t1) P(t2 | t1), computed by full forwards over every t1.
    Bins: tokens expected >= 8 times, the rest pooled; critical value at p = 0.001 for the bins' df (fails by chance
    1 time in 1000)."""
    prompt = prompts_of([6], bigram.config.vocab_size, seed=7)[0]
    V, N = bigram.config.vocab_size, 3000
    with torch.no_grad():
        p1 = bigram(torch.tensor([prompt]))[0, -1].softmax(-1)
        ids = torch.cat([torch.tensor(prompt).expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = (p1[:, None] * bigram(ids)[:, -1].softmax(-1)).sum(0)
    eng = engine(bigram, 2, max_num_seqs=500, num_blocks=1024)
    toks = []
    for i in range(0, N, 500):
        got = eng.generate([prompt] * 500, [SamplingParams(temperature=1.0, seed=s, max_tokens=3)
                                            for s in range(i, i + 500)])
        toks += [g[0].token_ids for g in got]
    st = eng.stats()
    assert 0.3 < st["spec_acceptance_rate"] < 0.99
    counts = torch.bincount(torch.tensor([t[1] for t in toks]), minlength=V).float()
    big = p2 * N >= 8
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([p2[big], p2[~big].sum()[None]]) * N
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_critical(len(obs) - 1), (stat, len(obs))


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """The chi-square quantile at p = 0.001 (z: the normal's), by Wilson and Hilferty's cube-root approximation
    (within 1% for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


# -- rollback: what rejected drafts wrote never counts ----------------------------------------------------------
def _slots(seq, P, n):
    pos = torch.arange(n)
    return torch.tensor(seq.blocks)[pos // P] * P + pos % P


def _dense_rows(m, ids: list[int], n: int):
    """Reference cache rows of the first n tokens of ids: main layers from a full forward over ids[:n], the MTP layer
    over (h[t], ids[t + 1]) for t < n (ids holds at least n + 1 tokens)."""
    cfg = m.config
    main, mtp = DenseCache(cfg, 1, n), DenseCache(cfg, 1, n)
    with torch.no_grad():
        x = torch.tensor([ids[:n + 1]])
        h = m.hidden(x[:, :n], cache=main)
        m.mtp_hidden(h, x[:, 1:n + 1], torch.arange(n)[None], cache=mtp)
    return main, mtp


def test_cache_rows_of_accepted_tokens_equal_a_full_forward(bigram):
    """After every step of a batch with rejections, every computed slot of every running sequence holds exactly what
    a full forward over its tokens computes: main latent and index rows, and the MTP layer's rows."""
    eng = engine(bigram, 3)
    cfg, P, L = bigram.config, 4, bigram.config.num_hidden_layers
    for p in prompts_of([13, 22, 7], cfg.vocab_size, seed=9):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=24))
    checked = 0
    while eng.has_unfinished():
        eng.step()
        for seq in eng.scheduler.running:
            n = seq.num_computed
            if n == 0 or seq.num_tokens != n + 1:
                continue
            main, mtp = _dense_rows(bigram, seq.tokens, n)
            s = _slots(seq, P, n)
            W = eng.cache.lat.shape[-1]
            for layer in range(L):
                got = eng.cache.lat[layer].reshape(-1, W)[s]
                assert torch.allclose(got, main.lat[layer, 0, :n], atol=1e-4), (layer, n)
                ik = eng.cache.ikey[eng.cache.ikey_index[layer]].reshape(-1, cfg.index_head_dim)[s]
                assert torch.allclose(ik, main.ikey[layer, 0, :n], atol=1e-4)
            assert torch.allclose(eng.cache.lat[L].reshape(-1, W)[s], mtp.lat[L, 0, :n], atol=1e-4)
            ik = eng.cache.ikey[eng.cache.ikey_index[L]].reshape(-1, cfg.index_head_dim)[s]
            assert torch.allclose(ik, mtp.ikey[L, 0, :n], atol=1e-4)
            checked += 1
    st = eng.stats()
    assert checked > 10 and 0 < st["spec_accepted_tokens"] < st["spec_draft_tokens"]  # rejections happened


def test_prefix_cache_holds_only_accepted_tokens(bigram):
    """Every block the prefix cache registers during runs with rejections holds the main-layer rows of exactly the
    tokens its key names (the MTP rows of a block's last slot depend on the token after it, so they are not part of
    what a prefix hit promises); a request that takes those blocks decodes as full-forward greedy decoding does."""
    eng = engine(bigram, 3)
    prompts = prompts_of([9, 14], bigram.config.vocab_size, seed=11)
    toks, _ = run(eng, prompts, SamplingParams(temperature=0, max_tokens=20))
    st = eng.stats()
    assert 0 < st["spec_accepted_tokens"] < st["spec_draft_tokens"]
    b, P = eng.blocks, 4
    by_id = {b.key_id[blk]: blk for blk in b.table.values()}
    checked = 0
    for key, blk in b.table.items():
        prefix, k = [], key
        while True:
            prefix = list(k[1]) + prefix
            if k[0] == 0:
                break
            k = b.key[by_id[k[0]]]
        main, _ = _dense_rows(bigram, prefix + [0], len(prefix))
        L = bigram.config.num_hidden_layers
        rows = eng.cache.lat[:L, blk]  # [layers, P, W]
        assert torch.allclose(rows, main.lat[:L, 0, len(prefix) - P:len(prefix)], atol=1e-4)
        checked += 1
    assert checked >= (9 + 20) // P
    # a prompt of a finished sequence plus its output takes those blocks and continues as full-forward greedy
    full = prompts[1] + toks[1]
    hits = eng.stats()["prefix_cache_hit_tokens"]
    assert run(eng, [full], SamplingParams(temperature=0, max_tokens=8))[0][0] == reference(bigram, full, 8)[0]
    assert eng.stats()["prefix_cache_hit_tokens"] - hits >= (len(full) - 1) // P * P


# -- stops, limits and processing inside accepted runs --------------------------------------------------------------
def oracle(eng, want: dict[int, list[int]]):
    """Make the drafter propose each sequence's known continuation (want[prompt length]): every draft is accepted,
    so whole runs of k + 1 tokens come in one step."""
    propose = eng.drafter.propose

    def exact(x_RD, seqs):
        propose(x_RD, seqs)  # keeps the drafter's bookkeeping (q, confidence)
        return [want[s.prompt_len][len(s.output_ids) + len(s.draft)] for s in seqs]

    eng.drafter.propose = exact


@pytest.mark.parametrize("how", ["stop_token_ids", "eos", "stop string", "max_tokens"])
def test_stop_inside_an_accepted_run(model, how):
    prompt = prompts_of([15], model.config.vocab_size, seed=21)[0]
    want, _ = reference(model, prompt, 16)
    cut = 8  # the 9th token ends the output, in the middle of the run t7..t11 (t1: prefill, t2..t6: a run)
    stop_tok = want[cut]
    assert stop_tok not in want[:cut]
    kw, eng_kw, reason = {"max_tokens": 16}, {}, ("stop", stop_tok)
    if how == "eos":
        eng_kw["eos_token_ids"], reason = [stop_tok], ("stop", None)
    elif how == "stop string":
        eng_kw["detokenize"] = lambda ids: "".join(f"<{t}>" for t in ids)
        kw["stop"], reason = [f"<{stop_tok}>"], ("stop", f"<{stop_tok}>")
    elif how == "max_tokens":
        kw["max_tokens"], reason = cut + 1, ("length", None)
    else:
        kw["stop_token_ids"] = [stop_tok]
    eng = engine(model, 4, **eng_kw)
    oracle(eng, {len(prompt): want})
    toks, outs = run(eng, [prompt], SamplingParams(temperature=0, **kw))
    assert toks[0] == want[:cut + 1]
    last = outs[0][-1]
    assert (last.finish_reason, last.stop_reason) == reason and last.finished
    assert len(last.new_token_ids) > 1  # it came inside a multi-token run
    assert len(last.logprobs) == len(last.policy_versions) == len(last.new_token_ids)
    assert eng.stats()["blocks_used"] == 0


def test_min_tokens_counts_drafts_as_output(bigram):
    """min_tokens at a position deep in a run counts the drafts before it: an end token that becomes allowed there
    ends the output there (a mask that counted only the output before the step would keep it masked)."""
    prompt = prompts_of([12], bigram.config.vocab_size, seed=5)[0]
    plain, _ = reference(bigram, prompt, 14)
    eos = plain[6]
    assert eos not in plain[:6]
    eng = engine(bigram, 3, eos_token_ids=[eos])
    oracle(eng, {len(prompt): plain})  # t1: prefill; t2..t5: a run; t6..t9: a run that holds t7 = eos
    toks, outs = run(eng, [prompt], SamplingParams(temperature=0, max_tokens=14, min_tokens=6))
    assert toks[0] == plain[:7] and outs[0][-1].finish_reason == "stop" and len(outs[0][-1].new_token_ids) > 1
    eng = engine(bigram, 3, eos_token_ids=[eos])
    oracle(eng, {len(prompt): plain})
    want, _ = reference(bigram, prompt, 14, lambda logits, out: logits.index_fill(0, torch.tensor([eos]), -1e9)
                        if len(out) < 7 else logits)
    assert run(eng, [prompt], SamplingParams(temperature=0, max_tokens=14, min_tokens=7))[0][0] == \
        want[:want.index(eos) + 1 if eos in want else 14]


def test_penalties_count_drafts_as_output(model):
    """Frequency and presence penalties at each verified position count the drafts before it, as a hand-written
    full-forward reference counts the output; drafts of that continuation are then all accepted."""
    prompt = prompts_of([14], model.config.vocab_size, seed=12)[0]

    def penalize(logits, out):
        count = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        return logits - 1.5 * count - 0.5 * (count > 0).float()

    want, _ = reference(model, prompt, 24, penalize)
    assert want != reference(model, prompt, 24)[0]  # the penalty matters
    eng = engine(model, 8)
    oracle(eng, {len(prompt): want})
    params = SamplingParams(temperature=0, max_tokens=24, frequency_penalty=1.5, presence_penalty=0.5)
    assert run(eng, [prompt], params)[0][0] == want
    st = eng.stats()
    assert st["spec_accepted_tokens"] == st["spec_draft_tokens"] > 8


# -- weights ----------------------------------------------------------------------------------------------------------
def test_update_weights_mid_generation_matches_plain_decoding():
    """The same update after the same number of tokens, speculating or not: the same tokens and policy versions
    (KV of the earlier tokens kept, as without speculation)."""
    a, b = near_bigram(seed=0), near_bigram(seed=4)
    prompt = prompts_of([11], a.config.vocab_size, seed=17)[0]

    def go(eng, at=None):
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=20))
        toks, versions, updated = [], [], None
        while eng.has_unfinished():
            for o in eng.step():
                toks += o.new_token_ids
                versions += o.policy_versions
            if updated is None and len(toks) >= (at or 6):
                updated = len(toks)
                eng.update_weights(b.state_dict(), version=3)
        return toks, versions, updated

    spec = engine(near_bigram(seed=0), 3)
    toks, versions, at = go(spec)
    assert at >= 6 and versions == [0] * at + [3] * (20 - at)
    assert go(Engine(near_bigram(seed=0), num_blocks=64, block_size=4), at)[:2] == (toks, versions)
    assert spec.stats()["spec_accepted_tokens"] > 0


def test_update_weights_reaches_the_mtp_layer(bigram):
    """An engine whose MTP layer drafts nothing useful (its eh_proj zeroed) accepts almost nothing; after
    update_weights gives the MTP layer the weights that predict the model, most drafts are accepted. The output
    stays full-forward greedy decoding throughout."""
    m = near_bigram()
    good = m.mtp[0].eh_proj.weight.detach().clone()
    with torch.no_grad():
        m.mtp[0].eh_proj.weight.zero_()
    prompt = prompts_of([10], m.config.vocab_size, seed=19)[0]
    eng = engine(m, 2)
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=40))
    toks = []
    while len(toks) < 20:
        toks += [t for o in eng.step() for t in o.new_token_ids]
    before = eng.stats()
    eng.update_weights({"mtp.0.eh_proj.weight": good})
    while eng.has_unfinished():
        toks += [t for o in eng.step() for t in o.new_token_ids]
    after = eng.stats()
    assert toks == reference(bigram, prompt, 40)[0]
    rate = lambda s0, s1: (s1["spec_accepted_tokens"] - s0.get("spec_accepted_tokens", 0)) / max(  # noqa: E731
        1, s1["spec_draft_tokens"] - s0.get("spec_draft_tokens", 0))
    assert rate({}, before) < 0.2 and rate(before, after) > 0.5


# -- grammar rows, errors, the k = 0 path -----------------------------------------------------------------------------
@pytest.mark.skipif(not glm5.loader.shipped_model_available(), reason="no shipped model in this checkout")
def test_grammar_rows_decode_without_drafts_beside_speculating_rows():
    from glm5.chat import render_chat
    from glm5.engine.grammar import Grammar, grammar_tokenizer
    from glm5.loader import load

    loaded = load()
    tok = loaded.tokenizer
    gtok = grammar_tokenizer(tok.json, vocab_size=len(tok), eos_ids=tok.eos_ids)
    g = Grammar(gtok, 'start: "{" "\\"n\\": " /[0-9]{1,3}/ "}"')
    prompts = [render_chat(tok, [{"role": "user", "content": m}], enable_thinking=False).ids
               for m in ("Give a number as JSON.", "What is 37 + 48?")]
    params = [SamplingParams(temperature=0, max_tokens=30, grammar=g), SamplingParams(temperature=0, max_tokens=30)]
    kw = {"cache_bytes": 1 << 26, "eos_token_ids": tok.eos_ids, "vocab_limit": len(tok)}
    plain = Engine(loaded.model, **kw).generate(prompts, params)
    eng = Engine(loaded.model, speculative_tokens=3, **kw)
    got = eng.generate(prompts, params)
    assert [x[0].token_ids for x in got] == [x[0].token_ids for x in plain]
    assert tok.decode(got[0][0].token_ids).startswith('{"n": ')
    alone = Engine(loaded.model, speculative_tokens=3, **kw)
    mtp_calls = []
    mtp = alone.runner.mtp
    alone.runner.mtp = lambda rows: (mtp_calls.append(len(rows)), mtp(rows))[1]
    assert alone.generate(prompts[:1], params[:1])[0][0].token_ids == plain[0][0].token_ids
    assert alone.stats()["spec_draft_tokens"] == 0 and eng.stats()["spec_draft_tokens"] > 0
    assert mtp_calls  # its MTP rows are still written: its prefix blocks can serve a speculating request


def test_speculative_tokens_needs_an_mtp_layer_and_a_decode_sized_verify(model):
    no_mtp = glm5.load_model(tiny().replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP layer"):
        Engine(no_mtp, num_blocks=8, speculative_tokens=2)
    Engine(no_mtp, num_blocks=8)  # k = 0 needs none
    for bad in (-1, 16, 2.0, True):
        with pytest.raises(ValueError, match="speculative_tokens must be an integer in"):
            Engine(model, num_blocks=8, speculative_tokens=bad)


def test_k0_never_runs_the_mtp_layer(model):
    eng = Engine(model, num_blocks=64, block_size=4)
    assert eng.drafter is None and eng.cache.n_layers == model.config.num_hidden_layers
    eng.runner.mtp = None  # calling it would raise
    prompts = prompts_of([5, 12], model.config.vocab_size, seed=23)
    got = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [g[0].token_ids for g in got] == [reference(model, p, 6)[0] for p in prompts]
    assert eng.stats()["spec_draft_tokens"] == 0


def test_seeded_sampling_is_reproducible_with_n_samples(bigram):
    prompts = prompts_of([8, 19], bigram.config.vocab_size, seed=29)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, n=3, max_tokens=12, top_logprobs=1)
    runs = [engine(bigram, 2).generate(prompts, params) for _ in range(2)]
    assert [[s.token_ids for s in r] for r in runs[0]] == [[s.token_ids for s in r] for r in runs[1]]
    assert all(len(s.token_ids) == 12 and len(s.logprobs) == len(s.top_logprobs) == 12 for r in runs[0] for s in r)
    assert len({tuple(s.token_ids) for s in runs[0][0]}) > 1  # the n samples differ


def test_return_hidden_keeps_only_accepted_positions(bigram):
    """return_hidden (the eval scores MTP drafts from these) with rejections: one row per token fed and accepted,
    equal to a full forward's final hidden states."""
    prompt = prompts_of([16], bigram.config.vocab_size, seed=31)[0]
    eng = engine(bigram, 3)
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=15), return_hidden=True)
    toks, hidden = [], None
    while eng.has_unfinished():
        for o in eng.step():
            toks += o.new_token_ids
            hidden = o.hidden if o.finished else hidden
    st = eng.stats()
    assert 0 < st["spec_accepted_tokens"] < st["spec_draft_tokens"]
    with torch.no_grad():
        want = bigram.hidden(torch.tensor([prompt + toks[:-1]]))[0]
    assert hidden.shape == want.shape and torch.allclose(hidden, want, atol=1e-4)


def test_serve_engine_takes_speculative_tokens():
    """`glm5 serve --speculative-tokens K` builds its engine through build_engine; a model without an MTP layer is
    refused there (serve prints the error and exits 2)."""
    from glm5.server.launch import build_engine

    from .server_util import TOK

    m = glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size))
    eng = build_engine(m, TOK, cache_bytes=4 << 20, speculative_tokens=2)
    assert eng.stats()["speculative_tokens"] == 2 and eng.drafter is not None
    no_mtp = glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size, num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP layer"):
        build_engine(no_mtp, TOK, cache_bytes=4 << 20, speculative_tokens=2)


def test_drafts_take_only_what_the_running_sequences_leave():
    """Two decoding sequences, blocks of 2 slots, 2 free blocks: each needs one for its next token. The older one's
    3 drafts would take both; they get what is left once both have their token, and nobody is preempted."""
    from glm5.engine.kv_cache import BlockManager
    from glm5.engine.scheduler import Scheduler, Sequence

    blocks = BlockManager(num_blocks=4, block_size=2)
    sch = Scheduler(blocks, max_num_batched_tokens=64, max_num_seqs=8)
    a, b = Sequence(0, "a", 0, [1, 2], 2), Sequence(1, "b", 0, [3, 4], 2)
    sch.add(a)
    sch.add(b)
    for seq, n in sch.schedule():  # prefill: one block each
        sch.advance(seq, n)
        seq.tokens.append(5)
    a.lookahead = b.lookahead = 3
    assert dict(sch.schedule()) == {a: 2, b: 2}  # slot 2 (the token) and slot 3 (one draft) fill each new block
    assert sch.num_preemptions == 0 and (a.lookahead, b.lookahead) == (1, 1) and blocks.num_free == 0


def test_metrics_export_the_acceptance(bigram):
    from glm5.server.metrics import Metrics

    eng = Engine(bigram, speculative_tokens=2, eos_token_ids=[])
    eng.generate([[3, 4, 5, 6]], SamplingParams(temperature=0.0, max_tokens=24))
    s = eng.stats()
    text = Metrics("m").render(s)
    assert s["spec_draft_tokens"] > 0
    assert f"glm5_spec_decode_num_draft_tokens_total {s['spec_draft_tokens']}" in text
    assert f"glm5_spec_decode_num_accepted_tokens_total {s['spec_accepted_tokens']}" in text
    assert "glm5_spec_decode_acceptance_rate" in text
    assert "glm5_spec_decode" not in Metrics("m").render(Engine(bigram, eos_token_ids=[]).stats())
