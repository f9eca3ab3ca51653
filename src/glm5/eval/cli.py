"""`glm5 eval`: held-out suites through the engine, a markdown table on stdout, optionally the full JSON.

    glm5 eval [--model DIR] [--tokenizer DIR] [--n 100] [--seed 0] [--suites arithmetic,world,...]
              [--retrieval-lengths 1024,2048,4096 | 1024:300,...] [--max-tokens 256] [--json out.json]

glm5/cli.py calls `add_parser(sub)`.
"""

from __future__ import annotations

import argparse
import sys

from ..data import GENERATORS, VARIANTS
from ..data.example import FAMILIES

# Suites beyond the default families: the other generators (typed arithmetic, multi-turn, thinking-off,
# out-of-scope, user-declared tools) and the named variants.
MORE_SUITES = tuple(g for g in GENERATORS if g not in FAMILIES) + tuple(VARIANTS)


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _lengths(s: str) -> list[int] | dict[int, int]:
    """"1024,2048" (n split over them) or "1024:300,2048:33" (that many examples at each length)."""
    items = [x.strip() for x in s.split(",") if x.strip()]
    if items and all(":" in x for x in items):
        try:
            out = {int(a): int(b) for a, b in (x.split(":") for x in items)}
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LENGTH:EXAMPLES pairs, got {s!r}") from None
        if min(out) < 1 or min(out.values()) < 1:
            raise argparse.ArgumentTypeError(f"expected positive lengths and counts, got {s!r}")
        return out
    if any(":" in x for x in items):
        raise argparse.ArgumentTypeError(f"give every length a count (1024:300,2048:33) or none, got {s!r}")
    return _ints(s)


def _floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or not all(0 <= x <= 1 for x in out):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {s!r}")
    return out


def _suites(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in FAMILIES and x not in MORE_SUITES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {', '.join(bad) or '(none)'}; choose from "
                                         f"{', '.join(FAMILIES + MORE_SUITES)}")
    return out


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="held-out evaluation: accuracy, hallucination, sparse vs dense retrieval, "
                       "tool use, MTP draft acceptance")
    p.add_argument("--model", default=None, help="checkpoint directory or preset (tiny, small: random weights). "
                   "Default: the model shipped in the package")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=100, help="examples per suite (retrieval: spread over the grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suites", type=_suites, default=list(FAMILIES),
                   help=f"comma-separated; default {', '.join(FAMILIES)}; more: {', '.join(MORE_SUITES)} "
                        "(typed wordings, several turns, thinking off, out-of-scope requests, user-declared tools)")
    p.add_argument("--retrieval-lengths", type=_lengths, default=[1024, 2048, 4096],
                   help="context tokens (the retrieval n split over them), or LENGTH:EXAMPLES pairs; the speedrun's "
                        "eval: 1024:300,2048:15,4096:15 --seed 1000")
    p.add_argument("--retrieval-depths", type=_floats, default=[0.1, 0.5, 0.9], help="needle depth in [0, 1]")
    p.add_argument("--max-tokens", type=int, default=256, help="per generation round")
    p.add_argument("--no-mtp", action="store_true", help="skip measuring MTP draft acceptance")
    p.add_argument("--cache-mib", type=int, default=None, help="KV cache budget in MiB (default 1024)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the full result (with per-example records) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--unconstrained-tools", action="store_true",
                   help="decode chats that declare tools freely; by default they decode under the grammar glm5 serve "
                        "puts on such a request (calls of declared tools only, with their parameter names)")
    p.set_defaults(fn=cmd_eval)
    return p


def cmd_eval(args) -> int:
    import torch

    from ..config import ConfigError
    from ..loader import SHIPPED_MODEL_DIR, load, shipped_model_available
    from .report import format_table, write_json
    from .run import evaluate

    if args.n < 1 or args.max_tokens < 1:
        print("glm5 eval: error: --n and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    spec = args.model
    if spec is None:
        if not shipped_model_available():
            raise ConfigError(f"no shipped model at {SHIPPED_MODEL_DIR} (config.json missing): pass --model DIR "
                              f"(a trained checkpoint) or a preset (tiny, small) to evaluate random weights")
        spec = SHIPPED_MODEL_DIR
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(spec, tokenizer_dir=args.tokenizer, device=args.device)
    if loaded.untrained:
        print(loaded.banner(), file=sys.stderr)
    result = evaluate(loaded.model, loaded.tokenizer, n=args.n, seed=args.seed, max_tokens=args.max_tokens,
                      families=args.suites, retrieval_lengths=args.retrieval_lengths,
                      retrieval_depths=args.retrieval_depths, mtp=not args.no_mtp,
                      cache_bytes=None if args.cache_mib is None else args.cache_mib << 20, progress=not args.quiet,
                      served_tools=not args.unconstrained_tools)
    result["model"] = {"name": loaded.name, "source": loaded.source, "untrained": loaded.untrained}
    print(f"glm5 eval: {loaded.name} ({loaded.source}), n={args.n}, seed={args.seed}, "
          f"{result['seconds']:.0f} s\n")
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as glm5_main

    return glm5_main(argv)  # `python -m glm5.eval.cli eval ...` is `glm5 eval ...`


if __name__ == "__main__":
    sys.exit(main())
