"""Held-out evaluation (`glm5 eval`): scoring rules (score.py), the engine-driven runner (run.py), tables and JSON
(report.py), flags (cli.py)."""

from .run import attention_mode, evaluate, mtp_acceptance
from .score import OUTCOMES, score, summarize

__all__ = ["evaluate", "format_table", "write_json", "score", "summarize", "mtp_acceptance", "attention_mode",
           "OUTCOMES"]


def __getattr__(name: str):
    # report.py's names load on first use, so that `python -m glm5.eval.report` (the README table) runs the module
    # once, as __main__, instead of after this package has already imported it.
    if name in ("format_table", "write_json"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module 'glm5.eval' has no attribute {name!r}")
