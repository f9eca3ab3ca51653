"""The Ray backend of glm5 rl on this machine, side by side in one run:

1. rollout throughput (samples/s): the same groups (shipped model, honesty families, G samples at temperature 1)
   through R = 1 and R = 2 rollout workers (Ray actors, the pool the RL loop uses), and, for the same cores, R = 1
   with two threads; ratios vs R = 1;
2. trainer steps on those groups: one rank in the driver with one and with two threads, and W = 2 ranks of one
   thread each (Ray actors under DDP, as `--trainer-ranks 2` runs them), median of K steps; and what rollout and
   training imply for R workers (rollout-bound while R < R* = k B G / (r T_train), k the groups sampled per group
   trained);
3. weight-push latency, Ray object store vs the local backend's process queue, for the shipped model and the `small`
   preset: driver-side (ray.put / queue put) and end to end (sent -> applied in the worker's engine), median of K.

    .venv/bin/python bench/rl_ray.py [--groups 8] [--group-size 8] [--max-tokens 128] [--pushes 5] [--train-steps 3]
                                     [--wait-quiet 30] [--only trainer]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process on this machine, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rollout(cfg, n_workers: int, orders: list, push_sd) -> dict:
    """Every order through a fresh pool of n_workers; wall seconds from the first order to the last group, the
    workers' CPU seconds meanwhile, and the share of the wall time in which some runnable task waited for a CPU
    (PSI: other processes, or oversubscription)."""
    from glm5.rl.ray_backend import RayPool
    from machine import cpu_stall_us

    pool = RayPool(cfg, n_workers)
    try:
        pool.push(0, push_sd)
        acks = 0
        while acks < n_workers:  # every engine holds the weights: the clock starts
            acks += pool.get(timeout=600)[0] == "pushed"
        pids = [s.info["pid"] for s in pool.slots]
        cpu0, stall = sum(map(cpu_seconds, pids)), cpu_stall_us()
        t0 = time.perf_counter()
        pool.submit(orders)
        groups, pending = [], {o[0] for o in orders}
        while pending:
            msg = pool.get(timeout=3600)
            if msg[0] == "group":
                groups.append(msg)
                pending.discard(msg[1])
        wall = time.perf_counter() - t0
        cpu = sum(map(cpu_seconds, pids)) - cpu0
        stall = None if stall is None else (cpu_stall_us() - stall) / 1e6 / wall
    finally:
        info = pool.stop()
    samples = sum(len(g[2]) for g in groups)
    tokens = sum(sum(s["mask"]) for g in groups for s in g[2])
    return {"wall": wall, "cpu": cpu, "samples": samples, "tokens": tokens, "groups": groups, "stall": stall,
            "per_worker": [w["groups"] for w in info["workers"]]}


def trainer_steps(model_dir, groups: list, world: int, threads: int, steps: int) -> list[float]:
    """Seconds of each of `steps` optimizer steps on the same groups, from the same start. world 1: train_step in
    this process (the loop's default trainer); world > 1: a TrainerGroup of Ray actors, and a step is what the loop
    waits for: the ranks' step, rank 0's weights back and copied into the driver's model."""
    import ray
    import torch

    import glm5
    from glm5.rl.ray_trainer import TrainerGroup
    from glm5.rl.trainer import RLTrainConfig, make_optimizer, train_step

    cfg, out = RLTrainConfig(), []
    model = glm5.load(model_dir).model.float()
    if world == 1:
        torch.set_num_threads(threads)
        opt = make_optimizer(model, cfg)
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, opt, groups, cfg)
            out.append(time.perf_counter() - t0)
        torch.set_num_threads(1)
        return out
    ray.init(num_cpus=world * threads, include_dashboard=False)
    try:
        group = TrainerGroup(str(model_dir), None, cfg, world, threads)
        try:
            for _ in range(steps):
                t0 = time.perf_counter()
                _, sd = group.step(groups)
                model.load_state_dict(sd)
                out.append(time.perf_counter() - t0)
        finally:
            group.stop()
    finally:
        ray.shutdown()
    return out


