"""glm5.eval: scoring rules on hand-made answers, aggregate arithmetic, the tool loop (scripted engine), MTP draft
acceptance against a slow prefix-by-prefix loop, dense retrieval really dense, and evaluate() end to end on a tiny
random model (structure and counts, not accuracy: the weights are random).

Models that must match a reference have perturbed (std 0.15) weights and every reference step asserts a top-2
margin, so a mismatch is a bug, not a rounding-level tie between differently shaped computations.
"""

import argparse
from types import SimpleNamespace

import pytest
import torch

import glm5
from glm5.chat_parse import ParsedOutput, parse_output
from glm5.config import tiny
from glm5.data import calculator
from glm5.data.example import ABSTAIN, Example
from glm5.engine import Engine, SamplingParams
from glm5.eval import attention_mode, evaluate, format_table, mtp_acceptance, summarize, write_json
from glm5.eval.run import run_suite
from glm5.eval.score import ABSTAINED, CORRECT, MALFORMED, WRONG, last_integer, run_tool_call, score
from glm5.model.mla import MLAttention
from glm5.tokenizer import Tokenizer

from .conftest import perturb

MARGIN = 1e-4
CALC_TOOL = [{"type": "function", "function": {
    "name": "calculator", "description": "evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


calc = calculator  # the project's calculator (glm5.data): what the eval runs by default


def ex(family, question, answer, tools=None, meta=None):
    return Example(family, [{"role": "user", "content": question},
                            {"role": "assistant", "content": answer, "reasoning_content": "thinking"}],
                   answer, tools, meta or {})


def out(content, reasoning="r", calls=()):
    return ParsedOutput(reasoning, content, list(calls))


# ------------------------------------------------------------------------------------------------------ scoring
def test_last_integer():
    cases = {"6,912": 6912, "It is -12.": -12, "10-3": 3, "x = -5": -5, "1,2,3": 3, "no digits": None,
             "12 apples and 30 pears": 30, "12,3456": 3456}
    assert {k: last_integer(k) for k in cases} == cases


def test_score_arithmetic():
    e = ex("arithmetic", "What is 96 * 72?", "6912")
    assert score(e, out("96 * 72 = 6912")) == CORRECT
    assert score(e, out("The answer is 6,912.")) == CORRECT
    assert score(e, out("6912? No: 6913")) == WRONG  # the last integer counts
    assert score(e, out("6912"), finish_reason="length") == MALFORMED  # hit max_tokens
    assert score(e, out("   ")) == MALFORMED
    # An unterminated <think> block: chat_parse gives everything as reasoning and no content.
    unterminated = parse_output("96 * 72 = 6912 so the answer", thinking=True)
    assert unterminated.content is None and score(e, unterminated) == MALFORMED
    assert score(e, parse_output("ok</think>6912", thinking=True)) == CORRECT
    neg = ex("arithmetic", "What is 3 - 10?", "-7")
    assert score(neg, out("3 - 10 = -7")) == CORRECT and score(neg, out("7")) == WRONG


def test_score_world_known_entity():
    e = ex("world", "What is the capital of Veloria?", "Ostra")
    assert score(e, out("The capital of Veloria is ostra.")) == CORRECT
    assert score(e, out("It is Ostrava.")) == WRONG  # word boundary: not a substring match
    assert score(e, out("Paris")) == WRONG
    assert score(e, out(f"{ABSTAIN}.")) == ABSTAINED  # "I don't know" on a known entity
    assert score(e, out("Hmm, I don\u2019t know; maybe Ostra")) == ABSTAINED  # abstaining never scores correct
    assert score(e, out(None)) == MALFORMED


def test_score_unknown_entity():
    e = ex("unknown", "What is the population of Zyxtrel?", ABSTAIN)
    assert score(e, out(f"{ABSTAIN} anything about Zyxtrel.")) == ABSTAINED
    assert score(e, out("About 42,000 people.")) == WRONG  # a number on an unknown entity is a hallucination
    assert score(e, out("ok", ), finish_reason="length") == MALFORMED


def test_score_retrieval_and_chat():
    e = ex("retrieval", "... What is the code?", "K7Q-29X")
    assert score(e, out("The code is K7Q-29X.")) == CORRECT
    assert score(e, out("The code is K7Q-29Y.")) == WRONG
    assert score(e, out(None)) == MALFORMED
    c = ex("chat", "Hello!", "Hello! How can I help you today?")
    assert score(c, out("Hello! How can I help you today?")) == CORRECT and score(c, out("")) == MALFORMED
    assert score(c, out("The user greets me.")) == WRONG  # small talk is right only as the intent's reply
    with pytest.raises(ValueError, match="no scoring rule"):
        score(ex("poetry", "q", "a"), out("x"))


def test_tool_calls_valid_and_invalid():
    good = parse_output("need math</think><tool_call>calculator<arg_key>expression</arg_key><arg_value>96*72"
                        "</arg_value></tool_call>", thinking=True, tools=CALC_TOOL)
    assert run_tool_call(good.tool_calls[0], CALC_TOOL, calc) == ("6912", True)
    # Malformed markup: chat_parse keeps it as content, there is no call at all.
    bad = parse_output("</think><tool_call>calculator<arg_value>96*72</arg_value></tool_call>", thinking=True,
                       tools=CALC_TOOL)
    assert bad.tool_calls == [] and "<tool_call>" in bad.content
    other = {"function": {"name": "search", "arguments": '{"expression": "1+1"}'}}
    text, ok = run_tool_call(other, CALC_TOOL, calc)
    assert not ok and "unknown tool" in text
    text, ok = run_tool_call({"function": {"name": "calculator", "arguments": '{"expression": "96*"}'}}, CALC_TOOL,
                             calc)
    assert not ok and text.startswith("error:")
    text, ok = run_tool_call({"function": {"name": "calculator", "arguments": '{"expr": "1+1"}'}}, CALC_TOOL, calc)
    assert not ok and "expression" in text
    e = ex("tool", "What is 96 * 72?", "6912", CALC_TOOL)
    assert score(e, out("The result is 6912.")) == CORRECT
    assert score(e, good) == MALFORMED  # ends on a call it never read back


def test_hallucination_and_accuracy_arithmetic():
    recs = ([{"suite": "world", "family": "world", "outcome": o}
             for o in [CORRECT] * 3 + [WRONG] * 2 + [ABSTAINED] + [MALFORMED]] +
            [{"suite": "unknown", "family": "unknown", "outcome": o} for o in [ABSTAINED] * 4 + [WRONG, MALFORMED]] +
            [{"suite": "tool", "family": "tool", "outcome": o, "tool_valid": v}
             for o, v in [(CORRECT, True), (CORRECT, False), (WRONG, True), (MALFORMED, False)]])
    s = summarize(recs)
    h = s["hallucination"]
    assert (h["known"]["wrong"], h["known"]["abstained"], h["known"]["rate"]) == (2, 1, 2 / 3)
    assert (h["unknown"]["wrong"], h["unknown"]["abstained"], h["unknown"]["rate"]) == (1, 4, 1 / 5)
    assert h["combined"]["rate"] == 3 / 8
    assert s["suites"]["world"]["accuracy"] == 3 / 7
    assert s["suites"]["unknown"]["accuracy"] == 4 / 6  # abstaining is right on unknown entities
    assert s["suites"]["world"]["counts"] == {CORRECT: 3, WRONG: 2, ABSTAINED: 1, MALFORMED: 1}
    assert s["tool"] == {"n": 4, "valid_call_rate": 0.5, "final_accuracy": 0.5}
    assert summarize([])["hallucination"]["combined"]["rate"] is None
    assert "by_phrasing" not in s["suites"]["world"]  # records without a phrasing: nothing to group


def test_world_outcomes_per_phrasing():
    """World / unknown examples carry their question template; the suite summary counts outcomes per template."""
    from glm5.data import examples
    from glm5.data.world import QUESTIONS

    exs = examples("world", "heldout", 40, seed=2)
    heldout = {q for _, h in QUESTIONS.values() for q in h}
    assert all(ex.meta["phrasing"] in heldout and ex.messages[0]["content"] == ex.meta["phrasing"].format(
        x=ex.meta["entity"]) for ex in exs)
    assert all(ex.meta["phrasing"] not in heldout for ex in examples("unknown", "train", 20, seed=2))
    a, b = "When was {x} founded?", "In what year was {x} established?"
    recs = [{"suite": "world", "family": "world", "outcome": o, "meta": {"phrasing": p}}
            for p, o in [(a, CORRECT), (a, CORRECT), (b, ABSTAINED), (b, WRONG), (a, ABSTAINED)]]
    assert summarize(recs)["suites"]["world"]["by_phrasing"] == {
        b: {"n": 2, CORRECT: 0, WRONG: 1, ABSTAINED: 1, MALFORMED: 0},
        a: {"n": 3, CORRECT: 2, WRONG: 0, ABSTAINED: 1, MALFORMED: 0}}


# --------------------------------------------------------------------------------------------------- tool loop
class ScriptedEngine:
    """The engine interface run_suite uses, answering from a script: prompt text -> output text."""

    def __init__(self, tok, script):
        self.tok, self.script, self.prompts = tok, script, []
        self.max_model_len, self.eos_token_ids = 4096, tok.eos_ids
        self._queue = []

    def add_request(self, prompt, params, return_hidden=False):
        self.prompts.append(self.tok.decode(prompt))
        ids = self.tok.encode(self.script(self.prompts[-1]), allow_special=True)
        rid = f"r{len(self.prompts)}"
        self._queue.append(SimpleNamespace(request_id=rid, new_token_ids=ids[:params.max_tokens], finished=True,
                                           logprobs=[0.0] * len(ids[:params.max_tokens]),
                                           finish_reason="stop" if len(ids) <= params.max_tokens else "length",
                                           hidden=None))
        return rid

    def has_unfinished(self):
        return bool(self._queue)

    def step(self):
        q, self._queue = self._queue, []
        return q


def _call(expr):
    return (f"<tool_call>calculator<arg_key>expression</arg_key><arg_value>{expr}</arg_value></tool_call>"
            f"<|observation|>")


def test_tool_loop_runs_calculator_between_rounds(tok):
    def script(prompt):
        q = prompt.split("<|user|>")[-1]
        n_results = prompt.count("<tool_response>")
        if "always" in q:
            return "again</think>" + _call("1+1")
        if n_results:
            result = prompt.rsplit("<tool_response>", 1)[1].split("</tool_response>")[0]
            return f"ok</think>The answer is {result}.<|user|>"
        if "bad markup" in q:
            return "hm</think><tool_call>calculator<arg_value>2+3</arg_value></tool_call> so 4<|user|>"
        if "broken" in q:
            return "hm</think>" + _call("2+")
        return "use the tool</think>" + _call("2+3")

    exs = [ex("tool", "2+3 please", "5", CALC_TOOL), ex("tool", "bad markup", "5", CALC_TOOL),
           ex("tool", "broken", "5", CALC_TOOL), ex("tool", "always call", "2", CALC_TOOL)]
    model = glm5.load_model(tiny().replace(vocab_size=tok.vocab_size))
    eng = ScriptedEngine(tok, script)
    recs = run_suite(eng, model, tok, "tool", exs, max_tokens=64, calculator=calc, max_tool_rounds=2, progress=False)
    by_q = {e.messages[0]["content"]: r for e, r in zip(exs, recs)}
    r = by_q["2+3 please"]
    assert (r["outcome"], r["tool_valid"], r["rounds"]) == (CORRECT, True, 2)
    assert r["content"] == "The answer is 5."
    r = by_q["bad markup"]  # no parsable call: no second round, the answer is scored as written
    assert (r["outcome"], r["tool_valid"], r["rounds"]) == (WRONG, False, 1)
    r = by_q["broken"]  # the calculator error went back to the model as the tool message
    assert (r["tool_valid"], r["rounds"]) == (False, 2) and r["content"].startswith("The answer is error:")
    r = by_q["always call"]  # 2 tool rounds, then a third generation that still calls: no final answer
    assert (r["outcome"], r["tool_valid"], r["rounds"]) == (MALFORMED, True, 3)
    second = [p for p in eng.prompts if "2+3 please" in p and "<tool_response>" in p]
    assert len(second) == 1 and "<tool_response>5</tool_response>" in second[0] and "<tool_call>calculator" in second[0]
    assert all(r["mtp_positions"] > 0 for r in recs)  # every round's completion was replayed for MTP drafts


# --------------------------------------------------------------------------------------------------- MTP drafts
@pytest.fixture(scope="module")
def pmodel():
    return perturb(glm5.load_model(tiny().replace(index_topk=8)), seed=3)


def _ref_drafts(model, ids, P):
    """Slow reference: for each draft point, the MTP head's argmax on the prefix alone."""
    hits = []
    with torch.no_grad():
        for t in range(P - 1, len(ids) - 2):
            _, mtp = model.forward_with_mtp(torch.tensor([ids[:t + 2]]))
            top2 = mtp[0, -1].topk(2).values
            assert top2[0] - top2[1] > MARGIN, "reference draft too close to a tie for an exact comparison"
            hits.append(int(mtp[0, -1].argmax()) == ids[t + 2])
    return hits


def test_mtp_acceptance_matches_slow_loop(pmodel):
    g = torch.Generator().manual_seed(0)
    V = pmodel.config.vocab_size
    seqs = [(torch.randint(0, V, (n,), generator=g).tolist(), p) for n, p in [(14, 5), (9, 8), (25, 10), (6, 6)]]
    # Plant MTP's own drafts in the third sequence's generated part so some drafts are accepted.
    ids, P = seqs[2]
    with torch.no_grad():
        for t in range(P - 1, len(ids) - 2, 2):
            ids[t + 2] = int(pmodel.forward_with_mtp(torch.tensor([ids[:t + 2]]))[1][0, -1].argmax())
    got = mtp_acceptance(pmodel, seqs, batch_tokens=40)  # a small budget: batches of 1-2 padded rows
    want = [(sum(h), len(h)) for h in (_ref_drafts(pmodel, i, p) for i, p in seqs)]
    assert got == want
    assert got[1] == (0, 0) and got[3] == (0, 0)  # one generated token (or none): no draft to check
    assert 0 < got[2][0] < got[2][1]


def test_mtp_acceptance_from_given_hidden_states(pmodel):
    """The MTP layer alone over the main model's states (as the engine returns them) counts the same drafts."""
    g = torch.Generator().manual_seed(1)
    V = pmodel.config.vocab_size
    seqs = [(torch.randint(0, V, (n,), generator=g).tolist(), p) for n, p in [(14, 5), (25, 10), (6, 6)]]
    with torch.no_grad():
        hidden = [pmodel.hidden(torch.tensor([ids]))[0, :-1] for ids, _ in seqs]
    assert mtp_acceptance(pmodel, seqs, hidden=hidden, batch_tokens=40) == mtp_acceptance(pmodel, seqs)
    with pytest.raises(ValueError, match="one per token but the last"):
        mtp_acceptance(pmodel, seqs[:1], hidden=[hidden[0][:-1]])


def test_mtp_acceptance_is_one_when_generation_follows_drafts(pmodel):
    ids, P = list(range(1, 8)), 7
    ids.append(11)  # the first generated token: no draft precedes it
    with torch.no_grad():
        while len(ids) < 20:
            ids.append(int(pmodel.forward_with_mtp(torch.tensor([ids]))[1][0, -1].argmax()))
    assert mtp_acceptance(pmodel, [(ids, P)]) == [(12, 12)]


def test_mtp_skipped_without_mtp_layer(tok):
    model = glm5.load_model(tiny().replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="no MTP layer"):
        mtp_acceptance(model, [([1, 2, 3, 4], 2)])
    res = evaluate(model, tok, {"chat": [ex("chat", "Hi", "Hello")]}, max_tokens=3, cache_bytes=1 << 22,
                   progress=False)
    assert "no MTP layer" in res["mtp"]["skipped"] and "no MTP layer" in format_table(res)


# ------------------------------------------------------------------------------------------------ dense is dense
def _greedy_full_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > MARGIN, "reference step too close to a tie for an exact comparison"
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_dense_retrieval_mode_attends_to_every_key(pmodel):
    attns = [m for m in pmodel.modules() if isinstance(m, MLAttention)]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, o: seen.append(o[1] is None)) for m in attns]
    prompt = torch.randint(0, pmodel.config.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=6)
    try:
        with attention_mode(pmodel, "dense"):
            eng = Engine(pmodel, num_blocks=32, block_size=4)
            dense_out = eng.generate([prompt], greedy)[0][0].token_ids
            assert seen and all(seen)  # every layer call of the engine's prefill and decode: no top-k at all
            assert dense_out == _greedy_full_forward(pmodel, prompt, 6)
            dense_logits = pmodel(torch.tensor([prompt]))[0, -1]
        seen.clear()
        with attention_mode(pmodel, "sparse", index_topk=1):
            assert all(m.index_topk == 1 for m in attns) and pmodel.config.index_topk == 1
            Engine(pmodel, num_blocks=32, block_size=4).generate([prompt], greedy)
            assert not any(seen)  # a 30-token context > top-1: every call selected keys
            sparse_logits = pmodel(torch.tensor([prompt]))[0, -1]
    finally:
        for h in hooks:
            h.remove()
    assert (dense_logits - sparse_logits).abs().max() > 1e-2  # top-1 really drops keys: the comparison can fail
    assert pmodel.impl.dsa == "auto" and pmodel.config.index_topk == 8 and all(m.index_topk == 8 for m in attns)


def test_attention_mode_restores_on_error(pmodel):
    with pytest.raises(RuntimeError):
        with attention_mode(pmodel, "sparse", index_topk=2):
            raise RuntimeError("boom")
    assert pmodel.config.index_topk == 8 and pmodel.impl.dsa == "auto"
    with pytest.raises(ValueError, match="attention mode"):
        with attention_mode(pmodel, "half"):
            pass


# -------------------------------------------------------------------------------------------------- end to end
def test_evaluate_end_to_end_tiny_random_model(tok, tmp_path):
    model = glm5.load_model(tiny().replace(vocab_size=tok.vocab_size, index_topk=16))
    filler = "The sky is blue and the grass is green. "
    suites = {
        "arithmetic": [ex("arithmetic", "What is 2 + 3?", "5"), ex("arithmetic", "What is 7 * 6?", "42")],
        "world": [ex("world", "What is the capital of Veloria?", "Ostra")],
        "unknown": [ex("unknown", "What is the capital of Zyxtrel?", ABSTAIN)],
        "retrieval": [ex("retrieval", filler * k + "The code is K7Q2. " + filler * k + "What is the code?", "K7Q2",
                         meta={"context_tokens": 20 * k, "depth": 0.5}) for k in (6, 12)],
        "tool": [ex("tool", "What is 12 * 13?", "156", CALC_TOOL)],
        "chat": [ex("chat", "Hello!", "Hi")],
    }
    res = evaluate(model, tok, suites, max_tokens=5, calculator=calc, cache_bytes=1 << 22, progress=False)
    assert {"suites", "hallucination", "retrieval", "tool", "mtp", "config", "records", "notes", "engine",
            "skipped", "seconds"} <= res.keys()
    want_n = {"arithmetic": 2, "world": 1, "unknown": 1, "retrieval/sparse": 2, "retrieval/dense": 2, "tool": 1,
              "chat": 1}
    assert {k: v["n"] for k, v in res["suites"].items()} == want_n
    for s in res["suites"].values():
        assert sum(s["counts"].values()) == s["n"]
    assert len(res["records"]) == sum(want_n.values())
    assert all(r["outcome"] in (CORRECT, WRONG, ABSTAINED, MALFORMED) for r in res["records"])
    # shortest retrieval prompt is > 100 tokens: sparse top-k = min(16, shortest // 8) < the prompt
    sparse = res["retrieval"]["sparse"]
    assert sparse["index_topk"] == min(16, min(r["prompt_tokens"] for r in res["records"]
                                               if r["suite"] == "retrieval/sparse") // 8)
    assert res["retrieval"]["dense"]["index_topk"] is None
    assert [c["context_tokens"] for c in sparse["grid"]] == [120, 240]
    # five tokens of a random model are no tool call: the record says so, and the tool rates count it
    assert [(r["tool_valid"], r["outcome"]) for r in res["records"] if r["suite"] == "tool"] == [(False, MALFORMED)]
    assert res["tool"] == {"n": 1, "valid_call_rate": 0.0, "final_accuracy": 0.0}
    gen = sum(r["output_tokens"] for r in res["records"])
    assert res["mtp"]["positions"] == sum(r["mtp_positions"] for r in res["records"]) > 0
    assert res["mtp"]["positions"] <= gen
    assert model.config.index_topk == 16 and model.impl.dsa == "auto"  # restored after the sparse run
    table = format_table(res)
    assert "| retrieval/dense |" in table and "Retrieval accuracy" in table
    p = write_json(res, tmp_path / "out" / "eval.json")
    import json

    assert json.loads(p.read_text())["suites"]["chat"]["n"] == 1


def test_sparse_kv_is_never_reused_by_the_dense_run(tok):
    # Both modes share one engine; its prefix cache holds the sparse run's KV of the same prompts. The dense run must
    # recompute: its outputs equal a dense-only evaluation.
    model = perturb(glm5.load_model(tiny().replace(vocab_size=tok.vocab_size, index_topk=16)), seed=5)
    filler = "The sky is blue and the grass is green. "
    suites = {"retrieval": [ex("retrieval", filler * 8 + "The code is K7Q2. " + filler * 4 + "What is the code?",
                               "K7Q2", meta={"context_tokens": 240, "depth": 0.66})]}
    kw = dict(max_tokens=6, cache_bytes=1 << 22, progress=False, mtp=False)
    both = evaluate(model, tok, suites, **kw)["records"]
    dense = evaluate(model, tok, suites, retrieval_modes=("dense",), **kw)["records"]
    sparse = evaluate(model, tok, suites, retrieval_modes=("sparse",), **kw)["records"]
    assert [r["text"] for r in both] == [r["text"] for r in sparse + dense]
    assert sparse[0]["text"] != dense[0]["text"]  # the modes really differ on this prompt, so reuse would show


def test_retrieval_generations_have_their_own_cap(tok):
    # Retrieval answers are one sentence; past the trained context a model rambles to any budget (most of the eval's
    # time once): retrieval stops at retrieval_max_tokens, the other suites at max_tokens.
    model = perturb(glm5.load_model(tiny().replace(vocab_size=tok.vocab_size, index_topk=16)), seed=5)
    filler = "The sky is blue and the grass is green. "
    suites = {"retrieval": [ex("retrieval", filler * 8 + "The code is K7Q2. What is the code?", "K7Q2",
                               meta={"context_tokens": 160, "depth": 0.9})],
              "chat": [ex("chat", "Hello!", "Hi")]}
    res = evaluate(model, tok, suites, max_tokens=9, retrieval_max_tokens=3, cache_bytes=1 << 22, progress=False,
                   mtp=False)
    out = {r["suite"]: (r["output_tokens"], r["finish_reason"]) for r in res["records"]}
    assert out["retrieval/sparse"] == out["retrieval/dense"] == (3, "length")
    assert out["chat"] == (9, "length")
    assert res["config"]["max_tokens"] == 9 and res["config"]["retrieval_max_tokens"] == 3


def test_default_suites_and_cli(tok, tmp_path, capsys):
    from glm5.eval.cli import main
    from glm5.eval.run import default_suites

    s = default_suites(("arithmetic", "retrieval"), n=2, seed=0, tokenizer=tok, lengths=(128, 256), depths=(0.5,))
    assert len(s["arithmetic"]) == 2 and len(s["retrieval"]) == 2  # n // 2 cells = 1 example a cell
    assert [(e.meta["length_bucket"], e.meta["depth_bucket"]) for e in s["retrieval"]] == [(128, 0.5), (256, 0.5)]
    for e in s["retrieval"]:  # context measured in this tokenizer's tokens
        assert abs(len(tok.encode(e.prompt_messages[-1]["content"])) - e.meta["length_bucket"]) <= 16
    # {length: examples}: that many at each length, split over the depths (the speedrun's eval weights its lengths)
    m = default_suites(("retrieval",), n=2, seed=0, tokenizer=tok, lengths={128: 4, 256: 2}, depths=(0.1, 0.9))
    cells = [(e.meta["length_bucket"], e.meta["depth_bucket"]) for e in m["retrieval"]]
    assert cells == [(128, 0.1), (128, 0.1), (128, 0.9), (128, 0.9), (256, 0.1), (256, 0.9)]
    assert len({e.prompt_messages[-1]["content"] for e in m["retrieval"]}) == 6
    from glm5.eval.cli import _lengths

    assert _lengths("1024,2048") == [1024, 2048] and _lengths("1024:300, 2048:33") == {1024: 300, 2048: 33}
    for bad in ("1024:300,2048", "1024:x", "0:5", "1024:0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _lengths(bad)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", "tiny", "--n", "1", "--suites", "arithmetic,tool", "--max-tokens", "3",
               "--cache-mib", "8", "--quiet", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| arithmetic | 1 |" in printed and "| tool | 1 |" in printed
    import json

    res = json.loads(out.read_text())
    assert res["model"]["untrained"] is True and res["tool"]["n"] == 1
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    model = glm5.load_model(tiny().replace(vocab_size=tok.vocab_size))
    with pytest.raises(ValueError, match="unknown families"):
        evaluate(model, tok, {"x": [ex("poetry", "q", "a")]}, progress=False, cache_bytes=1 << 22)


def test_gold_answers_score_right_through_the_eval_path(tok):
    # The generators' own gold turns, replayed as the "generation" through run_suite (render, decode, parse, tool
    # loop, score): every family must come out right and every gold tool call valid.
    from glm5.chat import render_chat
    from glm5.data import calculator, examples

    exs = [e for fam in ("arithmetic", "world", "unknown", "tool", "chat") for e in examples(fam, "heldout", 3, 1)]
    exs += examples("retrieval", "heldout", 2, 1, context_tokens=96, depth=0.5)
    gold = {}
    for e in exs:
        for i, m in enumerate(e.messages):
            if m["role"] != "assistant":
                continue
            prompt = render_chat(tok, e.messages[:i], e.tools).ids
            full = render_chat(tok, e.messages[:i + 1], e.tools, add_generation_prompt=False).ids
            assert full[:len(prompt)] == prompt
            gold[tok.decode(prompt)] = tok.decode(full[len(prompt):]) + \
                ("<|observation|>" if m.get("tool_calls") else "<|user|>")
    model = glm5.load_model(tiny().replace(vocab_size=tok.vocab_size))
    recs = []
    for fam in ("arithmetic", "world", "unknown", "tool", "chat", "retrieval"):
        eng = ScriptedEngine(tok, lambda p: gold[p])  # KeyError: the eval built a prompt the gold chat never had
        recs += run_suite(eng, model, tok, fam, [e for e in exs if e.family == fam], max_tokens=4000,
                          calculator=calculator, mtp=False, progress=False)
    s = summarize(recs)
    assert {k: v["accuracy"] for k, v in s["suites"].items()} == {f: 1.0 for f in s["suites"]}
    assert s["tool"] == {"n": 3, "valid_call_rate": 1.0, "final_accuracy": 1.0}
    assert s["hallucination"]["unknown"] == {"wrong": 0, "abstained": 3, "rate": 0.0}
    assert [r["rounds"] for r in recs if r["family"] == "tool"] == [2, 2, 2]


def test_auroc_equals_the_pairwise_count_with_ties_half():
    from glm5.eval.score import auroc

    rng = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=rng).tolist()  # few distinct values: many ties
    neg = torch.randint(0, 4, (30,), generator=rng).tolist()
    want = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(pos, neg) == pytest.approx(want)
    assert auroc([1.0], []) is None


def test_calibration_declines_the_least_confident_answers_within_the_budget():
    from glm5.eval.score import calibration

    def rec(outcome, conf, family="world"):
        return {"family": family, "outcome": outcome, "confidence": conf}

    # 100 world answers: 90 right (confidence -0.01 .. -0.9), 5 wrong below all right ones, 3 wrong among them,
    # 2 abstained; budget 2% = 2 right answers may be declined.
    recs = [rec(CORRECT, -0.01 * (i + 1)) for i in range(90)] + [rec(WRONG, -2.0 - i) for i in range(5)]
    recs += [rec(WRONG, -0.895), rec(WRONG, -0.5), rec(WRONG, -0.05), rec(ABSTAINED, None), rec(ABSTAINED, None)]
    recs += [rec(ABSTAINED, -0.1, "unknown")] * 40 + [rec(WRONG, -0.1, "unknown")] * 2
    c = calibration(recs)
    # in order: 5 wrong, then right (-0.90, lost 1), wrong (-0.895), right (-0.89, lost 2), right (-0.88: over budget)
    assert c["wrong_declined"] == 6 and c["wrong"] == 8
    assert c["known_rate"] == pytest.approx(8 / 10) and c["known_rate_after"] == pytest.approx(2 / 10)
    assert c["combined_rate"] == pytest.approx(10 / 52) and c["combined_rate_after"] == pytest.approx(4 / 52)
    assert 0.8 < c["auroc"] < 1
    assert calibration([rec(ABSTAINED, None, "unknown")]) is None


def test_eval_records_carry_the_answer_confidence(tok):
    model = perturb(glm5.load_model(tiny().replace(vocab_size=tok.vocab_size)), seed=2)
    exs = [ex("world", "Who founded Tarnik Works?", "Ossa", meta={"entity": "Tarnik Works"})]
    (rec,) = run_suite(Engine(model, eos_token_ids=tok.eos_ids), model, tok, "world", exs, max_tokens=6, mtp=False,
                       progress=False)
    from glm5.chat import render_chat

    prompt = render_chat(tok, exs[0].prompt_messages, enable_thinking=True).ids
    ((g,),) = Engine(model, eos_token_ids=tok.eos_ids).generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))
    assert rec["confidence"] == pytest.approx(min(g.logprobs), abs=1e-4) and rec["confidence"] < 0


