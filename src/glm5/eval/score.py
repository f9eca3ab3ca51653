"""Scoring held-out answers, on text only (no model): one outcome per example, then the aggregate numbers.

Outcomes: "correct" | "wrong" | "abstained" | "malformed". Malformed means the output has no usable final answer:
the generation hit max_tokens, the <think> block never closed (chat_parse then returns everything as reasoning and
no content), the content is empty, or a tool-family answer ends on a tool call it never got to read back.
Malformed is checked first: a truncated output that happens to contain the gold number is still truncated.

Per family:
  arithmetic, tool  the last integer in the content (leading '-', thousands commas allowed) equals the answer
  world             gold value in the content (case-insensitive, word boundary) and no abstention -> correct;
                    abstention -> abstained (a miss, but an honest one); anything else -> wrong
  unknown           abstention -> abstained, which is the right answer; any other answer -> wrong (a hallucination)
  retrieval         the gold code appears verbatim in the content
  chat              the intent's reply (glm5.data.smalltalk has one fixed reply per intent) in the content -> correct,
                    any other content -> wrong
  scope             an out-of-scope request (glm5.data.scope): the specific refusal (meta["specific"], e.g. "I can
                    only multiply by a one-digit number", "I don't know France" with the name exactly) -> correct;
                    another refusal ("I can't", "I don't know", ...) -> abstained (honest, not specific); an answer
                    -> wrong. Any number in the content that the user never wrote is an invented number: wrong,
                    whatever else the content says, and counted (`invented_numbers`)
  tool_choice       user-declared tools (glm5.data.tool_choice), scored on the first assistant turn: where a
                    declared tool fits, calling it with the gold arguments -> correct, anything else -> wrong; where
                    none fits, any call -> wrong, else the content by the rule of the question's family
                    (meta["inner"]; its right answer, an unknown entity's abstention included, is correct).
                    Calls of undeclared tools are counted (`undeclared_calls`), and whether the model called
                    exactly when it should (`choice_accuracy`)

Suites whose records carry meta["turn"] (multiturn) also report accuracy by turn, suites that mix families by family.

Hallucination rate = wrong / (wrong + abstained): of the answers that were not right and not broken, how many were
made up rather than declined. For known entities a low rate means "when it does not know, it says so"; for unknown
ones every non-abstention is made up. Malformed outputs are left out of the rate (they are neither). The overall
rates and the calibration count the world and unknown suites themselves (suite named as its family): a world
question inside a multi-turn or thinking-off suite is reported with that suite.

Calibration (known entities): each record's confidence is the log-prob of the least likely token of its final turn.
`calibration` reports how well it separates right from wrong answers (AUROC) and what abstaining below a
confidence threshold would buy at a bounded cost in accuracy: the known-entity and combined hallucination rates if
the model declined its least confident answers, as many as the cost allows. It is what the model's own doubt can
buy; a policy trained to abstain (glm5 rl) is measured against it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Callable, Iterable

from ..chat_parse import ParsedOutput
from ..data.example import ABSTAIN, ALL_FAMILIES, Example

CORRECT, WRONG, ABSTAINED, MALFORMED = "correct", "wrong", "abstained", "malformed"
OUTCOMES = (CORRECT, WRONG, ABSTAINED, MALFORMED)

_NUM = re.compile(r"(-?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)")
_ABSTAIN = ABSTAIN.lower()
# What an honest refusal says (any of them, case-insensitive): glm5.data.scope's refusals all contain one.
DECLINES = ("i don't know", "i do not know", "i can't", "i cannot", "i can only", "i am not able", "i'm not able",
            "i'm unable", "i am unable", "i have no tool")


def _norm(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def abstains(content: str | None) -> bool:
    """The answer declines (it starts with or contains the abstention phrase; curly apostrophes count)."""
    return bool(content) and _ABSTAIN in _norm(content).lower()


def declines(content: str | None) -> bool:
    """The answer is a refusal of some kind (DECLINES)."""
    text = _norm(content or "").lower()
    return any(d in text for d in DECLINES)


def integers(text: str | None) -> set[int]:
    """Every integer written in the text, as last_integer reads one (thousands commas, a leading '-' unless it
    follows a letter or digit)."""
    out = set()
    for m in _NUM.finditer(text or ""):
        sign, digits = m.groups()
        if sign and m.start() > 0 and text[m.start() - 1].isalnum():
            sign = ""
        out.add(int(sign + digits.replace(",", "")))
    return out


def invented_numbers(content: str | None, asked: str) -> set[int]:
    """Numbers in the content that the user's messages (asked) never wrote, sign ignored."""
    return {abs(x) for x in integers(content)} - {abs(x) for x in integers(asked)}


