"""report.md for a speedrun directory: what ran, how long each stage took, the loss curves of all training stages
on one time axis, and the held-out evaluation table."""

from __future__ import annotations

import json
from pathlib import Path

from .pipeline import STAGES, TRAIN_STAGES


def plot_losses(out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.plots import read_metrics

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    offset = 0
    for stage in TRAIN_STAGES:
        m = out / stage / "metrics.jsonl"
        if not m.is_file():
            continue
        recs = read_metrics(m)
        xs = [offset + r["step"] for r in recs]
        key = "indexer_kl" if stage == "dsa_warmup" else "lm"
        ax.plot(xs, [r.get(key, r["loss"]) for r in recs], label=f"{stage} ({key})")
        mtp = [(offset + r["step"], r["mtp"]) for r in recs if "mtp" in r]
        if mtp:
            ax2.plot(*zip(*mtp), label=f"{stage} MTP")
        offset = xs[-1] if xs else offset
        ax.axvline(offset, color="grey", lw=0.5)
    if not offset:
        plt.close(fig)
        return None
    for a, title in ((ax, "training loss by stage"), (ax2, "MTP loss (predicting token t+2)")):
        a.set_xlabel("optimizer step (stages back to back)")
        a.set_yscale("log")
        a.set_title(title)
        a.legend(fontsize=8)
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_eval(out: Path, result: dict) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {k: v["accuracy"] for k, v in (result.get("suites") or {}).items() if isinstance(v.get("accuracy"), float)}
    if not acc:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(list(acc), [100 * v for v in acc.values()], color="#4a7")
    ax.set_ylim(0, 100)
    ax.set_ylabel("held-out accuracy (%)")
    ax.tick_params(axis="x", labelsize=8)
    for i, v in enumerate(acc.values()):
        ax.text(i, 100 * v + 1, f"{100 * v:.0f}", ha="center", fontsize=8)
    fig.tight_layout()
    path = out / "eval.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: str | Path) -> Path:
    out = Path(out)
    state = json.loads((out / "speedrun.json").read_text())
    timings = state.get("timings", {})
    lines = [f"# glm5 speedrun report ({state['recipe']} recipe)", "",
             f"Device: {state['device']}, {state['threads']} threads, autocast: {state['autocast']}. "
             f"Total time: {sum(timings.values()) / 60:.1f} min.", "",
             "Reproduce: `glm5 speedrun --recipe " + state["recipe"] + " --out-dir DIR`", "",
             "| stage | seconds | result |", "|---|---:|---|"]
    for stage in STAGES:
        done = out / stage / "done.json"
        info = json.loads(done.read_text()) if done.is_file() else {}
        summary = ""
        if "last" in info and info["last"]:
            last = info["last"]
            summary = f"step {last['step']}, loss {last['loss']:.4f}" + (
                f", recall {last['recall']:.3f}" if "recall" in last else "")
        elif "bytes" in info:
            summary = f"{info['params'] / 1e6:.2f}M parameters, {info['bytes'] / 2**20:.1f} MiB"
        lines.append(f"| {stage} | {timings.get(stage, 0):.0f} | {summary} |")
    lines.append("")
    if (p := plot_losses(out)) is not None:
        lines += [f"![losses]({p.name})", ""]
    ev = out / "eval" / "eval.json"
    if ev.is_file():
        result = json.loads(ev.read_text())
        lines += ["## Held-out evaluation", "", (out / "eval" / "table.md").read_text(), ""]
        if (p := plot_eval(out, result)) is not None:
            lines += [f"![eval]({p.name})", ""]
    lines += ["## Recipe", "", "```json", json.dumps(state.get("recipe_settings", {}), indent=2), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