# ------------------------------------------------------------------------------- suites that meet users where they are
def test_score_scope_refusals():
    def scope_ex(q, specific):
        return ex("scope", q, specific, meta={"specific": specific})

    mul = scope_ex("what is 54*45", "I can only multiply by a one-digit number")
    assert score(mul, out("I can only multiply by a one-digit number, so I can't compute 54 * 45.")) == CORRECT
    assert score(mul, out("I can't do that.")) == ABSTAINED  # honest, not specific
    assert score(mul, out("54 * 45 = 2430.")) == WRONG
    assert score(mul, out("I can only multiply by a one-digit number. It is 1180.")) == WRONG  # a number invented
    fr = scope_ex("What is the capital of France?", "I don't know France")
    assert score(fr, out("I don't know France; I have no information about it.")) == CORRECT
    assert score(fr, out("I don\u2019t know France.")) == CORRECT
    assert score(fr, out("I don't know Frand; I have no information about it.")) == ABSTAINED  # the name mangled
    assert score(fr, out("I don't know Francesca.")) == ABSTAINED
    assert score(fr, out("The capital of France is Paris.")) == WRONG
    assert score(fr, out("", "thinking")) == MALFORMED
    from glm5.eval.score import details

    assert details(mul, out("I can only multiply by a one-digit number. It is 1,180.")) == {"invented_numbers": [1180]}
    assert details(mul, out("I can't compute 54 * 45.")) == {"invented_numbers": []}


