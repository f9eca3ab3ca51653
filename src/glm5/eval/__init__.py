"""Held-out evaluation (`glm5 eval`): scoring rules (score.py), the engine-driven runner (run.py), tables and JSON
(report.py), flags (cli.py)."""

from .report import format_table, write_json
from .run import attention_mode, evaluate, mtp_acceptance
from .score import OUTCOMES, score, summarize

__all__ = ["evaluate", "format_table", "write_json", "score", "summarize", "mtp_acceptance", "attention_mode",
           "OUTCOMES"]