def said(content: str | None, phrase: str) -> bool:
    """phrase occurs in content exactly (curly apostrophes count as straight), not followed by a letter or digit:
    "I don't know France" is in "I don't know France; ..." but not in "I don't know Frand" or "... Francesca"."""
    if not content or not phrase:
        return False
    return re.search(re.escape(_norm(phrase)) + r"(?!\w)", _norm(content)) is not None


def last_integer(content: str | None) -> int | None:
    """The last integer written in the text: "-12", "6,912" (thousands commas); in "10-3" the '-' is an operator."""
    ms = list(_NUM.finditer(content or ""))
    if not ms:
        return None
    m = ms[-1]
    sign, digits = m.groups()
    if sign and m.start() > 0 and content[m.start() - 1].isalnum():
        sign = ""
    return int(sign + digits.replace(",", ""))


def contains_word(content: str | None, gold: str) -> bool:
    """gold occurs in content as whole words, case-insensitive ("Veloria" in "the capital is veloria.")."""
    if not content or not gold:
        return False
    return re.search(r"(?<!\w)" + re.escape(_norm(gold)) + r"(?!\w)", _norm(content), re.IGNORECASE) is not None


def asked(ex: Example) -> str:
    """Everything the user wrote in the example's prompt."""
    return "\n".join(m.get("content") or "" for m in ex.prompt_messages if m.get("role") == "user")


def _scope(ex: Example, content: str) -> str:
    if invented_numbers(content, asked(ex)):
        return WRONG
    if said(content, ex.meta.get("specific", "")):
        return CORRECT
    return ABSTAINED if declines(content) else WRONG


def _same_args(got, want: dict) -> bool:
    if isinstance(got, str):
        try:
            got = json.loads(got)
        except ValueError:
            return False
    return isinstance(got, dict) and set(got) == set(want) and all(
        str(got[k]).strip() == str(v).strip() for k, v in want.items())


def _tool_choice(ex: Example, out: ParsedOutput, finish_reason: str | None) -> str:
    if finish_reason == "length":
        return MALFORMED
    gold = ex.meta.get("call")
    if gold is not None:  # a declared tool fits: the first call must be it, with the gold arguments
        if not out.tool_calls:
            return WRONG if (out.content or "").strip() else MALFORMED
        fn = out.tool_calls[0].get("function") or {}
        return CORRECT if fn.get("name") == gold["name"] and _same_args(fn.get("arguments"), gold["arguments"]) \
            else WRONG
    if out.tool_calls:
        return WRONG
    inner = ex.meta.get("inner") or "chat"
    outcome = score(Example(inner, ex.messages, ex.answer, None, ex.meta, ex.thinking), out, finish_reason)
    return CORRECT if is_right(inner, outcome) else outcome  # the right answer, abstention included


def score(ex: Example, out: ParsedOutput, finish_reason: str | None = "stop") -> str:
    """The outcome of one example from its final assistant output (already parsed)."""
    if ex.family == "tool_choice":
        return _tool_choice(ex, out, finish_reason)
    content = (out.content or "").strip()
    if finish_reason == "length" or not content:
        return MALFORMED
    if ex.family == "tool" and out.tool_calls:
        return MALFORMED  # still calling the tool after the last round: no final answer
    fam = ex.family
    if fam in ("arithmetic", "tool"):
        want = last_integer(ex.answer)
        return CORRECT if want is not None and last_integer(content) == want else WRONG
    if fam == "world":
        if abstains(content):
            return ABSTAINED
        return CORRECT if contains_word(content, ex.answer) else WRONG
    if fam == "unknown":
        return ABSTAINED if abstains(content) else WRONG
    if fam == "retrieval":
        return CORRECT if ex.answer and ex.answer in content else WRONG
    if fam == "chat":
        return CORRECT if _norm(ex.answer) in _norm(content) else WRONG
    if fam == "scope":
        return _scope(ex, content)
    raise ValueError(f"example family {fam!r} has no scoring rule (known: {', '.join(ALL_FAMILIES)})")