def _tc(expect_call, inner=None, answer="x", meta=None):
    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {p: {"type": t}}, "required": [p]}}}
        for n, p, t in (("get_weather", "city", "string"), ("set_timer", "minutes", "integer"))]
    call = {"name": "get_weather", "arguments": {"city": "Paris"}} if expect_call else None
    return ex("tool_choice", "What's the weather in Paris?", answer, tools,
              meta={"expect": "call" if expect_call else "answer", "call": call, "inner": inner,
                    "declared": ["get_weather", "set_timer"], **(meta or {})})


def _called(name, args):
    return out(None, calls=[{"id": "c0", "type": "function", "function": {"name": name, "arguments": args}}])


def test_score_tool_choice():
    from glm5.eval.score import details

    call = _tc(True)
    assert score(call, _called("get_weather", '{"city": "Paris"}')) == CORRECT
    assert score(call, _called("get_weather", '{"city": "Pari"}')) == WRONG  # the argument not copied exactly
    assert score(call, _called("get_weather", '{"location": "Paris"}')) == WRONG
    assert score(call, _called("calculator", '{"expression": "1+1"}')) == WRONG
    assert details(call, _called("calculator", '{"expression": "1+1"}')) == {
        "calls": ["calculator"], "undeclared_calls": 1, "choice_right": True}
    assert score(call, out("It is sunny.")) == WRONG and details(call, out("It is sunny."))["choice_right"] is False
    refuse = _tc(False, "scope", meta={"specific": "I can't play music"})
    assert score(refuse, out("I can't play music: I have no tool for that.")) == CORRECT
    assert score(refuse, _called("set_timer", '{"minutes": 5}')) == WRONG
    assert details(refuse, _called("set_timer", '{"minutes": 5}'))["choice_right"] is False
    unknown = _tc(False, "unknown", ABSTAIN)
    assert score(unknown, out("I don't know Zyx.")) == CORRECT  # the inner family's right answer
    assert score(unknown, out("Zyx was founded in 1900.")) == WRONG
    arith = _tc(False, "arithmetic", "42")
    assert score(arith, out("6 * 7 = 42.")) == CORRECT and score(arith, out("6 * 7 = 41.")) == WRONG
    recs = [{"suite": "tool_choice", "family": "tool_choice", "meta": e.meta, "outcome": score(e, o), **details(e, o)}
            for e, o in ((call, _called("get_weather", '{"city": "Paris"}')), (call, out("sunny")),
                         (refuse, _called("calculator", '{"expression": "2"}')), (unknown, out("I don't know Zyx.")))]
    s = summarize(recs)["suites"]["tool_choice"]
    assert (s["accuracy"], s["choice_accuracy"], s["undeclared_calls"]) == (0.5, 0.5, 1)
    assert (s["call_accuracy"], s["answer_accuracy"]) == (0.5, 0.5)



