"""The evaluation result as markdown: the full tables (`glm5 eval`, report.md), the README's summary of the shipped
model (`readme_table`, kept in README.md between the README_MARKERS), and as a JSON file.

    python -m glm5.eval.report --readme README.md [--eval-json src/glm5/assets/model/eval.json]

rewrites README.md's table from the shipped model's eval.json; tests/test_readme.py fails when the two differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .score import OUTCOMES


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def format_table(result: dict) -> str:
    lines: list[str] = []
    mtp = result.get("mtp") or {}
    per_mtp = mtp.get("per_suite", {})
    rows = []
    for name, s in result["suites"].items():
        c = s["counts"]
        extra = []
        if "hallucination_rate" in s:
            extra.append(f"halluc. {_pct(s['hallucination_rate'])}")
        if "valid_call_rate" in s:
            extra.append(f"valid call {_pct(s['valid_call_rate'])}")
        extra += suite_notes(s)
        rows.append([name, s["n"], _pct(s["accuracy"]), *(c[o] for o in OUTCOMES),
                     _pct(per_mtp.get(name, {}).get("acceptance")), ", ".join(extra)])
    lines += _table(["suite", "n", "accuracy", *OUTCOMES, "MTP accept", "notes"], rows)

    h = result.get("hallucination", {})
    if any(h.get(k, {}).get("wrong", 0) + h.get(k, {}).get("abstained", 0) for k in ("known", "unknown")):
        lines += ["", "Hallucination rate = wrong / (wrong + abstained)", ""]
        lines += _table(["entities", "wrong", "abstained", "rate"],
                        [[k, h[k]["wrong"], h[k]["abstained"], _pct(h[k]["rate"])]
                         for k in ("known", "unknown", "combined")])
    cal = result.get("calibration")
    if cal and cal.get("auroc") is not None:
        lines += ["", f"Confidence (the least likely token of an answer) ranks right above wrong known-entity answers "
                      f"with AUROC {cal['auroc']:.2f}. Declining the least confident answers at a cost of at most "
                      f"{cal['max_accuracy_cost']:.0%} of world accuracy would catch {cal['wrong_declined']} of "
                      f"{cal['wrong']} wrong ones: hallucination rate known {_pct(cal['known_rate'])} -> "
                      f"{_pct(cal['known_rate_after'])}, combined {_pct(cal['combined_rate'])} -> "
                      f"{_pct(cal['combined_rate_after'])}."]

    retr = result.get("retrieval") or {}
    if retr:
        modes = list(retr)
        cells = sorted({(c["context_tokens"], c["depth"]) for m in modes for c in retr[m]["grid"]},
                       key=lambda x: (x[0], -1 if x[1] is None else x[1]))
        acc = {(m, c["context_tokens"], c["depth"]): c for m in modes for c in retr[m]["grid"]}
        head = ["context", "depth"] + [f"{m}" + (f" (top-{retr[m]['index_topk']})" if retr[m].get("index_topk")
                                                  else "") for m in modes]
        rows = [[L, "-" if d is None else d, *(_pct(acc[(m, L, d)]["accuracy"]) + f" (n={acc[(m, L, d)]['n']})"
                                               if (m, L, d) in acc else "-" for m in modes)] for L, d in cells]
        rows.append(["all", "", *(_pct(retr[m]["accuracy"]) for m in modes)])
        lines += ["", "Retrieval accuracy by context length and depth", ""] + _table(head, rows)

    tool = result.get("tool") or {}
    if tool.get("n"):
        lines += ["", f"Tool use: valid first call {_pct(tool['valid_call_rate'])}, final answer "
                      f"{_pct(tool['final_accuracy'])} (n={tool['n']})"]
    if mtp.get("skipped"):
        lines += ["", f"MTP: {mtp['skipped']}"]
    elif mtp.get("positions"):
        lines += ["", f"MTP 1-token draft acceptance: {_pct(mtp['acceptance'])} over {mtp['positions']} drafts"]
    for r in result.get("skipped") or ():
        lines.append(f"skipped in {r['suite']}: {r['reason']}")
    return "\n".join(lines) + "\n"


def suite_notes(s: dict) -> list[str]:
    """The notes of one suite's summary beyond its counts: by turn, refusals, tool choice, by family."""
    notes = []
    if "by_turn" in s:
        notes.append("by turn " + ", ".join(f"{t}: {_pct(v['accuracy'])} (n={v['n']})"
                                            for t, v in s["by_turn"].items()))
    if "declined_rate" in s:
        notes.append(f"declined honestly {_pct(s['declined_rate'])}, invented numbers {s['invented_numbers']} of "
                     f"{s['refusals']}")
    if "choice_accuracy" in s:
        notes.append(f"call-vs-answer right {_pct(s['choice_accuracy'])}, undeclared calls {s['undeclared_calls']}, "
                     f"calls right {_pct(s['call_accuracy'])}, answers right {_pct(s['answer_accuracy'])}")
    if "by_reason" in s:
        notes.append(", ".join(f"{k} {_pct(v['accuracy'])}" for k, v in s["by_reason"].items()))
    if "by_family" in s:
        notes.append(", ".join(f"{k} {_pct(v['accuracy'])} (n={v['n']})" for k, v in s["by_family"].items()))
    return notes


