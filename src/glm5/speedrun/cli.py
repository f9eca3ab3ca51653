"""`glm5 speedrun`: train the default model from scratch (see pipeline.py).

    glm5 speedrun                          # the full recipe, about 30 minutes on 2 CPU cores, into runs/speedrun
    glm5 speedrun --recipe ci --out-dir /tmp/sr   # a few minutes: every stage, tiny sizes
    glm5 speedrun --out-dir runs/speedrun  # again after a crash: finished stages are skipped, training resumes
    glm5 speedrun --ship                   # ... and install the result as the package's default model
"""

from __future__ import annotations

import logging
import sys


def add_parser(sub):
    from .pipeline import AUTOCASTS
    from .recipe import RECIPES

    p = sub.add_parser("speedrun", help="tokenizer -> pre-training -> DSA stages -> SFT -> export -> eval -> report")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="full")
    p.add_argument("--out-dir", default="runs/speedrun")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--autocast", choices=AUTOCASTS, default="auto",
                   help="training numerics: bf16 autocast where bf16 matmuls are fast (CUDA, CPUs with AMX or "
                        "AVX512-BF16), else fp32 (auto); or either one")
    p.add_argument("--stop-after", help="stop after this stage (e.g. sft), continue later with the same --out-dir")
    p.add_argument("--ship", action="store_true", help="afterwards, install the result as the package's default "
                   "model (glm5/assets/model/), replacing the one there")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(fn=cmd_speedrun)
    return p


def cmd_speedrun(args) -> int:
    import torch

    from ..train.data import DataError
    from .pipeline import run_speedrun, ship

    logging.basicConfig(level=logging.INFO if not args.progress else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = run_speedrun(args.out_dir, args.recipe, args.device, args.progress, args.stop_after,
                             args.autocast)
        if args.ship:
            print(f"glm5 speedrun: installed as the default model in {ship(args.out_dir)}")
    except (DataError, ValueError, OSError) as e:
        print(f"glm5 speedrun: error: {e}", file=sys.stderr)
        return 2
    if model.is_dir():
        print(f"glm5 speedrun: model in {model}, report in {model.parent / 'report.md'}")
    else:
        print(f"glm5 speedrun: stopped after {args.stop_after}; continue with the same --out-dir")
    return 0