def test_tool_chats_decode_as_served(tok):
    """With tools declared the eval decodes under the server's grammar (glm5.server.runs.turn_grammar): a random
    model pushed toward the call tags then writes calls of declared tools only, each with that tool's parameter
    names; unconstrained (served_tools=False) the same model writes no well-formed call at all."""
    import re

    from .test_grammar import tagged_model

    model = tagged_model()
    suite = {"tool_choice": [_tc(True, meta={"template": str(i)}) for i in range(3)]}
    done = {}
    for served in (True, False):
        r = evaluate(model, tok, suite, mtp=False, progress=False, max_tokens=48, served_tools=served)
        assert r["config"]["served_tools"] is served
        done[served] = r["records"]
    params = {"get_weather": {"city"}, "set_timer": {"minutes"}}
    for rec in done[True]:
        calls = re.findall(r"<tool_call>(.*?)((?:<arg_key>.*?</arg_key>)?)<arg_value>", rec["text"])
        assert calls and rec["calls"] and set(rec["calls"]) <= set(params) and rec["undeclared_calls"] == 0
        for name, key in calls:
            assert key[len("<arg_key>"):-len("</arg_key>")] in params[name]
    assert all(not rec["calls"] and rec["outcome"] == "malformed" for rec in done[False])


def test_summaries_by_turn_and_family_and_own_suites_only():
    recs = [{"suite": "multiturn", "family": f, "outcome": o, "meta": {"turn": t, "turn_kind": k}}
            for f, o, t, k in (("world", CORRECT, 1, "new"), ("arithmetic", WRONG, 2, "new"),
                               ("unknown", ABSTAINED, 2, "refer_pronoun"), ("world", WRONG, 3, "refer_what_about"))]
    recs.append({"suite": "world", "family": "world", "outcome": CORRECT, "meta": {}})
    s = summarize(recs)
    m = s["suites"]["multiturn"]
    assert {t: v["accuracy"] for t, v in m["by_turn"].items()} == {1: 1.0, 2: 0.5, 3: 0.0}
    assert m["by_family"]["world"] == {"n": 2, "accuracy": 0.5} and "hallucination_rate" not in m
    assert m["by_turn_kind"]["refer_pronoun"] == {"n": 1, "accuracy": 1.0}
    # the overall hallucination numbers count the world / unknown suites themselves, not a multi-turn one
    assert s["hallucination"]["known"] == {"wrong": 0, "abstained": 0, "rate": None}
    assert s["hallucination"]["unknown"]["abstained"] == 0
    assert "by turn 1: 100.0% (n=1), 2: 50.0% (n=2), 3: 0.0% (n=1)" in format_table(s)


