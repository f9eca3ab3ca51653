"""`glm5 <command>`: the command-line entry point. Flags are parsed here and nowhere else."""

from __future__ import annotations

import argparse
import sys
import time


# serve / chat / generate, train / sft, quantize, speedrun, eval
SUBCOMMAND_MODULES = ("glm5.server.cli", "glm5.train.cli", "glm5.quant.cli", "glm5.speedrun.cli", "glm5.eval.cli")


def cmd_inspect(args) -> int:
    from .config import resolve_config
    from .inspect import format_report, weight_report

    t0 = time.perf_counter()
    cfg = resolve_config(args.model)
    rep = weight_report(cfg)
    print(format_report(cfg, rep, f"glm5 inspect {args.model}"))
    print(f"  (built on the meta device in {time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="glm5", description="GLM-5 in PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("inspect", help="parameters and weight bytes of a preset, config.json or checkpoint dir")
    s.add_argument("model", help="preset (tiny, small, glm5), config.json, or checkpoint directory")
    s.set_defaults(fn=cmd_inspect)
    import importlib

    for mod in SUBCOMMAND_MODULES:  # each area registers its own subcommands
        importlib.import_module(mod).add_parser(sub)
    args = p.parse_args(argv)
    from .config import ConfigError
    from .tokenizer import TokenizerError
    from .weights import CheckpointError

    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, TokenizerError) as e:
        print(f"glm5 {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
