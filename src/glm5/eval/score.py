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
  chat              any non-empty content -> correct (reported, not a quality measure)

Hallucination rate = wrong / (wrong + abstained): of the answers that were not right and not broken, how many were
made up rather than declined. For known entities a low rate means "when it does not know, it says so"; for unknown
ones every non-abstention is made up. Malformed outputs are left out of the rate (they are neither).

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
from ..data.example import ABSTAIN, Example

CORRECT, WRONG, ABSTAINED, MALFORMED = "correct", "wrong", "abstained", "malformed"
OUTCOMES = (CORRECT, WRONG, ABSTAINED, MALFORMED)

_NUM = re.compile(r"(-?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)")
_ABSTAIN = ABSTAIN.lower()


def _norm(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def abstains(content: str | None) -> bool:
    """The answer declines (it starts with or contains the abstention phrase; curly apostrophes count)."""
    return bool(content) and _ABSTAIN in _norm(content).lower()


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


def score(ex: Example, out: ParsedOutput, finish_reason: str | None = "stop") -> str:
    """The outcome of one example from its final assistant output (already parsed)."""
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
        return CORRECT
    raise ValueError(f"example family {fam!r} has no scoring rule (known: arithmetic, world, unknown, retrieval, "
                     f"tool, chat)")


def is_right(family: str, outcome: str) -> bool:
    """For unknown entities the right answer is to abstain."""
    return outcome == (ABSTAINED if family == "unknown" else CORRECT)


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


def suite_summary(records: list[dict]) -> dict:
    """n, outcome counts, accuracy (is_right) of one suite's records."""
    counts = Counter(r["outcome"] for r in records)
    right = sum(is_right(r["family"], r["outcome"]) for r in records)
    out = {"n": len(records), "counts": {o: counts.get(o, 0) for o in OUTCOMES}, "accuracy": _rate(right, len(records))}
    if records and records[0]["family"] in ("world", "unknown"):
        out["hallucination_rate"] = hallucination(counts)["rate"]
        phrasings: dict[str, Counter] = {}  # which wordings the model understands (glm5.data.world's templates)
        for r in records:
            if (p := r.get("meta", {}).get("phrasing")) is not None:
                phrasings.setdefault(p, Counter())[r["outcome"]] += 1
        if phrasings:
            out["by_phrasing"] = {p: {"n": sum(c.values()), **{o: c[o] for o in OUTCOMES}}
                                  for p, c in sorted(phrasings.items())}
    if records and records[0]["family"] == "tool":
        out["valid_call_rate"] = _rate(sum(bool(r.get("tool_valid")) for r in records), len(records))
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
    world = [r for r in records if r["family"] == "world" and r.get("outcome") in OUTCOMES]
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
    unknown = Counter(r["outcome"] for r in records if r["family"] == "unknown")
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
    known = Counter(r["outcome"] for r in records if r["family"] == "world")
    unknown = Counter(r["outcome"] for r in records if r["family"] == "unknown")
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