def push_latency(pool, sd, pushes: int) -> tuple[float, float]:
    """Median driver-side seconds and median sent -> applied seconds (over every worker) of `pushes` pushes."""
    put, e2e = [], []
    for v in range(1, pushes + 1):
        t0 = time.perf_counter()
        pool.push(v, sd)
        put.append(time.perf_counter() - t0)
        acks = 0
        while acks < getattr(pool, "n", 1):
            msg = pool.get(timeout=600)
            if msg[0] == "pushed" and msg[1] == v:
                e2e.append(msg[3])
                acks += 1
    return statistics.median(put), statistics.median(e2e)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--pushes", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=3, help="trainer steps per configuration (median reported)")
    ap.add_argument("--wait-quiet", type=float, default=30.0, help="wait up to this long for idle CPUs first")
    ap.add_argument("--only", choices=("trainer",), default=None,
                    help="trainer: one rollout (1 worker) for the groups, then the trainer steps; no push latency")
    args = ap.parse_args()

    import ray
    import torch

    import glm5
    from glm5.config import small
    from glm5.loader import SHIPPED_MODEL_DIR
    from glm5.rl.loop import PromptStream, _group_seed
    from glm5.rl.ray_backend import RayPool
    from glm5.rl.worker import LocalWorker, WorkerConfig

    from machine import busy_cores, cpu_name, wait_quiet  # bench/machine.py (bench/ is on sys.path)

    torch.set_num_threads(1)
    shipped = glm5.load()
    model = shipped.model.float()  # the trainer's copy, as the RL loop holds it
    sd = model.state_dict()
    fams = ("world", "unknown", "arithmetic", "tool")
    prompts = PromptStream(fams, seed=0, per_family=64)
    orders = [(g, prompts[g], args.group_size, _group_seed(0, g)) for g in range(args.groups)]
    base = dict(model=str(SHIPPED_MODEL_DIR), max_tokens=args.max_tokens, update_in_flight=False)
    waited = wait_quiet(args.wait_quiet)
    print(f"bench/rl_ray.py on {cpu_name()}, {os.cpu_count()} cores, Ray {ray.__version__}; other processes kept "
          f"{busy_cores():.1f} cores busy at start (after waiting {waited:.0f} s for quiet)")

    rows = []
    for n, threads in ((1, 1),) if args.only else ((1, 1), (2, 1), (1, 2)):
        rows.append((n, threads, rollout(WorkerConfig(**base, threads=threads), n, orders, sd)))
    sps = {(n, t): r["samples"] / r["wall"] for n, t, r in rows}
    if not args.only:
        print(f"\n## Rollout: {args.groups} groups x {args.group_size} samples, max {args.max_tokens} tokens a turn, "
              f"shipped model (same seeds in every row)")
        print("| rollout workers x threads | wall s | samples/s | vs 1 x 1 | sampled tokens/s | groups per worker | "
              "workers' CPU s | samples per CPU s | CPU stall share |")
        print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
        for n, threads, r in rows:
            stall = "-" if r["stall"] is None else f"{r['stall']:.2f}"
            print(f"| {n} x {threads} | {r['wall']:.1f} | {sps[n, threads]:.2f} | {sps[n, threads] / sps[1, 1]:.2f}x "
                  f"| {r['tokens'] / r['wall']:.0f} | {'/'.join(map(str, r['per_worker']))} | {r['cpu']:.1f} | "
                  f"{r['samples'] / r['cpu']:.2f} | {stall} |")
        print(f"R = 2 vs R = 1 on the same two cores (2 x 1 vs 1 x 2 threads): {sps[2, 1] / sps[1, 2]:.2f}x. Samples "
              f"per CPU second, 2 workers vs 1 (what R workers on R free cores would multiply): "
              f"{rows[1][2]['samples'] / rows[1][2]['cpu'] / (rows[0][2]['samples'] / rows[0][2]['cpu']):.2f}x")

    # trainer steps on the groups just generated: T_train for the scaling model, and W = 2 ranks against one
    from glm5.rl.buffer import Group

    groups = [Group(g[1], [s["reward"] if s["reward"] is not None else 0.0 for s in g[2]],
                    [[v for v in s["versions"] if v >= 0] for s in g[2]],
                    {"samples": [{k: s[k] for k in ("ids", "mask", "logprobs")} for s in g[2]]})
              for g in sorted(rows[0][2]["groups"], key=lambda g: g[1])]
    bg = sum(len(g.data["samples"]) for g in groups)
    print(f"\n## Trainer steps on those {bg} samples ({sum(len(s['ids']) for g in groups for s in g.data['samples'])} "
          f"tokens), median of {args.train_steps}")
    print("| trainer | threads each | CPUs | step s (median) | steps s | vs 1 rank x 1 thread |")
    print("|---|---:|---:|---:|---|---:|")
    med = {}
    for world, threads in ((1, 1), (1, 2), (2, 1)):
        ts = trainer_steps(SHIPPED_MODEL_DIR, groups, world, threads, args.train_steps)
        med[world, threads] = statistics.median(ts)
        where = "the driver, 1 rank" if world == 1 else f"{world} ranks (Ray actors, DDP over gloo)"
        print(f"| {where} | {threads} | {world * threads} | {med[world, threads]:.2f} | "
              f"{', '.join(f'{t:.2f}' for t in ts)} | {med[1, 1] / med[world, threads]:.2f}x |")
    print(f"W = 2 vs W = 1 on the same two cores (2 x 1 vs 1 x 2 threads): {med[1, 2] / med[2, 1]:.2f}x the speed")
    t_train = med[1, 1]
    r1 = rows[0][2]["samples"] / rows[0][2]["wall"]
    # dynamic sampling drops groups whose rewards are all equal: the rollout samples k times what a step trains
    kept = sum(len({s["reward"] for s in g[2] if s["reward"] is not None}) > 1 for g in rows[0][2]["groups"])
    k = len(groups) / max(1, kept)
    print(f"\nOne rollout worker makes r = {r1:.2f} samples/s; {kept} of {len(groups)} groups carry a GRPO signal (k = "
          f"{k:.1f} groups sampled per group trained), so a step's rollout takes k B G / (R r) = {k * bg / r1:.1f} s / "
          f"R: with T_train = {t_train:.1f} s (1 rank, 1 thread) rollout-bound while R < R* = k B G / (r T_train) = "
          f"{k * bg / (r1 * t_train):.1f} workers (a core each), trainer-bound beyond.")
    if args.only:
        return

    print(f"\n## Weight push: median of {args.pushes}, fp32 state dict of the trainer")
    print("| model | MB | backend | driver-side ms | sent -> applied ms | vs local (end to end) |")
    print("|---|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "small"
        m = glm5.load_model(small())
        glm5.save_checkpoint(m, big)
        shipped.tokenizer.save(big)
        for name, path, msd in (("shipped", SHIPPED_MODEL_DIR, sd), ("small", big, m.state_dict())):
            mb = sum(t.numel() * t.element_size() for t in msd.values()) / 1e6
            cfg = WorkerConfig(model=str(path), max_tokens=8, threads=1, cache_mib=64)
            local = LocalWorker(cfg)
            try:
                lput, le2e = push_latency(local, msd, args.pushes)
            finally:
                local.stop()
            print(f"| {name} | {mb:.0f} | local (1 process) | {1e3 * lput:.0f} | {1e3 * le2e:.0f} | 1.00x |")
            for n in (1, 2):
                pool = RayPool(cfg, n)
                try:
                    put, e2e = push_latency(pool, msd, args.pushes)
                finally:
                    pool.stop()
                print(f"| {name} | {mb:.0f} | ray, {n} worker{'s' * (n > 1)} | {1e3 * put:.0f} | {1e3 * e2e:.0f} | "
                      f"{e2e / le2e:.2f}x |")


if __name__ == "__main__":
    main()
