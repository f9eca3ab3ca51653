"""`glm5 serve`, `glm5 chat`, `glm5 generate`. glm5/cli.py calls `add_parser(sub)`; `python -m glm5.server.cli`
runs these three alone.

    glm5 serve [--model DIR|preset] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    glm5 chat [--model ... | --url http://host:port] [--no-think]        # /reset, /think on|off, Ctrl-D exits
    glm5 generate "prompt" [--raw] [--max-tokens N] [--temperature T] [--seed S]

chat and generate run the model in this process unless --url names a server. generate writes the answer to
stdout and the reasoning (dimmed) to stderr, so `glm5 generate "..." > out.txt` keeps the answer only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

MIB = 1 << 20


def _model_args(s: argparse.ArgumentParser):
    s.add_argument("--model", default=None, help="checkpoint directory or preset (tiny, small; random weights). "
                   "Default: the model shipped in the package, else the untrained 'small' preset")
    s.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's, or the "
                   "shipped tokenizer for presets)")
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    s.add_argument("--cache-mib", type=int, default=None, help="KV cache budget in MiB (default 1024)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _gen_args(s: argparse.ArgumentParser, max_tokens: int):
    s.add_argument("--url", default=None, help="talk to a running server (http://host:port) instead of loading a "
                   "model here")
    s.add_argument("--api-key", default=os.environ.get("GLM5_API_KEY"), help="with --url (default: $GLM5_API_KEY)")
    s.add_argument("--max-tokens", type=int, default=max_tokens)
    s.add_argument("--temperature", type=float, default=None,
                   help="default: the model's generation_config.json (the shipped model: 0, greedy), else 1")
    s.add_argument("--top-p", type=float, default=None, help="default: the model's generation_config.json, else 1")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--no-think", action="store_true", help="thinking off (chat format: enable_thinking=false)")


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("GLM5_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GLM5_API_KEY, else no key)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine batch")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step")
    s.add_argument("--max-queue", type=int, default=256, help="requests held beyond the running batch; more get 429")
    s.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    s.add_argument("--max-body-mib", type=float, default=8.0, help="largest request body (413 above)")
    s.add_argument("--drain-timeout", type=float, default=60.0, help="on SIGTERM, seconds to let in-flight "
                   "requests finish before cancelling them")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("chat", help="terminal chat (streaming; reasoning dimmed)")
    _model_args(s)
    _gen_args(s, max_tokens=1024)
    s.add_argument("--system", default=None, help="system message")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("generate", help="complete one prompt and print the result")
    _model_args(s)
    _gen_args(s, max_tokens=256)
    s.add_argument("prompt")
    s.add_argument("--raw", action="store_true", help="complete the text as given (no chat format)")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.set_defaults(fn=cmd_generate)


def _load(args, quiet: bool = False):
    import torch

    from ..loader import load

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model, tokenizer_dir=args.tokenizer, device=args.device)
    if loaded.untrained or not quiet:
        print(loaded.banner(), file=sys.stderr)
    return loaded


def _cache_bytes(args):
    return None if args.cache_mib is None else args.cache_mib * MIB


def cmd_serve(args) -> int:
    import uvicorn

    from .app import create_app
    from .launch import build_engine, uvicorn_config
    from .runs import Limits

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    loaded = _load(args)
    engine = build_engine(loaded.model, loaded.tokenizer, cache_bytes=_cache_bytes(args),
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    limits = Limits(max_body_bytes=int(args.max_body_mib * MIB), max_tokens=args.max_tokens, max_queue=args.max_queue)
    app = create_app(engine, tokenizer=loaded.tokenizer, model_name=args.served_model_name or loaded.name,
                     api_key=args.api_key or None, limits=limits, sampling=loaded.sampling)
    st = engine.stats()
    print(f"glm5 serve: model {args.served_model_name or loaded.name}, context {st['max_model_len']} tokens, KV cache "
          f"{st['cache_bytes'] / MIB:.0f} MiB ({st['blocks_total']} blocks of {st['block_size']}), "
          f"http://{args.host}:{args.port}/v1{'  (API key required)' if args.api_key else ''}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"glm5 serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    server = uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           drain_timeout=args.drain_timeout))
    # uvicorn handles SIGTERM / SIGINT while it runs (stop accepting, drain, shut down), then re-raises the signal
    # under the handlers found at start; these make that re-raise a clean exit (status 0) after the drain.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    server.run()
    return 0


def _backend(args):
    from .client import LocalBackend, RemoteBackend

    if args.url:
        return RemoteBackend(args.url, api_key=args.api_key)
    from .launch import build_engine

    loaded = _load(args, quiet=True)
    return LocalBackend(build_engine(loaded.model, loaded.tokenizer, cache_bytes=_cache_bytes(args)),
                        loaded.tokenizer, loaded.sampling)


def _sampling(args) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def _print_deltas(deltas, out, err) -> tuple[str, str, list]:
    """Stream deltas: reasoning dimmed on `err`, answer on `out`. Returns (reasoning, content, tool calls)."""
    reasoning, content, calls = [], [], []
    opts = {"end": "", "soft_wrap": True, "markup": False, "highlight": False, "emoji": False}
    try:
        _print_loop(deltas, out, err, opts, reasoning, content, calls)
    finally:
        deltas.close()  # an interrupted local generation aborts its request here, freeing its cache at once
    return "".join(reasoning), "".join(content), calls


def _print_loop(deltas, out, err, opts, reasoning, content, calls):
    for d in deltas:
        if d.get("reasoning_content"):
            reasoning.append(d["reasoning_content"])
            err.print(d["reasoning_content"], style="dim", **opts)
        if d.get("content"):
            if reasoning and not content:
                err.print("\n", **opts)
            content.append(d["content"])
            out.print(d["content"], **opts)
        for c in d.get("tool_calls") or ():
            calls.append({k: v for k, v in c.items() if k != "index"})
            f = c.get("function", {})
            out.print(f"\n[tool call] {f.get('name')}({f.get('arguments')})", style="cyan", **opts)


def cmd_generate(args) -> int:
    from rich.console import Console

    from .client import RemoteError

    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        backend = _backend(args)
        if args.raw:
            for text in backend.complete(args.prompt, stop=args.stop, **_sampling(args)):
                out.print(text, end="", soft_wrap=True, markup=False, highlight=False, emoji=False)
        else:
            msgs = [{"role": "user", "content": args.prompt}]
            _print_deltas(backend.chat(msgs, thinking=not args.no_think, **_sampling(args)), out, err)
    except RemoteError as e:
        print(f"glm5 generate: error: {e}", file=sys.stderr)
        return 1
    out.print()
    err.print(f"[{backend.last_finish_reason}, {json.dumps(backend.last_usage)}]", style="dim", markup=False)
    return 0


CHAT_HELP = "/reset clears the conversation, /think on|off toggles reasoning, Ctrl-D (or /exit) quits"


def cmd_chat(args) -> int:
    from rich.console import Console

    from .client import RemoteError

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console = Console(highlight=False)
    try:
        backend = _backend(args)
    except RemoteError as e:
        print(f"glm5 chat: error: {e}", file=sys.stderr)
        return 1
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages, thinking = list(system), not args.no_think
    console.print(CHAT_HELP, style="dim", markup=False, soft_wrap=True)
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd.startswith("/"):
            word, _, arg = cmd.partition(" ")
            if word == "/reset":
                messages = list(system)
                console.print("(conversation cleared)", style="dim", markup=False)
            elif word == "/think" and arg.strip() in ("on", "off"):
                thinking = arg.strip() == "on"
                console.print(f"(thinking {'on' if thinking else 'off'})", style="dim", markup=False)
            elif word in ("/exit", "/quit"):
                return 0
            else:
                console.print(CHAT_HELP, style="dim", markup=False, soft_wrap=True)
            continue
        messages.append({"role": "user", "content": line})
        reasoning = content = ""
        calls: list = []
        try:
            reasoning, content, calls = _print_deltas(
                backend.chat(messages, thinking=thinking, **_sampling(args)), console, console)
        except KeyboardInterrupt:
            console.print("\n(interrupted; that turn is dropped)", style="dim", markup=False)
            messages.pop()
            continue
        except RemoteError as e:
            console.print(f"\nerror: {e}", style="red", markup=False)
            messages.pop()
            continue
        console.print()
        reply = {"role": "assistant", "content": content}
        if reasoning:
            reply["reasoning_content"] = reasoning
        if calls:
            reply["tool_calls"] = calls
        messages.append(reply)


def main(argv: list[str] | None = None) -> int:
    """`python -m glm5.server.cli serve ...`: the glm5 command line (one parser, one error policy)."""
    from ..cli import main as glm5_main

    return glm5_main(argv)


if __name__ == "__main__":
    sys.exit(main())