def details(ex: Example, out: ParsedOutput) -> dict:
    """What a record keeps besides its outcome, for the suite summaries: the numbers a refusal invented (scope, and
    tool_choice chats whose right move is a refusal), the tools a tool_choice turn called and whether it called
    exactly when it should."""
    d: dict = {}
    if ex.family == "scope" or (ex.family == "tool_choice" and ex.meta.get("inner") == "scope"):
        d["invented_numbers"] = sorted(invented_numbers(out.content, asked(ex)))
    if ex.family == "tool_choice":
        names = [(c.get("function") or {}).get("name") for c in out.tool_calls]
        declared = {(t.get("function") or t).get("name") for t in ex.tools or ()}
        d.update(calls=names, undeclared_calls=sum(n not in declared for n in names),
                 choice_right=bool(names) == (ex.meta.get("call") is not None))
    return d


def is_right(family: str, outcome: str) -> bool:
    """For unknown entities the right answer is to abstain (a scope refusal is right only when specific: CORRECT)."""
    return outcome == (ABSTAINED if family == "unknown" else CORRECT)


def own_suite(r: dict) -> bool:
    """A record of its family's own suite (named as the family), not of a variant or composed suite."""
    return r.get("suite", r["family"]) == r["family"]


# ------------------------------------------------------------------------------------------------------ tool calls
def tool_param(tools: list[dict] | None, name: str) -> str:
    """The argument that carries the expression: the tool schema's first required (else first) property."""
    for t in tools or ():
        fn = t.get("function", t)
        if fn.get("name") == name:
            params = fn.get("parameters") or {}
            req = params.get("required") or list((params.get("properties") or {}).keys())
            if req:
                return req[0]
    return "expression"


def run_tool_call(call: dict, tools: list[dict] | None, calculator: Callable[[str], str]) -> tuple[str, bool]:
    """Execute one parsed tool call -> (tool message text, valid). Invalid: unknown tool name, missing or non-string
    expression, or the calculator raising / answering with an error. Errors become the message text, as an agent
    runtime would return them to the model."""
    fn = call.get("function") or {}
    name = fn.get("name")
    offered = {t.get("function", t).get("name") for t in tools or ()}
    if name not in offered:
        return f"error: unknown tool {name!r} (offered: {', '.join(sorted(map(str, offered)))})", False
    args = fn.get("arguments") or {}
    if isinstance(args, str):  # the OpenAI wire format (chat_parse's output); gold messages may hold the object
        try:
            args = json.loads(args)
        except ValueError:
            return "error: arguments are not a JSON object", False
    key = tool_param(tools, name)
    expr = args.get(key) if isinstance(args, dict) else None
    if not isinstance(expr, (str, int, float)) or isinstance(expr, bool):
        return f"error: missing argument {key!r}", False
    try:
        result = str(calculator(str(expr)))
    except Exception as e:  # noqa: BLE001 -- any calculator failure is the model's malformed expression
        return f"error: {e}", False
    return result, not result.strip().lower().startswith("error")


def valid_first_call(first: ParsedOutput, tools: list[dict] | None, calculator: Callable[[str], str]) -> bool:
    """The first assistant turn is a well-formed call of an offered tool whose expression evaluates."""
    return bool(first.tool_calls) and run_tool_call(first.tool_calls[0], tools, calculator)[1]


# ------------------------------------------------------------------------------------------------------ aggregates
def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def hallucination(counts: Counter | dict) -> dict:
    w, a = counts.get(WRONG, 0), counts.get(ABSTAINED, 0)
    return {"wrong": w, "abstained": a, "rate": _rate(w, a + w)}


