"""One request never hurts another: token ids are checked at the door, a failure inside a step (non-finite logits,
the sampler, the stop check) ends only the request it belongs to, padded vocabulary rows are never sampled, and
near-zero temperatures are greedy. Faults are injected by wrapping the runner's model call or the sampler."""

import pytest

import glm5
import glm5.engine.engine as engine_mod
from glm5.config import tiny
from glm5.engine import Engine, RequestError, SamplingParams
from glm5.server.launch import build_engine

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=6)
P_GOOD, P_BAD = [5, 6, 7, 8], [9, 10, 11]


@pytest.fixture(scope="module")
def model():
    return perturb(glm5.load_model(tiny()), seed=0)


def _engine(model, **kw):
    return Engine(model, num_blocks=64, block_size=4, **kw)


def _drain(eng):
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    return outs


def _tokens(outs, rid, index=0):
    return [t for o in outs if o.request_id == rid and o.index == index for t in o.new_token_ids]


def _final(outs, rid, index=0):
    return next(o for o in outs if o.request_id == rid and o.index == index and o.finished)


def _solo(model, prompt=P_GOOD, params=GREEDY):
    return _engine(model).generate([prompt], params)[0][0].token_ids


def _poison_rows(eng, rid, fill=float("nan")):
    """Make the model call return `fill` logits for the rows of request rid."""
    execute = eng.runner.execute

    def bad(plan):
        seqs, logits = execute(plan)
        logits = logits.clone()
        for i, s in enumerate(seqs):
            if s.request_id == rid:
                logits[i] = fill
        return seqs, logits

    eng.runner.execute = bad


# -- 1. token ids checked at add time ----------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,params,what", [
    (P_BAD, SamplingParams(stop_token_ids=[999999], min_tokens=1, max_tokens=4), "stop_token_ids entry"),
    (P_BAD, SamplingParams(stop_token_ids=[-1], max_tokens=4), "stop_token_ids entry"),
    ([1, 512], GREEDY, "prompt"),
    ([1, True], GREEDY, "prompt"),
])
def test_out_of_vocab_ids_are_refused_at_add_and_others_continue(model, prompt, params, what):
    eng = _engine(model)
    eng.add_request(P_GOOD, GREEDY, "good")
    outs = eng.step()
    with pytest.raises(RequestError, match=what):
        eng.add_request(prompt, params, "bad")
    outs += _drain(eng)
    assert _tokens(outs, "good") == _solo(model)
    assert _final(outs, "good").finish_reason == "length"


def test_vocab_limit_bounds_request_ids(model):
    eng = _engine(model, vocab_limit=300)
    with pytest.raises(RequestError, match=r"prompt token 300 is not a token id in \[0, 300\)"):
        eng.add_request([1, 300], GREEDY)
    with pytest.raises(RequestError, match="stop_token_ids entry"):
        eng.add_request([1, 2], SamplingParams(stop_token_ids=[400], max_tokens=3))
    with pytest.raises(ValueError, match="eos_token_ids"):
        _engine(model, vocab_limit=300, eos_token_ids=[300])


# -- 2. a failure inside a step fails only its request -----------------------------------------------------------
def test_stop_check_failure_fails_only_its_request(model):
    def detokenize(ids):
        raise KeyError("token the tokenizer lacks")

    eng = _engine(model, detokenize=detokenize)
    eng.add_request(P_GOOD, GREEDY, "good")
    eng.add_request(P_BAD, SamplingParams(temperature=0, max_tokens=6, stop=["x"]), "bad")
    outs = _drain(eng)
    bad = _final(outs, "bad")
    assert bad.finish_reason == "abort" and "stop check failed" in bad.error and "KeyError" in bad.error
    assert _tokens(outs, "good") == _solo(model)
    assert _final(outs, "good").error is None
    assert eng.counters["failed_requests"] == 1 and not eng.requests
    assert eng.blocks.num_used == 0


def test_sampler_failure_fails_only_its_request(model, monkeypatch):
    real = engine_mod.sample

    def flaky(logits, states, outputs):  # a row asking for 7 top logprobs makes the sampler raise
        if any(st.params.top_logprobs == 7 for st in states):
            raise RuntimeError("sampler broke")
        return real(logits, states, outputs)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    eng = _engine(model)
    eng.add_request(P_GOOD, GREEDY, "good")
    eng.add_request(P_BAD, SamplingParams(temperature=1.0, max_tokens=6, n=3, top_logprobs=7, seed=1), "bad")
    outs = _drain(eng)
    assert sorted(o.index for o in outs if o.request_id == "bad" and o.finished) == [0, 1, 2]
    assert all(o.finish_reason == "abort" and "sampler broke" in o.error
               for o in outs if o.request_id == "bad" and o.finished)
    assert _tokens(outs, "good") == _solo(model)
    assert eng.blocks.num_used == 0


