"""Training throughput: glm5's training step vs transformers' GlmMoeDsaForCausalLM, same weights, same batch.

    .venv/bin/python bench/train.py [--batch 2] [--seq 512] [--steps 4] [--threads 2] [--append BENCHMARKS.md]

One training step = forward + backward + gradient clipping (1.0) + AdamW step (lr 1e-4, betas 0.9/0.95, wd 0.1),
fp32 on CPU, on the seeded random `small` preset saved once with glm5.save_checkpoint. One subprocess of this script
(hidden --_worker flag) loads the checkpoint for every side, runs one untimed warm-up step per side, then --steps
timed rounds, each round one step of every side in rotating order (so that load from other processes hits every
side alike); the median step time gives tokens/s = batch * seq / time.

Sides:
  transformers        AutoModelForCausalLM.from_pretrained(dir); loss = model(ids, labels=ids).loss; the plain
                      torch.optim.AdamW (what transformers' Trainer uses by default, "adamw_torch"; on CPU its
                      per-tensor loop). Its forward always runs the DSA indexer (under no_grad) and masks attention to
                      the top-k (all keys while seq <= index_topk = 512). The reference of the ratio column.
  transformers+fused  the same with AdamW(fused=True), the optimizer glm5's loop uses: the model-only comparison.
  glm5 pretrain       the loop's own step (glm5.train.losses.ForwardLoss, stage "pretrain", glm5.train.optim's
                      fused AdamW): dense MLA, indexers frozen, next-token loss + the sequence-wise balance loss,
                      then the aux-loss-free bias update.
                      The like-for-like row: same weights trained, same loss up to the tiny balance term.
  glm5 pretrain+MTP   the same with one MTP depth (the MTP layer's forward and backward on top; transformers has no
                      MTP, so this row does more work than the reference).
  glm5 sparse         the sparse DSA stage: indexer scores, top-k attention, indexer KL on the selected set.

MFU: model FLOPs per token = 6 x (matmul parameters active per token, excluding the embedding lookup and unused
indexers) + 6 x attention (QK and PV over the causal average of (seq+1)/2 keys), per second, over the machine's
fp32 matmul peak measured here (best of several 2048^3 torch.mm with the same thread count; the bf16 peak with
--autocast bf16).

Contention: the machine may be shared. Each timed step reads the system-wide CPU pressure (/proc/pressure/cpu);
a step during which other runnable tasks stalled for more than --max-stall of its wall time is discarded and re-run
(within --max-retries extra rounds; after that contended steps are kept, and the table shows the median stall);
before each step the worker waits up to --max-wait s for the other processes to go quiet.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name, cpu_stall_us, wait_quiet  # bench/machine.py (python puts bench/ on sys.path)

SIDES = ("transformers", "transformers+fused", "glm5 pretrain", "glm5 pretrain+MTP", "glm5 sparse")


# -- contention -------------------------------------------------------------------------------------------------------
# -- worker ---------------------------------------------------------------------------------------------------------
def _make_steps(sides: list[str], ckpt: str, ids_BT1: torch.Tensor, bf16: bool = False) -> dict:
    """{side: step function}; a step runs forward, backward, clip and the optimizer. The two transformers sides share
    one model (two optimizers), the glm5 sides share another (each side sets its stage before its step): timing does
    not depend on the weights' trajectory, and 5 copies of the model would not fit beside the machine's other jobs."""
    steps = {}
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # --autocast bf16: every side alike
    if any(s.startswith("transformers") for s in sides):
        import transformers

        transformers.logging.set_verbosity_error()  # the MTP layer's tensors are expected unused keys
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
        ids_BT = ids_BT1[:, :-1]
        for side in (s for s in sides if s.startswith("transformers")):
            opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                    fused=side == "transformers+fused")

            def step(opt=opt):
                with amp:
                    loss = hf(input_ids=ids_BT, labels=ids_BT, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(loss)

            steps[side] = step
        steps["_attn"] = hf.config._attn_implementation
    if any(s.startswith("glm5") for s in sides):
        import glm5
        from glm5.train.balance import update_bias
        from glm5.train.losses import ForwardLoss, loss_denominators
        from glm5.train.loop import set_stage
        from glm5.train.optim import build_optimizer

        model = glm5.load_model(ckpt, dtype=torch.float32).train()
        doc_BT1 = torch.zeros_like(ids_BT1)
        pos_BT1 = torch.arange(ids_BT1.shape[1]).expand_as(ids_BT1)
        for side in (s for s in sides if s.startswith("glm5")):
            stage = "sparse" if side == "glm5 sparse" else "pretrain"
            depth = 1 if side == "glm5 pretrain+MTP" else 0
            set_stage(model, stage, depth)
            net = ForwardLoss(model, stage, mtp_depth=depth)
            opt = build_optimizer(model, "adamw", lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
            params = [p for p in model.parameters() if p.requires_grad]
            den = loss_denominators(ids_BT1, doc_BT1, depth)

            def step(stage=stage, depth=depth, net=net, opt=opt, params=params, den=den):
                set_stage(model, stage, depth)  # flags and the dense/sparse switch only: no tensor work
                with amp:
                    total, losses, stats = net(ids_BT1, doc_BT1, pos_BT1, den)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                update_bias(model, stats["loads"], 1e-3)
                return float(losses["lm"])

            steps[side] = step
    return steps


def worker(args) -> None:
    """All sides in one process, interleaved: round r runs one step of every side (order rotated each round), so
    whatever else the machine does slows every side alike and the ratios hold even when the absolute times do not."""
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    ids_BT1 = load_file(args.ids)["ids"]
    steps = _make_steps(args.sides, args.ckpt, ids_BT1, args.autocast == "bf16")
    attn = steps.pop("_attn", None)
    res = {side: {"times": [], "stalls": [], "discarded": [], "first_loss": fn()} for side, fn in steps.items()}
    order = list(steps)
    rounds = 0
    while min(len(r["times"]) for r in res.values()) < args.steps and rounds < args.steps + args.max_retries:
        for side in order[rounds % len(order):] + order[: rounds % len(order)]:
            if len(res[side]["times"]) >= args.steps:
                continue
            wait_quiet(args.max_wait, busy_limit=0.3)
            s0 = cpu_stall_us()
            t0 = time.perf_counter()
            steps[side]()
            dt = time.perf_counter() - t0
            s1 = cpu_stall_us()
            stall = (s1 - s0) / 1e6 / dt if s0 is not None else 0.0
            room = args.steps + args.max_retries - rounds - 1 >= args.steps - len(res[side]["times"])
            if stall > args.max_stall and room:
                res[side]["discarded"].append(dt)
                continue
            res[side]["times"].append(dt)
            res[side]["stalls"].append(stall)
        rounds += 1
    print("RESULT " + json.dumps({"results": res, "attn_implementation": attn}), flush=True)


def matmul_peak(threads: int, dtype=torch.float32, n: int = 2048, repeats: int = 8) -> float:
    """Best torch.mm GFLOP/s over `repeats` n^3 products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        wait_quiet(10, busy_limit=0.3)
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops_per_token(cfg, seq: int, side: str) -> float:
    """6 x active matmul parameters + 6 x attention, per token (see the module docstring)."""
    import glm5

    model = glm5.build_model(cfg)  # meta device: shapes only
    n = model.num_params()
    active = n["active_no_embed"] + model.lm_head.weight.numel()
    idx = sum(p.numel() for name, p in model.named_parameters() if ".indexer." in name and not name.startswith("mtp."))
    if side != "glm5 sparse":
        active -= idx  # dense MLA: the indexers do not run (transformers runs its indexer without gradients)
    s_avg = (seq + 1) / 2
    attn = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * s_avg
    layers = 1
    if side == "glm5 pretrain+MTP":
        active += n["mtp_active"] - sum(p.numel() for name, p in model.named_parameters()
                                        if name.startswith("mtp.") and ".indexer." in name)
        active += model.lm_head.weight.numel()  # the MTP depth has its own pass through the head
        layers += 1
    attn *= (cfg.num_hidden_layers + layers - 1) / cfg.num_hidden_layers
    return 6 * active + 3 * attn


