"""The evaluation result as markdown tables (README / report.md) and as a JSON file."""

from __future__ import annotations

import json
import os
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
        rows.append([name, s["n"], _pct(s["accuracy"]), *(c[o] for o in OUTCOMES),
                     _pct(per_mtp.get(name, {}).get("acceptance")), ", ".join(extra)])
    lines += _table(["suite", "n", "accuracy", *OUTCOMES, "MTP accept", "notes"], rows)

    h = result.get("hallucination", {})
    if any(h.get(k, {}).get("wrong", 0) + h.get(k, {}).get("abstained", 0) for k in ("known", "unknown")):
        lines += ["", "Hallucination rate = wrong / (wrong + abstained)", ""]
        lines += _table(["entities", "wrong", "abstained", "rate"],
                        [[k, h[k]["wrong"], h[k]["abstained"], _pct(h[k]["rate"])]
                         for k in ("known", "unknown", "combined")])

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


def write_json(result: dict, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a crash never leaves half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