def _acc(records: list[dict]) -> dict:
    return {"n": len(records), "accuracy": _rate(sum(is_right(r["family"], r["outcome"]) for r in records),
                                                 len(records))}


def suite_summary(records: list[dict]) -> dict:
    """n, outcome counts, accuracy (is_right) of one suite's records, and what its kind of suite adds."""
    counts = Counter(r["outcome"] for r in records)
    right = sum(is_right(r["family"], r["outcome"]) for r in records)
    out = {"n": len(records), "counts": {o: counts.get(o, 0) for o in OUTCOMES}, "accuracy": _rate(right, len(records))}
    families = sorted({r["family"] for r in records})
    if len(families) == 1 and families[0] in ("world", "unknown"):
        out["hallucination_rate"] = hallucination(counts)["rate"]
        phrasings: dict[str, Counter] = {}  # which wordings the model understands (glm5.data.world's templates)
        for r in records:
            if (p := r.get("meta", {}).get("phrasing")) is not None:
                phrasings.setdefault(p, Counter())[r["outcome"]] += 1
        if phrasings:
            out["by_phrasing"] = {p: {"n": sum(c.values()), **{o: c[o] for o in OUTCOMES}}
                                  for p, c in sorted(phrasings.items())}
    if families == ["tool"]:
        out["valid_call_rate"] = _rate(sum(bool(r.get("tool_valid")) for r in records), len(records))
    if len(families) > 1:
        out["by_family"] = {f: _acc([r for r in records if r["family"] == f]) for f in families}
    turns = sorted({t for r in records if (t := r.get("meta", {}).get("turn")) is not None})
    if turns:
        out["by_turn"] = {t: _acc([r for r in records if r.get("meta", {}).get("turn") == t]) for t in turns}
        kinds = sorted({r["meta"].get("turn_kind", "new") for r in records})
        out["by_turn_kind"] = {k: _acc([r for r in records if r["meta"].get("turn_kind", "new") == k]) for k in kinds}
    refusals = [r for r in records if "invented_numbers" in r]
    if refusals:  # declined honestly: a refusal (specific or not) without an invented number
        out["declined_rate"] = _rate(sum(r["outcome"] in (CORRECT, ABSTAINED) for r in refusals), len(refusals))
        out["invented_numbers"] = sum(bool(r["invented_numbers"]) for r in refusals)
        out["refusals"] = len(refusals)
    if families == ["scope"]:
        reasons = sorted({r.get("meta", {}).get("reason", "?") for r in records})
        out["by_reason"] = {k: _acc([r for r in records if r.get("meta", {}).get("reason", "?") == k])
                            for k in reasons}
    if families == ["tool_choice"]:
        calls = [r for r in records if r.get("meta", {}).get("expect") == "call"]
        answers = [r for r in records if r.get("meta", {}).get("expect") != "call"]
        out["choice_accuracy"] = _rate(sum(bool(r.get("choice_right")) for r in records), len(records))
        out["undeclared_calls"] = sum(r.get("undeclared_calls", 0) for r in records)
        out["call_accuracy"] = _rate(sum(r["outcome"] == CORRECT for r in calls), len(calls))
        out["answer_accuracy"] = _rate(sum(r["outcome"] == CORRECT for r in answers), len(answers))
    return out