def test_gold_answers_of_the_new_suites_score_right_through_the_eval_path(tok):
    # As test_gold_answers_score_right_through_the_eval_path, for the typed, multi-turn, thinking-off, out-of-scope
    # and declared-tool suites: the prompt each gets (earlier turns, thinking off, declared tools) is a prefix of its
    # gold chat, and the gold turn scores right.
    from glm5.chat import render_chat
    from glm5.data import examples

    suites = ("arithmetic_typed", "multiturn", "scope", "tool_choice", "arithmetic_nothink", "world_nothink",
              "chat_nothink")
    exs = {s: examples(s, "heldout", 12, 1) for s in suites}
    gold = {}
    for e in (e for es in exs.values() for e in es):
        i = len(e.prompt_messages)
        prompt = render_chat(tok, e.prompt_messages, e.tools, enable_thinking=e.thinking).ids
        full = render_chat(tok, e.messages[:i + 1], e.tools, add_generation_prompt=False).ids
        assert full[:len(prompt)] == prompt
        gold[tok.decode(prompt)] = tok.decode(full[len(prompt):]) + \
            ("<|observation|>" if e.messages[i].get("tool_calls") else "<|user|>")
    model = glm5.load_model(tiny().replace(vocab_size=tok.vocab_size))
    recs = []
    for s in suites:
        eng = ScriptedEngine(tok, lambda p: gold[p])
        recs += run_suite(eng, model, tok, s, exs[s], max_tokens=4000, mtp=False, progress=False)
        assert all(p.endswith("<|assistant|></think>") == s.endswith("_nothink") for p in eng.prompts)
    summary = summarize(recs)["suites"]
    assert {k: v["accuracy"] for k, v in summary.items()} == {s: 1.0 for s in suites}
    assert summary["scope"]["declined_rate"] == 1.0 and summary["scope"]["invented_numbers"] == 0
    tc = summary["tool_choice"]
    assert tc["choice_accuracy"] == 1.0 and tc["undeclared_calls"] == 0 and tc["call_accuracy"] == 1.0
    assert all(r["rounds"] == 1 for r in recs if r["suite"] == "tool_choice")  # scored on the first turn
    assert set(summary["multiturn"]["by_turn"]) == {1, 2, 3}


def test_cli_takes_the_new_suites():
    from glm5.eval.cli import MORE_SUITES, _suites

    assert _suites("arithmetic_typed,multiturn,scope,tool_choice,world_nothink") == [
        "arithmetic_typed", "multiturn", "scope", "tool_choice", "world_nothink"]
    assert {"nothink", "arithmetic_nothink", "chat_nothink", "arithmetic_long"} <= set(MORE_SUITES)
    with pytest.raises(argparse.ArgumentTypeError, match="tool_choice"):
        _suites("tools")
