"""`glm5 train`: settings from a config file (JSON, or TOML via tomllib) overridden by flags; one flag per
TrainConfig field (--seq-len, --mtp-depth, ...; booleans as --progress / --no-progress).

    glm5 train --config run.toml --steps 200
    glm5 sft --model runs/pre/checkpoints/step_00000200/model --data chats.jsonl --out-dir runs/sft
    python -m glm5.train.cli --model tiny --steps 50 --out-dir runs/t           # same, without the glm5 entry point
    torchrun --nproc-per-node 2 -m glm5.train.cli --config run.toml            # DDP (gloo on CPU)

Under torchrun this module (not the library) reads the launcher's environment and sets up the process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tomllib
import typing
from pathlib import Path

from .loop import TrainConfig


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such config file")
    try:
        d = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({e})") from None
    d = d.get("train", d)  # a [train] table, or the top level
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{p}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return d


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or TOML file of settings (flags override it)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0 = torch's default); 1 is fastest for tiny models on a busy "
                        "machine, and makes CPU runs reproducible bit for bit")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        if f.name == "resume":
            p.add_argument(flag, dest=f.name, nargs="?", const="auto", default=None,
                           help="continue from the newest checkpoint in --out-dir (fresh start if there is none), "
                                "or from the checkpoint directory given")
        elif t is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {f.default})")
        else:
            p.add_argument(flag, dest=f.name, type=t, default=None, help=f"(default {f.default!r})")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `train` and `sft` on the glm5 CLI's subparsers."""
    p = sub.add_parser("train", help="pre-train / DSA warm-up / sparse-stage training (single process or torchrun)")
    add_arguments(p)
    p.set_defaults(fn=cmd_train, sft=False)
    s = sub.add_parser("sft", help="supervised fine-tuning on chats (loss on assistant tokens only); --data is a "
                                   "JSONL file of {\"messages\": [...], \"tools\": [...]} objects; --stage sparse "
                                   "trains with DSA on, as GLM-5's post-training (the default stage is dense)")
    add_arguments(s)
    s.add_argument("--tokenizer", help="tokenizer directory (default: the --model directory's, else the shipped one)")
    s.set_defaults(fn=cmd_train, sft=True)
    return p


def sft_source(cfg: TrainConfig, tokenizer_dir: str | None):
    from ..config import resolve_config
    from ..tokenizer import Tokenizer
    from .sft import ChatDocs

    if cfg.data == "synthetic":
        raise ValueError("glm5 sft needs --data: a JSONL file of {\"messages\": [...], \"tools\": [...]} chats")
    model_dir = Path(cfg.model)
    if tokenizer_dir:
        tok = Tokenizer.from_dir(tokenizer_dir)
    elif (model_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(model_dir)
    else:
        tok = Tokenizer.default()
    vocab = resolve_config(cfg.model).vocab_size
    if len(tok) != vocab:
        raise ValueError(f"tokenizer {tok.source} has {len(tok)} tokens but the model {cfg.model} has vocab_size "
                         f"{vocab}: pass the tokenizer the model was trained with (--tokenizer DIR)")
    return ChatDocs(cfg.data, tok)


def config_from_args(args) -> TrainConfig:
    d = load_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            d[f.name] = v
    return TrainConfig(**d)


def cmd_train(args) -> int:
    import torch
    import torch.distributed as dist

    from ..weights import CheckpointError
    from .data import DataError
    from .loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sft = getattr(args, "sft", False)
    command = "glm5 sft" if sft else "glm5 train"
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # launched by torchrun: env:// rendezvous
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        if dist.get_rank() != 0:
            cfg.progress = False
            logging.getLogger().setLevel(logging.WARNING)
    try:
        source = sft_source(cfg, args.tokenizer) if sft else None
        rec = train(cfg, source)
        if (not dist.is_initialized() or dist.get_rank() == 0) and rec:
            print(f"{command}: step {rec['step']} loss {rec['loss']:.4f} -> {cfg.out_dir}")
        return 0
    except (CheckpointError, DataError, ValueError, OSError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm5.train.cli", description="glm5 train (see glm5/train/cli.py)")
    add_arguments(p)
    return cmd_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
