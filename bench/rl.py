"""RL modes side by side: sync, one-step-off and async (max staleness 2) on the shipped model, same prompts, same
seed, one after the other in this process. Prints wall-clock, samples/s, rollout and trainer idle shares, weight-push
latency, the staleness histogram, and how long each mode took to reach the sync run's final reward (the mean reward
of the samples generated, over its last 3 steps; each mode's 3-step moving average).

    .venv/bin/python bench/rl.py [--steps 12] [--groups 8] [--group-size 8] [--max-tokens 200] [--families ...]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from machine import cpu_name  # bench/machine.py (python puts bench/ on sys.path)


def smoothed(xs, k=3):
    return [statistics.mean(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--modes", default="sync,one-step-off,async")
    ap.add_argument("--families", default=None, help="comma-separated (default: glm5 rl's)")
    args = ap.parse_args()

    from glm5.loader import SHIPPED_MODEL_DIR
    from glm5.rl.loop import RLConfig, RLRun

    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            cfg = RLConfig(model=str(SHIPPED_MODEL_DIR), out_dir=f"{tmp}/{mode}", mode=mode, max_staleness=2,
                           steps=args.steps, groups_per_step=args.groups, group_size=args.group_size,
                           max_tokens=args.max_tokens, checkpoint_every=10**6, progress=False,
                           **({"families": tuple(args.families.split(","))} if args.families else {}))
            summary = RLRun(cfg).run()
            recs = [json.loads(ln) for ln in Path(f"{tmp}/{mode}/metrics.jsonl").read_text().splitlines()]
            rew = [r["rollout_reward_mean"] if r["rollout_reward_mean"] is not None else float("nan") for r in recs]
            curves[mode] = (smoothed(rew), [r["elapsed_s"] for r in recs])
            samples = sum(r["rollout_tokens"] for r in recs)
            pushes = [r["push_s"] for r in recs if r["push_s"] is not None]
            applies = [x for r in recs for x in r["push_apply_s"]]
            rows.append({"mode": mode, "wall_s": summary["seconds"], "buffer": summary["buffer"],
                         "tokens_per_s": samples / summary["seconds"],
                         "samples_per_s": summary["buffer"]["generated"] * args.group_size / summary["seconds"],
                         "trainer_idle": summary["trainer_idle_share"], "rollout_idle": summary["rollout_idle_share"],
                         "push_ms": 1e3 * statistics.median(pushes) if pushes else None,
                         "apply_ms": 1e3 * statistics.median(applies) if applies else None,
                         "final_reward": curves[mode][0][-1]})
    target = curves["sync"][0][-1] if "sync" in curves else None
    print(f"bench/rl.py on {cpu_name()}: {args.steps} steps x {args.groups} groups x {args.group_size} samples, "
          f"max {args.max_tokens} tokens a turn, families {args.families or 'default'}, shipped model, fp32")
    print("| mode | wall s (vs sync) | reach sync's final reward at s (ratio) | samples/s | sampled tokens/s | trainer idle | "
          "rollout idle | push ms (copy) | push ms (apply) | staleness histogram | groups kept / generated |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    t_sync = None
    for row in rows:
        rew, t = curves[row["mode"]]
        reach = next((ti for r, ti in zip(rew, t) if target is not None and r >= target), None)
        if row["mode"] == "sync":
            t_sync = reach
        ratio = f" ({reach / t_sync:.2f}x)" if reach is not None and t_sync else ""
        b = row["buffer"]
        apply = "-" if row["apply_ms"] is None else f"{row['apply_ms']:.0f}"
        vs = f" ({row['wall_s'] / rows[0]['wall_s']:.2f}x)" if rows[0]["mode"] == "sync" else ""
        print(f"| {row['mode']} | {row['wall_s']:.0f}{vs} | {'never' if reach is None else f'{reach:.0f}'}{ratio} | "
              f"{row['samples_per_s']:.1f} | {row['tokens_per_s']:.0f} | {row['trainer_idle']:.0%} | "
              f"{row['rollout_idle']:.0%} | {row['push_ms']:.0f} | "
              f"{apply} | {b['staleness']} | "
              f"{b['admitted']} / {b['generated']} |")
    print(f"(sync's final reward, 3-step mean: {target:.3f})" if target is not None else "")


if __name__ == "__main__":
    main()