def run_worker(sides, ckpt, ids_path, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", ",".join(sides), "--_ckpt", ckpt, "--_ids", ids_path,
           "--threads", str(args.threads), "--steps", str(args.steps), "--max-stall", str(args.max_stall),
           "--max-retries", str(args.max_retries), "--max-wait", str(args.max_wait), "--autocast", args.autocast]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise RuntimeError(f"worker failed (rc={p.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--max-stall", type=float, default=0.05)
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--max-wait", type=float, default=10.0)
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="bf16 autocast for every side (CPUs with AMX / AVX512-BF16 multiply bf16 several times faster)")
    p.add_argument("--append", help="append the result table to this markdown file")
    p.add_argument("--_worker")
    p.add_argument("--_ckpt")
    p.add_argument("--_ids")
    args = p.parse_args(argv)
    if args._worker:
        args.sides = args._worker.split(",")
        args.ckpt, args.ids = args._ckpt, args._ids
        worker(args)
        return 0

    import glm5
    from safetensors.torch import save_file

    sides = [s.strip() for s in args.sides.split(",")]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        p.error(f"unknown side(s) {bad}; choose from {SIDES}")
    cfg = glm5.config.resolve_config(args.preset)
    tokens = args.batch * args.seq
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # the checkpoint is read back at memory speed
    with tempfile.TemporaryDirectory(prefix="glm5-train-bench-", dir=shm) as tmp:
        model = glm5.load_model(cfg, dtype=torch.float32, seed=0)
        glm5.save_checkpoint(model, Path(tmp) / "ckpt")
        del model
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
        save_file({"ids": ids}, str(Path(tmp) / "ids.safetensors"))
        peak_dtype = "bf16" if args.autocast == "bf16" else "fp32"
        peak = matmul_peak(args.threads, torch.bfloat16 if args.autocast == "bf16" else torch.float32)
        out = run_worker(sides, str(Path(tmp) / "ckpt"), str(Path(tmp) / "ids.safetensors"), args)
    results = out["results"]
    for side, r in results.items():
        # Contention only ever slows a step down, so the fastest of the steps is the best estimate of the code's own
        # speed (as timeit does); the median is shown beside it.
        r["best_s"], r["median_s"] = min(r["times"]), statistics.median(r["times"])
        r["tok_s"] = tokens / r["best_s"]
        r["flops_tok"] = model_flops_per_token(cfg, args.seq, side)
        r["mfu"] = r["tok_s"] * r["flops_tok"] / (peak * 1e9)
        print(f"{side:20s} best {r['best_s']:7.2f} s/step (median {r['median_s']:.2f})  {r['tok_s']:8.1f} tok/s  "
              f"MFU {100 * r['mfu']:5.1f}%  (first loss {r['first_loss']:.4f}, discarded {len(r['discarded'])}, "
              f"median stall {100 * statistics.median(r['stalls']):.0f}%)", flush=True)
    ref = results.get("transformers")
    lines = [
        f"## Training\n",
        f"`bench/train.py --preset {args.preset} --batch {args.batch} --seq {args.seq} --steps {args.steps} "
        f"--threads {args.threads} --autocast {args.autocast}` — {datetime.date.today()}, {cpu_name()}, "
        f"torch {torch.__version__}, "
        f"{args.threads} threads; {peak_dtype} matmul peak measured here: {peak:.1f} GFLOP/s.\n",
        "One step = forward + backward + clip + AdamW, batch of "
        f"{args.batch} x {args.seq} tokens; {args.steps} timed steps per side after a warm-up step, all sides in one "
        "process, interleaved step by step (contention slows them alike); tokens/s, ratios and MFU from each side's "
        "fastest step (contention only slows steps down), the median beside it. MFU counts model FLOPs only "
        "(6 x active matmul parameters + attention over the causal half).\n",
        "| side | s/step best (median) | tokens/s | vs transformers | vs transformers+fused | MFU | steps discarded "
        "| median CPU stall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fused = results.get("transformers+fused")
    for side, r in results.items():
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        ratio_f = f"{r['tok_s'] / fused['tok_s']:.2f}x" if fused else "-"
        lines.append(f"| {side} | {r['best_s']:.2f} ({r['median_s']:.2f}) | {r['tok_s']:.1f} | {ratio} | {ratio_f} | "
                     f"{100 * r['mfu']:.1f}% | "
                     f"{len(r['discarded'])} | {100 * statistics.median(r['stalls']):.0f}% |")
    if ref:
        lines.append(f"\ntransformers attention implementation: `{out.get('attn_implementation')}`. "
                     "Spread of the timed steps (min-max s): " + ", ".join(
                         f"{s} {min(r['times']):.2f}-{max(r['times']):.2f}" for s, r in results.items()) + ".\n")
    text = "\n".join(lines)
    print("\n" + text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