def retrieval_grid(records: list[dict]) -> list[dict]:
    """Accuracy per (context length, depth) cell, cells sorted."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["context_tokens"], r["depth"]), []).append(r)
    return [{"context_tokens": L, "depth": d, "n": len(rs),
             "accuracy": _rate(sum(r["outcome"] == CORRECT for r in rs), len(rs))}
            for (L, d), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1]))]


def mtp_summary(records: Iterable[dict]) -> dict:
    hits, pos, per = 0, 0, {}
    for r in records:
        if r.get("mtp_positions") is None:
            continue
        s = per.setdefault(r["suite"], {"hits": 0, "positions": 0})
        s["hits"] += r["mtp_hits"]
        s["positions"] += r["mtp_positions"]
        hits += r["mtp_hits"]
        pos += r["mtp_positions"]
    for s in per.values():
        s["acceptance"] = _rate(s["hits"], s["positions"])
    return {"acceptance": _rate(hits, pos), "hits": hits, "positions": pos, "per_suite": per}


def auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(a random pos scores above a random neg), ties half: the Mann-Whitney statistic."""
    if not pos or not neg:
        return None
    ranked = sorted([(x, 1) for x in pos] + [(x, 0) for x in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(lab for _, lab in ranked[i:j]) * (i + j + 1) / 2
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def calibration(records: list[dict], max_cost: float = 0.02) -> dict | None:
    """Known-entity answers (world) by confidence: AUROC of right over wrong, and the hallucination rates if the
    model declined its least confident answers while losing at most max_cost of the suite's accuracy (the
    threshold chosen with hindsight: a bound on what this confidence signal can buy, not a deployable rule)."""
    world = [r for r in records if r["family"] == "world" and own_suite(r) and r.get("outcome") in OUTCOMES]
    answered = sorted((r for r in world if r["outcome"] in (CORRECT, WRONG) and r.get("confidence") is not None),
                      key=lambda r: r["confidence"])
    if not answered:
        return None
    budget = int(max_cost * len(world))
    lost = caught = best = 0
    for r in answered:  # decline in order of confidence while the budget holds
        if r["outcome"] == CORRECT:
            lost += 1
            if lost > budget:
                break
        else:
            caught += 1
            best = caught
    known = Counter(r["outcome"] for r in world)
    unknown = Counter(r["outcome"] for r in records if r["family"] == "unknown" and own_suite(r))
    after = known + Counter({ABSTAINED: best})
    after[WRONG] -= best
    return {"auroc": auroc([r["confidence"] for r in answered if r["outcome"] == CORRECT],
                           [r["confidence"] for r in answered if r["outcome"] == WRONG]),
            "max_accuracy_cost": max_cost, "wrong_declined": best, "wrong": known[WRONG],
            "known_rate": hallucination(known)["rate"], "known_rate_after": hallucination(after)["rate"],
            "combined_rate": hallucination(known + unknown)["rate"],
            "combined_rate_after": hallucination(after + unknown)["rate"]}


def summarize(records: list[dict]) -> dict:
    """Everything the report shows, from per-example records (each: suite, family, outcome; retrieval records also
    context_tokens, depth, mode; tool records tool_valid; mtp_hits / mtp_positions when measured). Records with
    "skipped" set are counted but not scored."""
    skipped = [r for r in records if r.get("skipped")]
    records = [r for r in records if not r.get("skipped")]
    by_suite: dict[str, list[dict]] = {}
    for r in records:
        by_suite.setdefault(r["suite"], []).append(r)
    out: dict = {"suites": {s: suite_summary(rs) for s, rs in by_suite.items()}}
    known = Counter(r["outcome"] for r in records if r["family"] == "world" and own_suite(r))
    unknown = Counter(r["outcome"] for r in records if r["family"] == "unknown" and own_suite(r))
    out["hallucination"] = {"known": hallucination(known), "unknown": hallucination(unknown),
                            "combined": hallucination(known + unknown)}
    retr = {}
    for r in records:
        if r["family"] == "retrieval":
            retr.setdefault(r.get("mode", "default"), []).append(r)
    out["retrieval"] = {mode: {"n": len(rs), "index_topk": rs[0].get("index_topk"),
                               "accuracy": _rate(sum(r["outcome"] == CORRECT for r in rs), len(rs)),
                               "grid": retrieval_grid(rs)} for mode, rs in retr.items()}
    tool = [r for r in records if r["family"] == "tool"]
    out["tool"] = {"n": len(tool), "valid_call_rate": _rate(sum(bool(r.get("tool_valid")) for r in tool), len(tool)),
                   "final_accuracy": _rate(sum(r["outcome"] == CORRECT for r in tool), len(tool))}
    out["calibration"] = calibration(records)
    out["mtp"] = mtp_summary(records)
    out["skipped"] = [{"suite": r["suite"], "reason": r["skipped"]} for r in skipped]
    return out
