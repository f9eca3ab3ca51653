"""README.md's eval table is rendered from the shipped model's eval.json, never typed by hand.

Refresh it with `python -m glm5.eval.report --readme README.md`."""

import json
from pathlib import Path

import pytest

from glm5.eval.report import README_MARKERS, readme_section, readme_table, replace_between
from glm5.loader import SHIPPED_MODEL_DIR

README = Path(__file__).resolve().parents[1] / "README.md"
EVAL_JSON = SHIPPED_MODEL_DIR / "eval.json"


def test_readme_eval_table_matches_shipped_eval():
    if not EVAL_JSON.is_file():
        pytest.fail(f"{EVAL_JSON} is missing: the shipped model comes with its eval")
    want = readme_table(json.loads(EVAL_JSON.read_text(encoding="utf-8")))
    got = readme_section(README.read_text(encoding="utf-8"))
    assert got == want, "README.md's eval table differs from the shipped eval.json: run " \
                        "`python -m glm5.eval.report --readme README.md`"


def test_readme_table_shape():
    """Every suite of an eval result gets one row (retrieval modes share one), numbers as the eval computed them."""
    result = {
        "suites": {
            "arithmetic": {"n": 10, "counts": {"correct": 9, "wrong": 1, "abstained": 0, "malformed": 0},
                           "accuracy": 0.9},
            "unknown": {"n": 10, "counts": {"correct": 0, "wrong": 2, "abstained": 8, "malformed": 0},
                        "accuracy": 0.8, "hallucination_rate": 0.2},
            "retrieval/sparse": {"n": 4, "counts": {}, "accuracy": 0.5},
            "retrieval/dense": {"n": 4, "counts": {}, "accuracy": 0.75},
            "tool": {"n": 10, "counts": {"correct": 7, "wrong": 2, "abstained": 0, "malformed": 1},
                     "accuracy": 0.7, "valid_call_rate": 0.8},
        },
        "retrieval": {
            "sparse": {"index_topk": 8, "grid": [{"context_tokens": 64, "depth": 0.1, "n": 1, "accuracy": 1.0},
                                                 {"context_tokens": 64, "depth": 0.9, "n": 3, "accuracy": 0.0},
                                                 {"context_tokens": 128, "depth": 0.5, "n": 2, "accuracy": 0.5}]},
            "dense": {"index_topk": None, "grid": [{"context_tokens": 64, "depth": 0.1, "n": 1, "accuracy": 1.0},
                                                   {"context_tokens": 64, "depth": 0.9, "n": 3, "accuracy": 1.0},
                                                   {"context_tokens": 128, "depth": 0.5, "n": 2, "accuracy": 0.0}]},
        },
        "mtp": {"acceptance": 0.5, "positions": 40},
    }
    rows = [r for r in readme_table(result).splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert rows == [
        "| arithmetic: +, -, x one digit; operands up to 4 digits | 10 | 90.0% | 1 wrong |",
        "| unknown entities: abstains | 10 | 80.0% | hallucination rate 20.0% (wrong / (wrong + abstained)) |",
        "| needle retrieval at 64 tokens, sparse / dense | 4 | 25.0% / 100.0% | 128 tokens: 50.0% / 0.0% (n=2) |",
        "| calculator tool: valid call / final answer | 10 | 80.0% / 70.0% | 2 wrong; 1 malformed |",
        "| MTP 1-token draft acceptance | 40 | 0.50 | drafts over all generated tokens |",
    ]


def test_replace_between_round_trip():
    start, end = README_MARKERS
    text = f"intro\n{start}\nold table\n{end}\nrest\n"
    new = replace_between(text, "| new |\n")
    assert new == f"intro\n{start}\n| new |\n{end}\nrest\n"
    assert readme_section(new) == "| new |\n"
    with pytest.raises(ValueError, match="markers"):
        replace_between("no markers here", "x")