def write_json(result: dict, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a crash never leaves half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- README summary ------------------------------------------------------------------------------------------------
README_MARKERS = ("<!-- eval-table -->", "<!-- /eval-table -->")

# What each suite asks, for a reader who has not seen glm5.data (the suites' generators say it in full).
SUITE_LABELS = {
    "arithmetic": "arithmetic: +, -, x one digit; operands up to 4 digits",
    "world": "world facts, known entities",
    "unknown": "unknown entities: abstains",
    "tool": "calculator tool: valid call / final answer",
    "chat": "small talk",
    "arithmetic_long": "arithmetic: both operands of 3-4 digits",
    "arithmetic_typed": "arithmetic in typed surface forms (held-out wordings)",
    "multiturn": "several turns: the last one scored",
    "arithmetic_nothink": "arithmetic, thinking off",
    "world_nothink": "world facts, thinking off",
    "unknown_nothink": "unknown entities, thinking off",
    "chat_nothink": "small talk, thinking off",
    "scope": "out-of-scope requests: declines specifically",
    "tool_choice": "user-declared tools: call one or answer",
}


def _retrieval_by_length(retr: dict) -> dict[int, dict[str, tuple[float, int]]]:
    """{context_tokens: {mode: (accuracy over that length's depths, n)}}."""
    out: dict[int, dict[str, tuple[float, int]]] = {}
    for mode, r in retr.items():
        by_len: dict[int, list[dict]] = {}
        for c in r.get("grid") or ():
            by_len.setdefault(c["context_tokens"], []).append(c)
        for L, cells in by_len.items():
            n = sum(c["n"] for c in cells)
            if n:
                out.setdefault(L, {})[mode] = (sum(c["accuracy"] * c["n"] for c in cells) / n, n)
    return dict(sorted(out.items()))


def readme_table(result: dict) -> str:
    """The README's table of an eval result (an eval.json dict): one row per suite in the order they ran, retrieval as
    one row (sparse / dense at the shortest context length, the longer ones in its notes), then MTP draft acceptance."""
    rows: list[list] = []
    retrieval_done = False
    for name, s in (result.get("suites") or {}).items():
        if name.startswith("retrieval/"):  # one suite per attention mode: one row for all of them
            if not retrieval_done:
                rows += _retrieval_rows(result.get("retrieval") or {})
                retrieval_done = True
            continue
        c, note = s["counts"], []
        acc = _pct(s["accuracy"]) if name != "tool" else f"{_pct(s.get('valid_call_rate'))} / {_pct(s['accuracy'])}"
        if name == "unknown":
            note.append(f"hallucination rate {_pct(s.get('hallucination_rate'))} (wrong / (wrong + abstained))")
        elif c.get("wrong") or c.get("abstained"):
            note.append(", ".join(f"{c[o]} {o}" for o in ("wrong", "abstained") if c.get(o)))
        if c.get("malformed"):
            note.append(f"{c['malformed']} malformed")
        rows.append([SUITE_LABELS.get(name, name), s["n"], acc, "; ".join(note)])
    mtp = result.get("mtp") or {}
    if mtp.get("positions"):
        rows.append(["MTP 1-token draft acceptance", mtp["positions"], f"{mtp['acceptance']:.2f}",
                     "drafts over all generated tokens"])
    lines = ["| held-out suite | n | accuracy | notes |", "|---|---:|---:|---|",
             *("| " + " | ".join(str(x) for x in r) + " |" for r in rows)]
    cfg, how = result.get("config") or {}, []
    if cfg:
        how += ["greedy" if cfg.get("greedy") else "sampled",
                "thinking on" if cfg.get("enable_thinking", True) else "thinking off"]
        if "max_tokens" in cfg:
            how.append(f"at most {cfg['max_tokens']} tokens a round")
    k = ((result.get("retrieval") or {}).get("sparse") or {}).get("index_topk")
    if k:
        how.append(f"sparse = DSA top-{k} of the context, dense = every position")
    if how:
        lines += ["", f"({'; '.join(how)}.)"]
    return "\n".join(lines) + "\n"


def _retrieval_rows(retr: dict) -> list[list]:
    by_len = _retrieval_by_length(retr)
    if not by_len:
        return []
    modes = sorted({m for v in by_len.values() for m in v}, key=lambda m: (m != "sparse", m))

    def accs(L: int) -> str:
        return " / ".join(_pct(by_len[L][m][0]) if m in by_len[L] else "-" for m in modes)

    def n(L: int) -> int:
        return max(n for _, n in by_len[L].values())

    L0, *longer = by_len
    return [[f"needle retrieval at {L0} tokens, {' / '.join(modes)}", n(L0), accs(L0),
             "; ".join(f"{L} tokens: {accs(L)} (n={n(L)})" for L in longer)]]


def replace_between(text: str, body: str, markers: tuple[str, str] = README_MARKERS) -> str:
    """text with what lies between the two marker lines replaced by body."""
    start, end = markers
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"expected the markers {start!r} and then {end!r}")
    return text[:i + len(start)] + "\n" + body + text[j:]


