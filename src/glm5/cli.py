"""`glm5 <command>`: the command-line entry point. Flags are parsed here and nowhere else."""

from __future__ import annotations

import argparse
import sys
import time


# serve, chat / generate, train / sft, quantize, speedrun, eval, rl
SUBCOMMAND_MODULES = ("glm5.server.cli", "glm5.client_cli", "glm5.train.cli", "glm5.quant.cli", "glm5.speedrun.cli",
                      "glm5.eval.cli", "glm5.rl.cli")
MIB = 1 << 20


# -- flags shared by serve, chat and generate ----------------------------------------------------------------------
def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


def add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default=None, help="checkpoint directory or preset (tiny, small; random weights). "
                   "Default: the model shipped in the package, else the untrained 'small' preset")
    s.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's, or the "
                   "shipped tokenizer for presets)")
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    s.add_argument("--cache-mib", type=positive_int, default=None, help="KV cache size in MiB (default: room for every "
                   "admitted sequence at the model's full context, at most half the free memory on a CPU, 90%% on "
                   "a GPU)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="the model's weights and "
                   "activations (default auto: bfloat16 on a GPU, float32 on a CPU, where most CPUs multiply bf16 "
                   "hundreds of times slower than fp32). bfloat16 halves the weights' memory and the bytes a decoded "
                   "token reads")


def load_model_args(args, quiet: bool = False):
    """The model, tokenizer and sampling defaults --model / --tokenizer / --device / --threads / --dtype name."""
    import torch

    from .loader import load

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load(args.model, tokenizer_dir=args.tokenizer, device=args.device, dtype=dtype)
    if loaded.untrained or not quiet:
        print(loaded.banner(), file=sys.stderr)
    return loaded


def cache_bytes_arg(args) -> int | None:
    return None if args.cache_mib is None else args.cache_mib * MIB


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
        # one line naming the file; an OSError's own text would show the path as a repr
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else e
        print(f"glm5 {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
