"""Held-out evaluation through the inference engine: greedy, thinking on (off for an example that says so:
Example.thinking), every prompt of a suite submitted at once (continuous batching), calculator calls executed between
rounds (a tool_choice example is scored on its first turn: its tools have no runtime here), retrieval run sparse and
dense, and the MTP head's 1-token draft acceptance measured offline on the completions.

    result = evaluate(model, tok, n=100)          # suites from glm5.data (held-out split)
    print(format_table(result))                    # glm5/eval/report.py

Letters: B rows, T tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from contextlib import contextmanager
import torch

from ..chat import render_chat
from ..chat_parse import parse_output, token_pieces
from ..data.example import ALL_FAMILIES, FAMILIES, Example
from ..model.mla import MLAttention
from .score import details, run_tool_call, score, summarize, valid_first_call

RETRIEVAL_LENGTHS = (1024, 2048, 4096)
RETRIEVAL_DEPTHS = (0.1, 0.5, 0.9)
RETRIEVAL_MODES = ("sparse", "dense")
# A retrieval answer is one sentence of thinking and one of reply (~40 tokens; the longest correct one the speedrun's
# models wrote was 54). Past the trained context they ramble to any budget, which made retrieval most of the eval's
# time at a 256-token cap: their budget is this, or max_tokens if smaller.
RETRIEVAL_MAX_TOKENS = 96


# ------------------------------------------------------------------------------------------------ attention mode
@contextmanager
def attention_mode(model, mode: str, index_topk: int | None = None):
    """Run the block with DSA on ("sparse": model.impl.dsa "auto", optionally a smaller top-k) or off ("dense": every
    visible key). Each MLAttention copied cfg.index_topk when it was built and reads only its own copy, so the
    top-k is set on the modules (and on model.config, for readers of the config); everything is restored after."""
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"attention mode must be one of {RETRIEVAL_MODES}, got {mode!r}")
    attns = [m for m in model.modules() if isinstance(m, MLAttention)]
    old_impl, old_cfg_k, old_k = model.impl, model.config.index_topk, [m.index_topk for m in attns]
    try:
        if mode == "dense":
            model.impl = dataclasses.replace(old_impl, dsa="off")
        else:
            model.impl = dataclasses.replace(old_impl, dsa="auto" if old_impl.dsa == "off" else old_impl.dsa)
            if index_topk is not None:
                if index_topk < 1:
                    raise ValueError(f"index_topk must be >= 1, got {index_topk}")
                model.config.index_topk = index_topk
                for m in attns:
                    m.index_topk = index_topk
        yield model
    finally:
        model.impl, model.config.index_topk = old_impl, old_cfg_k
        for m, k in zip(attns, old_k):
            m.index_topk = k


# --------------------------------------------------------------------------------------------------- MTP drafts
@torch.no_grad()
def mtp_acceptance(model, seqs: list[tuple[list[int], int]], *, hidden: list | None = None,
                   batch_tokens: int = 8192) -> list[tuple[int, int]]:
    """For each (ids, prompt_len): (hits, positions) of a 1-token greedy MTP draft over the generated tokens.

    In speculative decoding with one MTP draft, after the main model emits x[t+1] from h[t], the MTP head drafts
    x[t+2] from (h[t], x[t+1]); the draft is accepted iff the main model then emits the same token. The first draft
    comes right after prefill (t = P-1, drafting x[P+1]), so positions t = P-1 .. N-3: N - P - 1 drafts. One
    forward per batch replays them all (causal: a position never sees later tokens, so right padding is inert):
    of the MTP layer alone where `hidden` gives each sequence's main-model states h[0 .. N-2] (as the engine
    returns them with return_hidden), else of the whole model."""
    if not len(model.mtp):
        raise ValueError("this model has no MTP layer (num_nextn_predict_layers = 0)")
    out: list[tuple[int, int] | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    device = model.lm_head.weight.device
    i = 0
    while i < len(order):
        j = i + 1  # grow the batch while padded tokens fit the budget (sorted: the last row is the longest)
        while j < len(order) and (j - i + 1) * len(seqs[order[j]][0]) <= batch_tokens:
            j += 1
        rows = order[i:j]
        T = len(seqs[rows[-1]][0])
        ids_BT = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids_BT[b, :len(seqs[r][0])] = torch.tensor(seqs[r][0])
        ids_BT = ids_BT.to(device)
        if T >= 3:
            pos_BT = torch.arange(T, device=device).expand(len(rows), T)
            if hidden is None:
                h_BTD = model.hidden(ids_BT, pos_BT)[:, :-1]
            else:
                h_BTD = torch.zeros(len(rows), T - 1, model.config.hidden_size, dtype=model.lm_head.weight.dtype,
                                    device=device)
                for b, r in enumerate(rows):
                    h = hidden[r]
                    if h.shape[0] != len(seqs[r][0]) - 1:
                        raise ValueError(f"hidden states of sequence {r}: {h.shape[0]} rows for "
                                         f"{len(seqs[r][0])} tokens (want one per token but the last)")
                    h_BTD[b, :h.shape[0]] = h.to(h_BTD)
            logits_BTV, _ = model.mtp_step(h_BTD, ids_BT[:, 1:], pos_BT[:, :-1])
            draft_BT = logits_BTV.argmax(-1)  # draft_BT[:, t] is the draft of token t+2
        for b, r in enumerate(rows):
            ids, P = seqs[r]
            N = len(ids)
            if N - P - 1 <= 0 or P < 1:
                out[r] = (0, 0)
                continue
            hits = (draft_BT[b, P - 1:N - 2] == ids_BT[b, P + 1:N]).sum().item()
            out[r] = (int(hits), N - P - 1)
        i = j
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ generation
def _generate(engine, prompts: list[list[int]], max_tokens: int, hidden: bool = False, grammars: list | None = None):
    """Greedy completions of all prompts at once -> per prompt (output ids, finish_reason, hidden states or None,
    log-probs of the output ids), each under its grammar where `grammars` gives one. Prompts that do not fit the
    engine get (None, reason, None, None)."""
    from ..engine import SamplingParams, run_to_completion

    results: list = [None] * len(prompts)
    fit, params = [], []
    for i, p in enumerate(prompts):
        room = engine.max_model_len - len(p)
        if room < 1:
            results[i] = (None, f"prompt of {len(p)} tokens does not fit max_model_len {engine.max_model_len}", None,
                          None)
            continue
        fit.append(i)
        params.append(SamplingParams(temperature=0.0, max_tokens=min(max_tokens, room),
                                     grammar=grammars[i] if grammars is not None else None))
    acc: dict[int, list[int]] = {i: [] for i in fit}
    lps: dict[int, list[float]] = {i: [] for i in fit}
    for k, o in run_to_completion(engine, [prompts[i] for i in fit], params, return_hidden=hidden):
        acc[fit[k]] += o.new_token_ids
        lps[fit[k]] += o.logprobs
        if o.finished:
            results[fit[k]] = (acc[fit[k]], o.finish_reason, o.hidden, lps[fit[k]])
    return results


def run_suite(engine, model, tok, name: str, examples: list[Example], *, max_tokens: int, calculator=None,
              max_tool_rounds: int = 2, mtp: bool = True, progress: bool = True, extra: dict | None = None,
              tool_grammar=None) -> list[dict]:
    """Generate, run tools, score, and (mtp) measure drafts for one suite -> per-example records. tool_grammar:
    tools -> the Grammar a turn with those tools decodes under (as the server does), or None: unconstrained."""
    from tqdm import tqdm

    eos = set(engine.eos_token_ids)
    convs = [list(ex.prompt_messages) for ex in examples]
    recs = [{"suite": name, "family": ex.family, "answer": ex.answer, "meta": dict(ex.meta), **(extra or {})}
            for ex in examples]
    # per example and round: (prompt + output, prompt len), and the engine's hidden states of it for the MTP drafts
    seqs: list[list[tuple[list[int], int]]] = [[] for _ in examples]
    hiddens: list[list] = [[] for _ in examples]
    active = list(range(len(examples)))
    bar = tqdm(total=len(examples), desc=name, disable=not progress)
    try:
        for rnd in range(max_tool_rounds + 1):
            rendered = [render_chat(tok, convs[i], examples[i].tools, enable_thinking=examples[i].thinking)
                        for i in active]
            for i, r in zip(active, rendered):
                recs[i].setdefault("prompt_tokens", len(r.ids))
            grammars = [tool_grammar(examples[i].tools) if tool_grammar and examples[i].tools else None
                        for i in active]
            outs = _generate(engine, [r.ids for r in rendered], max_tokens, hidden=mtp, grammars=grammars)
            again = []
            for i, r, (ids, finish, h, logprobs) in zip(active, rendered, outs):
                ex, rec = examples[i], recs[i]
                if ids is None:
                    rec.update(skipped=finish, outcome=None)
                    bar.update()
                    continue
                seqs[i].append((r.ids + ids, len(r.ids)))
                hiddens[i].append(h)
                text_ids = ids[:-1] if finish == "stop" and ids and ids[-1] in eos else ids
                parsed = parse_output(token_pieces(tok, text_ids), thinking=r.thinking, tools=ex.tools,
                                      parse_tools=bool(ex.tools), make_id=lambda k: f"call_{k}")
                rec["output_tokens"] = rec.get("output_tokens", 0) + len(ids)
                calls_tools = ex.family == "tool"  # the calculator family; other tools have no runtime here
                if calls_tools and rnd == 0:
                    rec["tool_valid"] = calculator is not None and valid_first_call(parsed, ex.tools, calculator)
                if calls_tools and parsed.tool_calls and finish == "stop" and rnd < max_tool_rounds:
                    if calculator is None:
                        raise ValueError(f"suite {name!r} offers tools but no calculator was given")
                    msg = parsed.message()
                    msg["content"] = msg["content"] or ""
                    convs[i].append(msg)
                    for call in parsed.tool_calls:
                        convs[i].append({"role": "tool", "tool_call_id": call["id"],
                                         "content": run_tool_call(call, ex.tools, calculator)[0]})
                    again.append(i)
                    continue
                # confidence: the least likely token of the final turn (greedy: the model's doubt at its shakiest step)
                rec.update(outcome=score(ex, parsed, finish), finish_reason=finish, rounds=rnd + 1,
                           confidence=round(min(logprobs), 4) if logprobs else None,
                           text=tok.decode(ids), content=parsed.content,
                           reasoning_chars=len(parsed.reasoning_content or ""), **details(ex, parsed))
                bar.update()
            active = again
            if not active:
                break
    finally:
        bar.close()
    for ex, rec in zip(examples, recs):
        if ex.family == "retrieval":  # the grid cell: as asked (default_suites), else as generated, else measured
            m = ex.meta
            rec["context_tokens"] = m.get("length_bucket", m.get("context_tokens", rec.get("prompt_tokens")))
            rec["depth"] = m.get("depth_bucket", m.get("depth"))
    if mtp and len(model.mtp):
        flat = [(i, s, h) for i, (ss, hs) in enumerate(zip(seqs, hiddens)) for s, h in zip(ss, hs)]
        hs = [h for _, _, h in flat]
        got = mtp_acceptance(model, [s for _, s, _ in flat], hidden=hs if all(h is not None for h in hs) else None)
        for (i, _, _), (h, p) in zip(flat, got):
            recs[i]["mtp_hits"] = recs[i].get("mtp_hits", 0) + h
            recs[i]["mtp_positions"] = recs[i].get("mtp_positions", 0) + p
    return recs


# ---------------------------------------------------------------------------------------------------- entry point
def default_suites(families=FAMILIES, *, n: int, seed: int, tokenizer=None, lengths=RETRIEVAL_LENGTHS,
                   depths=RETRIEVAL_DEPTHS) -> dict[str, list[Example]]:
    """Held-out suites from glm5.data: n per family (or generator or variant: glm5.data.GENERATORS, VARIANTS);
    retrieval n split over the (length, depth) grid (>= 1 a cell),
    or, with lengths a mapping {context length: examples}, that many at each length, split over the depths; the
    context measured in this tokenizer's tokens. Each retrieval example's meta gets the grid cell it was asked
    for (length_bucket, depth_bucket): the generator's own context_tokens / depth are what it achieved, which
    varies a little per example."""
    try:
        from ..data import examples
    except ImportError as e:
        raise ImportError(f"the task generators (glm5.data.examples) are not available ({e}); pass suites=") from None
    suites = {}
    for fam in families:
        if fam == "retrieval":
            per_length = dict(lengths) if isinstance(lengths, Mapping) else {L: n // len(lengths) for L in lengths}
            count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else None
            suites[fam] = []
            for k, (L, d) in enumerate((L, d) for L in per_length for d in depths):
                per = max(1, per_length[L] // len(depths))
                for ex in examples(fam, "heldout", per, seed + k, context_tokens=L, depth=d, count_tokens=count):
                    ex.meta.update(length_bucket=L, depth_bucket=d)
                    suites[fam].append(ex)
        else:
            suites[fam] = examples(fam, "heldout", n, seed)
    return suites


def _tool_grammars(tok):
    """tools -> the compiled Grammar of an assistant turn offered them, as `glm5 serve` builds it."""
    from ..chat import normalize_tools
    from ..server.runs import GrammarCompiler, turn_grammar

    compiler = GrammarCompiler(tok)
    return lambda tools: compiler.compile(turn_grammar(normalize_tools(tools)).text())


def evaluate(model, tokenizer, suites: dict[str, list[Example]] | None = None, *, n: int = 100, seed: int = 0,
             max_tokens: int = 256, families=FAMILIES, retrieval_lengths=RETRIEVAL_LENGTHS,
             retrieval_depths=RETRIEVAL_DEPTHS, retrieval_modes=RETRIEVAL_MODES, calculator=None, mtp: bool = True,
             max_tool_rounds: int = 2, cache_bytes: int | None = None, max_num_seqs: int = 64,
             retrieval_max_tokens: int = RETRIEVAL_MAX_TOKENS, progress: bool = True, served_tools: bool = True) -> dict:
    """Run held-out suites through the engine and score them. suites: name -> examples (None: glm5.data's held-out
    split, n per family). A suite of retrieval examples runs once per retrieval mode; "sparse" uses index_topk =
    min(the model's, shortest retrieval prompt // 8), so DSA really drops keys; its generations stop at
    retrieval_max_tokens (see RETRIEVAL_MAX_TOKENS). served_tools: a chat that declares tools decodes under the
    grammar `glm5 serve` puts on such a request (calls of declared tools only, with their parameter names); False
    scores the model's unconstrained output. Returns a JSON-able dict."""
    from ..engine import Engine

    t0 = time.perf_counter()
    retrieval_max_tokens = min(max_tokens, retrieval_max_tokens)
    if suites is None:
        suites = default_suites(families, n=n, seed=seed, tokenizer=tokenizer, lengths=retrieval_lengths,
                                depths=retrieval_depths)
    bad = sorted({f"{name}: {ex.family!r}" for name, exs in suites.items() for ex in exs
                  if ex.family not in ALL_FAMILIES})
    if bad:  # before any generation: scoring would fail only after the work is done
        raise ValueError(f"examples of unknown families ({', '.join(bad)}); known: {', '.join(ALL_FAMILIES)}")
    if calculator is None and any(ex.family == "tool" for exs in suites.values() for ex in exs):
        from ..data import calculator
    # As glm5.server.launch.build_engine, minus stop strings (none here): stops on the tokenizer's turn-end tokens,
    # <|observation|> included, which is where a tool call hands over.
    engine = Engine(model, cache_bytes=cache_bytes, max_num_seqs=max_num_seqs, eos_token_ids=tokenizer.eos_ids)
    notes = []
    has_mtp = len(model.mtp) > 0
    if mtp and not has_mtp:
        notes.append("MTP acceptance skipped: the model has no MTP layer (num_nextn_predict_layers = 0)")
    records: list[dict] = []
    kw = dict(max_tokens=max_tokens, calculator=calculator, max_tool_rounds=max_tool_rounds, mtp=mtp and has_mtp,
              progress=progress, tool_grammar=_tool_grammars(tokenizer) if served_tools else None)
    for name, exs in suites.items():
        if not exs:
            continue
        if all(ex.family == "retrieval" for ex in exs):
            shortest = min(len(render_chat(tokenizer, ex.prompt_messages, ex.tools).ids) for ex in exs)
            sparse_k = max(1, min(model.config.index_topk, shortest // 8))
            for mode in retrieval_modes:
                # KV computed under one attention mode must never be reused under the other: the latent rows of
                # layer l depend on how layers < l attended.
                engine.blocks.reset_prefix_cache()
                k = sparse_k if mode == "sparse" else None
                with attention_mode(model, mode, k):
                    recs = run_suite(engine, model, tokenizer, f"{name}/{mode}", exs,
                                     extra={"mode": mode, "index_topk": k},
                                     **dict(kw, max_tokens=retrieval_max_tokens))
                records += recs
            engine.blocks.reset_prefix_cache()
        else:
            records += run_suite(engine, model, tokenizer, name, exs, **kw)
    result = summarize(records)
    if not (mtp and has_mtp):
        result["mtp"] = {"skipped": notes[0] if notes else "not requested"}
    result["config"] = {"n": n, "seed": seed, "max_tokens": max_tokens, "retrieval_max_tokens": retrieval_max_tokens,
                        "max_tool_rounds": max_tool_rounds, "served_tools": served_tools,
                        "retrieval_modes": list(retrieval_modes), "index_topk": model.config.index_topk,
                        "greedy": True, "enable_thinking": True,
                        "thinking_off_suites": sorted(name for name, exs in suites.items()
                                                      if any(not e.thinking for e in exs))}
    result["notes"] = notes
    result["engine"] = {k: v for k, v in engine.stats().items() if isinstance(v, (int, float))}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["records"] = records
    return result
