"""PNG plots of a run's metrics.jsonl, written next to it: loss.png, lr.png, expert_load.png, indexer.png.

A resumed run re-logs the steps after its checkpoint; the last record of each step wins.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """Step records, one per step (the last one logged), in step order; event lines and torn lines are skipped
    (a SIGKILL can cut the last line short)."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" not in rec and "step" in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def write_plots(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    out = Path(out_dir)
    if not recs:
        return []
    steps = [r["step"] for r in recs]
    written = []

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def finish(fig, ax, name, title, ylabel, log=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "total"), ("lm", "next token"), ("mtp", "MTP (mean over depths)"),
                       ("indexer_kl", "indexer KL")):
        x, y = series(key)
        if x and all(v > 0 for v in y):
            ax.plot(x, y, label=label)
    finish(fig, ax, "loss.png", "training loss", "loss", log=True)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in recs])
    finish(fig, ax, "lr.png", "learning rate", "lr")

    x, _ = series("imbalance")
    if x:
        fig, ax = plt.subplots(figsize=(7, 4))
        layers = sorted(recs[-1].get("imbalance", {}), key=int)
        for layer in layers:
            pts = [(r["step"], r["imbalance"][layer]) for r in recs if layer in r.get("imbalance", {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"layer {layer}")
        finish(fig, ax, "expert_load.png", "MoE load: max / mean tokens per expert (1 = balanced)", "imbalance")

    x_kl, y_kl = series("indexer_kl")
    x_rc, y_rc = series("recall")
    if x_kl or x_rc:
        fig, ax = plt.subplots(figsize=(7, 4))
        if x_kl:
            ax.plot(x_kl, y_kl, color="C0", label="indexer KL")
            if min(y_kl) > 0:  # KL is exactly 0 while every query keeps all its keys (short rows)
                ax.set_yscale("log")
        if x_rc:
            ax2 = ax.twinx()
            ax2.plot(x_rc, y_rc, color="C1", marker=".", label="top-k attention-mass recall")
            ax2.set_ylabel("recall")
            ax2.set_ylim(0, 1.02)
            ax2.legend(loc="lower right")
        finish(fig, ax, "indexer.png", "DSA indexer", "KL")
    return written
