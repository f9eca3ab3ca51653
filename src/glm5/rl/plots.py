"""PNG plots of an RL run from its metrics.jsonl: reward per family, hallucination rate, staleness, IcePop."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def plot_run(out_dir: Path) -> list[Path]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if not recs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    fams = sorted({f for r in recs for f in r["rollout_reward_by_family"]})
    for f in fams:
        pts = [(r["step"], r["rollout_reward_by_family"][f]) for r in recs if f in r["rollout_reward_by_family"]]
        ax[0, 0].plot(*zip(*pts), marker=".", label=f)
    ax[0, 0].set(title="reward of the samples generated, per family", xlabel="step", ylabel="mean reward")
    ax[0, 0].legend(fontsize=8)
    hr = [(r["step"], r["hallucination_rate"]) for r in recs if r["hallucination_rate"] is not None]
    if hr:
        ax[0, 1].plot(*zip(*hr), marker=".", color="C3")
    else:
        ax[0, 1].text(0.5, 0.5, "no world or unknown samples in this run", ha="center", va="center",
                      transform=ax[0, 1].transAxes, color="0.4")
    ax[0, 1].set(title="hallucination rate (world + unknown)\nwrong / (wrong + abstained)", xlabel="step",
                 ylim=(-0.02, 1.02))
    hist = Counter(s for r in recs for s in r["staleness"])
    ax[1, 0].bar(list(hist), list(hist.values()), color="C2")
    ax[1, 0].set_xticks(sorted(hist))
    ax[1, 0].set(title="staleness of trained groups (policy versions)", xlabel="versions behind the trainer",
                 ylabel="groups")
    ax[1, 1].plot(steps, [r["icepop_masked_share"] for r in recs], marker=".", color="C4")
    ax[1, 1].set(title="tokens dropped by the off-policy correction", xlabel="step", ylabel="share")
    fig.tight_layout()
    png = Path(out_dir) / "rl.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]
