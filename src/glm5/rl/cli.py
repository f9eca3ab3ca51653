"""`glm5 rl`: flags in, an RLConfig out, the run, its plots and (optionally) the eval before and after."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    from .loop import BACKENDS, MODES, RLConfig
    from .trainer import RLTrainConfig

    d, t = RLConfig(model="", out_dir=""), RLTrainConfig()
    p = sub.add_parser("rl", help="asynchronous RL (GRPO + IcePop, slime style) with the honesty reward")
    p.add_argument("--model", default=None, help="checkpoint directory to start from (default: the shipped model)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    p.add_argument("--out-dir", required=True, help="run directory: checkpoints, metrics.jsonl, plots, summary.json")
    p.add_argument("--mode", choices=MODES, default=d.mode, help="sync: rollout then train; one-step-off: the next "
                   "rollout runs while a step trains; async: rollout never drains, weights land in flight")
    p.add_argument("--max-staleness", type=int, default=d.max_staleness,
                   help="async: how many policy versions a trained sample's oldest token may lag (0 = on-policy)")
    p.add_argument("--push-every", type=int, default=d.push_every, help="async: push weights every K steps")
    p.add_argument("--recompute-on-update", action="store_true",
                   help="async: recompute running samples' KV cache under new weights")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--groups-per-step", type=int, default=d.groups_per_step, help="prompts (groups) per step")
    p.add_argument("--group-size", type=int, default=d.group_size, help="samples per prompt (G)")
    p.add_argument("--families", default=",".join(d.families), help="task families to train on")
    p.add_argument("--reward", default=d.reward, help="reward function, module:function")
    p.add_argument("--generate", default=None, help="rollout hook, module:function: fn(engine, tokenizer, example, "
                   "group_size, seed) -> the group's samples (default: the built-in chat and tool rollout)")
    p.add_argument("--no-dynamic-sampling", action="store_true", help="keep groups whose rewards are all equal")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per sampled turn")
    p.add_argument("--max-tool-rounds", type=int, default=d.max_tool_rounds, help="tool calls answered per episode")
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--correction", choices=("icepop", "tis", "none"), default=t.correction,
                   help="off-policy correction of each token")
    p.add_argument("--std-normalize", action="store_true", help="GRPO advantages divided by the group's std")
    p.add_argument("--mtp-weight", type=float, default=t.mtp_weight,
                   help="> 0: the MTP layer learns to draft the policy's samples (keeps speculative decoding's "
                        "acceptance after RL); the policy's update is unchanged")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rollout-threads", type=int, default=None, help="threads of each rollout engine (default: the "
                   "cores left to rollout, shared among --rollout-workers)")
    p.add_argument("--train-threads", type=int, default=None, help="threads of each trainer rank (default: the cores "
                   "left to training, shared among --trainer-ranks)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", default="", help="'auto' (the newest checkpoint under --out-dir) or a checkpoint")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="where the rollout workers run: local (one "
                   "process beside the trainer) or ray (Ray actors, restarted if they die)")
    p.add_argument("--ray-address", default=None, help="ray: join this cluster (HOST:PORT of `ray start --head`); "
                   "default: start Ray on this machine")
    p.add_argument("--rollout-workers", type=int, default=d.rollout_workers,
                   help="ray: rollout workers, one engine each (--rollout-threads threads and as many Ray CPUs each)")
    p.add_argument("--trainer-ranks", type=int, default=d.trainer_ranks,
                   help="ray: > 1 trains in W Ray actors under DDP (gloo), each on 1/W of every batch and reserving "
                        "--train-threads Ray CPUs; 1: the trainer is this process")
    p.add_argument("--eval-n", type=int, default=0, help="evaluate before and after on n held-out examples per "
                   "family (0: no eval)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_rl)
    return p


def cmd_rl(args) -> int:
    from ..loader import SHIPPED_MODEL_DIR
    from .loop import RLConfig, RLError, RLRun
    from .plots import plot_run
    from .trainer import RLTrainConfig

    cfg = RLConfig(model=str(args.model or SHIPPED_MODEL_DIR), out_dir=args.out_dir, tokenizer=args.tokenizer,
                   mode=args.mode, max_tool_rounds=args.max_tool_rounds,
                   max_staleness=args.max_staleness, push_every=args.push_every,
                   recompute_on_update=args.recompute_on_update, steps=args.steps,
                   groups_per_step=args.groups_per_step, group_size=args.group_size,
                   families=tuple(f.strip() for f in args.families.split(",") if f.strip()), reward=args.reward,
                   generate=args.generate,
                   dynamic_sampling=not args.no_dynamic_sampling, max_tokens=args.max_tokens, seed=args.seed,
                   rollout_threads=args.rollout_threads, train_threads=args.train_threads,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.quiet,
                   backend=args.backend, ray_address=args.ray_address, rollout_workers=args.rollout_workers,
                   trainer_ranks=args.trainer_ranks,
                   train=RLTrainConfig(lr=args.lr, correction=args.correction, std_normalize=args.std_normalize,
                                       mtp_weight=args.mtp_weight))
    try:
        run = RLRun(cfg)
    except RLError as e:
        print(e, file=sys.stderr)
        return 2
    if run.resumed_from:
        print(f"glm5 rl: resuming from {run.resumed_from} (step {run.step})", file=sys.stderr)
    before = _eval(run.model, run.tok, args.eval_n, args.seed) if args.eval_n else None
    try:
        summary = run.run()
    except RLError as e:
        print(e, file=sys.stderr)
        return 2
    final = Path(args.out_dir) / "model"
    print(f"glm5 rl: {summary['steps']} steps in {summary['seconds']:.0f} s; buffer {json.dumps(summary['buffer'])}")
    print(f"glm5 rl: the trained model, ready to serve: {final}")
    for png in plot_run(Path(args.out_dir)):
        print(f"glm5 rl: wrote {png}")
    if args.eval_n:
        from ..eval.report import format_table

        after = _eval(run.model, run.tok, args.eval_n, args.seed)
        print("\nbefore RL:\n" + format_table(before) + "\n\nafter RL:\n" + format_table(after))
        (Path(args.out_dir) / "eval.json").write_text(json.dumps({"before": _strip(before), "after": _strip(after)},
                                                                 indent=1))
    return 0


def _eval(model, tok, n: int, seed: int) -> dict:
    from ..eval.run import evaluate

    return evaluate(model.eval(), tok, n=n, seed=seed, families=("arithmetic", "world", "unknown", "tool"),
                    progress=False)


def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "records"}
