"""report.md for a speedrun directory: what ran, how long each stage took, the loss curves of all training stages
on one time axis, and the held-out evaluation table."""

from __future__ import annotations

import json
from pathlib import Path

from .recipe import TRAIN_STAGES, indexer_only


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
        key = "indexer_kl" if indexer_only(stage) else "lm"
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


def targets(result: dict, longest_trained: int) -> list[tuple[str, str, str, bool]]:
    """The shipped model's targets against an eval result: (what, target, measured, met)."""
    suites, rows = result["suites"], []

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def add(what, target, value, ok):
        rows.append((what, target, value, bool(ok)))

    acc = {k: v.get("accuracy") for k, v in suites.items()}
    add("arithmetic accuracy", ">= 90%", pct(acc.get("arithmetic")), (acc.get("arithmetic") or 0) >= 0.9)
    add("world facts (known entities)", ">= 90%", pct(acc.get("world")), (acc.get("world") or 0) >= 0.9)
    add("unknown entities: abstains", ">= 80%", pct(acc.get("unknown")), (acc.get("unknown") or 0) >= 0.8)
    hal = result.get("hallucination", {}).get("unknown", {}).get("rate")
    add("unknown entities: hallucination rate", "<= 20%", pct(hal), hal is not None and hal <= 0.2)
    grid = {m: {c["context_tokens"]: c for c in v["grid"] if c["depth"] is not None}
            for m, v in result.get("retrieval", {}).items()}
    lengths = sorted(grid.get("dense", {}))
    if lengths:
        L = max([x for x in lengths if x <= longest_trained] or lengths[:1])

        def at(mode):
            cells = [c for c in result["retrieval"][mode]["grid"] if c["context_tokens"] == L and c["n"]]
            n = sum(c["n"] for c in cells)
            return sum(c["accuracy"] * c["n"] for c in cells) / n if n else None

        sp, de = (at(m) if m in result["retrieval"] else None for m in ("sparse", "dense"))
        # Within 5 points of a dense model that cannot retrieve says nothing: such a row counts as missed.
        learned = de is not None and de >= 0.5
        ok = learned and sp is not None and abs(sp - de) <= 0.05
        got = f"{pct(sp)} vs {pct(de)}" + ("" if learned else " (dense cannot retrieve: not measurable)")
        add(f"retrieval at {L} tokens: sparse vs dense", "within 5 points", got, ok)
    tool = result.get("tool", {})
    add("tool: valid call", ">= 95%", pct(tool.get("valid_call_rate")), (tool.get("valid_call_rate") or 0) >= 0.95)
    final = tool.get("final_accuracy")
    add("tool: correct final answer", ">= 90%", pct(final), (final or 0) >= 0.9)
    mtp = result.get("mtp", {}).get("acceptance")
    add("MTP draft acceptance", ">= 0.6", "-" if mtp is None else f"{mtp:.2f}", (mtp or 0) >= 0.6)
    return rows


def targets_table(result: dict, longest_trained: int) -> str:
    lines = ["| target | wanted | measured | |", "|---|---|---|---|"]
    for what, want, got, ok in targets(result, longest_trained):
        lines.append(f"| {what} | {want} | {got} | {'met' if ok else '**missed**'} |")
    return "\n".join(lines)


def phrasing_table(result: dict) -> str | None:
    """Known-entity world questions per question template (held-out wordings), worst first: which words the model
    does not understand."""
    rows = result.get("suites", {}).get("world", {}).get("by_phrasing")
    if not rows:
        return None
    lines = ["| question (held-out wording) | n | correct | abstained | wrong |", "|---|---:|---:|---:|---:|"]
    for p, c in sorted(rows.items(), key=lambda kv: (kv[1]["correct"] / kv[1]["n"], kv[0])):
        lines.append(f"| {p.replace('{x}', 'X')} | {c['n']} | {c['correct']} | {c['abstained']} | "
                     f"{c['wrong'] + c['malformed']} |")
    return "\n".join(lines)


def write_report(out: str | Path, stages) -> Path:
    """report.md in a speedrun directory; `stages`: the names of its stages, in the order they ran."""
    out = Path(out)
    state = json.loads((out / "speedrun.json").read_text())
    timings = state.get("timings", {})
    lines = [f"# glm5 speedrun report ({state['recipe']} recipe)", "",
             f"Device: {state['device']}, {state['threads']} threads, autocast: {state['autocast']}. "
             f"Total time: {sum(timings.values()) / 60:.1f} min.", "",
             "Reproduce: `glm5 speedrun --recipe " + state["recipe"] + " --out-dir DIR`", "",
             "| stage | seconds | machine at its start (fp32 matmul GFLOP/s) | result |", "|---|---:|---:|---|"]
    gflops = state.get("matmul_gflops", {})
    for stage in stages:
        done = out / stage / "done.json"
        info = json.loads(done.read_text()) if done.is_file() else {}
        summary = ""
        if "last" in info and info["last"]:
            last = info["last"]
            summary = f"step {last['step']}, loss {last['loss']:.4f}" + (
                f", recall {last['recall']:.3f}" if "recall" in last else "") + (
                f", copy NLL {info['copy_nll']:.2f}" if "copy_nll" in info else "") + (
                f", declared-name NLL {info['name_copy_nll']:.2f}" if "name_copy_nll" in info else "") + (
                f", facts recalled {100 * info['fact_recall']:.0f}%" if "fact_recall" in info else "")
        elif "skipped" in info:
            summary = f"skipped: {info['skipped']}"
        elif "buffer" in info:  # the RL stage
            b = info["buffer"]
            summary = (f"{info['steps']} RL steps, {b['trained']} of {b['generated']} groups trained, staleness "
                       f"{b['staleness']}")
        elif "bytes" in info:
            summary = f"{info['params'] / 1e6:.2f}M parameters, {info['bytes'] / 2**20:.1f} MiB"
        lines.append(f"| {stage} | {timings.get(stage, 0):.0f} | {gflops.get(stage, '-')} | {summary} |")
    lines.append("")
    if (p := plot_losses(out)) is not None:
        lines += [f"![losses]({p.name})", ""]
    ev = out / "eval" / "eval.json"
    if ev.is_file():
        result = json.loads(ev.read_text())
        longest = state["longest_trained_retrieval"]
        lines += ["## Targets", "", f"Longest trained retrieval context: {longest} tokens.", "",
                  targets_table(result, longest), "",
                  "## Held-out evaluation", "", (out / "eval" / "table.md").read_text(), ""]
        if (p := plot_eval(out, result)) is not None:
            lines += [f"![eval]({p.name})", ""]
        if (t := phrasing_table(result)) is not None:
            lines += ["### World questions by wording", "", t, ""]
    lines += ["## Recipe", "", "```json", json.dumps(state.get("recipe_settings", {}), indent=2), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