def readme_section(text: str, markers: tuple[str, str] = README_MARKERS) -> str:
    """What lies between the two marker lines (the inverse of replace_between)."""
    start, end = markers
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"expected the markers {start!r} and then {end!r}")
    return text[i + len(start):j].removeprefix("\n")


def refresh_readme(readme: str | Path, eval_json: str | Path | None = None) -> bool:
    """Rewrite README's eval table from eval_json (default: the shipped model's). Returns whether it changed."""
    if eval_json is None:
        from ..loader import SHIPPED_MODEL_DIR

        eval_json = SHIPPED_MODEL_DIR / "eval.json"
    readme = Path(readme)
    old = readme.read_text(encoding="utf-8")
    new = replace_between(old, readme_table(json.loads(Path(eval_json).read_text(encoding="utf-8"))))
    if new != old:
        readme.write_text(new, encoding="utf-8")
    return new != old


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm5.eval.report",
                                description="rewrite README.md's eval table from an eval.json")
    p.add_argument("--readme", required=True, help="the markdown file with the table's markers")
    p.add_argument("--eval-json", default=None, help="default: the shipped model's eval.json")
    args = p.parse_args(argv)
    try:
        changed = refresh_readme(args.readme, args.eval_json)
    except (OSError, ValueError) as e:
        print(f"glm5.eval.report: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