# -- 4. non-finite logits fail their request loudly ----------------------------------------------------------------
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_logits_fail_only_their_request(model, fill):
    eng = _engine(model)
    _poison_rows(eng, "bad", fill)
    eng.add_request(P_GOOD, GREEDY, "good")
    eng.add_request(P_BAD, SamplingParams(temperature=0.7, max_tokens=6, seed=3), "bad")
    outs = _drain(eng)
    bad = _final(outs, "bad")
    assert bad.finish_reason == "abort" and "non-finite logits" in bad.error
    assert _tokens(outs, "bad") == []  # loud failure, never a (garbage or empty) answer that looks finished
    assert _tokens(outs, "good") == _solo(model)


def test_generate_reports_the_error(model):
    eng = _engine(model)
    _poison_rows(eng, "req-0")
    g = eng.generate([P_BAD], GREEDY)[0][0]
    assert g.finish_reason == "abort" and "non-finite" in g.error


@pytest.mark.parametrize("temperature", [1e-6, 1e-30])
def test_tiny_temperature_is_greedy(model, temperature):
    assert SamplingParams(temperature=temperature).greedy
    g = _engine(model).generate([P_GOOD], SamplingParams(temperature=temperature, max_tokens=6))[0][0]
    assert g.token_ids == _solo(model)
    assert g.sampling_logprobs == [0.0] * 6


def test_non_finite_temperature_is_refused():
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=t)


# -- 3. padded vocabulary rows are never sampled -------------------------------------------------------------------
def _favour_padding(eng, limit):
    execute = eng.runner.execute

    def padded(plan):
        seqs, logits = execute(plan)
        logits = logits.clone()
        logits[:, limit:] += 100.0  # the padded rows would win every draw
        return seqs, logits

    eng.runner.execute = padded


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, max_tokens=20, seed=0, top_logprobs=5)])
def test_padded_vocab_rows_are_never_sampled(model, params):
    limit = 300
    control = _engine(model)
    _favour_padding(control, limit)
    assert all(t >= limit for t in control.generate([P_GOOD], params)[0][0].token_ids)  # the fault bites

    eng = _engine(model, vocab_limit=limit)
    _favour_padding(eng, limit)
    g = eng.generate([P_GOOD], params)[0][0]
    assert len(g.token_ids) == params.max_tokens and all(t < limit for t in g.token_ids)
    assert all(i < limit for step in g.top_logprobs for i, _ in step)


def test_build_engine_limits_to_the_tokenizer(model):
    class Tok:  # a tokenizer smaller than the checkpoint's vocabulary
        eos_ids = [2]

        def __len__(self):
            return 300

        def decode(self, ids):
            if any(i >= 300 for i in ids):
                raise KeyError("id outside the tokenizer")
            return " ".join(map(str, ids))

    eng = build_engine(model, Tok(), cache_bytes=1 << 20)
    assert eng.vocab_limit == 300
    _favour_padding(eng, 300)
    g = eng.generate([P_GOOD], SamplingParams(temperature=1.0, max_tokens=10, seed=0, stop=["never"],
                                              ignore_eos=True))[0][0]
    assert g.error is None and len(g.token_ids) == 10 and all(t < 300 for t in g.token_ids)


# -- the server: a request the engine failed is an error for its client, and only for it --------------------------
def test_server_reports_a_failed_request_as_an_error_and_serves_the_others():
    from .server_util import start, tiny_engine

    eng = tiny_engine()
    execute = eng.runner.execute

    def poison(plan):  # NaN logits for every sequence whose prompt starts with the token of "poison"
        seqs, logits = execute(plan)
        logits = logits.clone()
        for i, s in enumerate(seqs):
            if s.request_id.startswith("cmpl-") and eng.requests[s.request_id].prompt[0] == POISON:
                logits[i] = float("nan")
        return seqs, logits

    eng.runner.execute = poison
    srv = start(eng)
    try:
        _check_failed_request_is_an_error(srv)
    finally:
        srv.stop()


def _check_failed_request_is_an_error(srv):
    import httpx

    with httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0}
        bad = c.post("/v1/completions", json={**body, "prompt": [POISON, 7, 8]})
        assert bad.status_code == 500 and "non-finite logits" in bad.json()["error"]["message"]
        good = c.post("/v1/completions", json={**body, "prompt": [5, 7, 8]})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
        with c.stream("POST", "/v1/completions", json={**body, "prompt": [POISON, 7, 8], "stream": True}) as r:
            events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert "non-finite logits" in events[-2] and events[-1] == "data: [DONE]"


POISON = 11
