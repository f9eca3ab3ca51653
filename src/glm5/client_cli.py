"""`glm5 chat` and `glm5 generate`: the terminal clients. glm5/cli.py calls `add_parser(sub)`.

    glm5 chat [--url http://host:port | --local | --model ...] [--no-think]   # /reset, /think on|off, Ctrl-D exits
    glm5 generate "prompt" [--raw] [--max-tokens N] [--temperature T] [--seed S]

Which model answers, said on stderr at start: the server --url names; else a glm5 server already running at the
default address (http://127.0.0.1:8000, probed for 0.3 s), so a second copy of the model is not loaded; else, or with
--local / --model, the model run in this process. generate writes the answer to stdout and the reasoning (dimmed) to
stderr, so `glm5 generate "..." > out.txt` keeps the answer only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli import add_model_args, cache_bytes_arg, load_model_args


def _gen_args(s: argparse.ArgumentParser, max_tokens: int):
    add_model_args(s)
    s.add_argument("--url", default=None, help="talk to the server at this URL (http://host:port); default: the one "
                   "at http://127.0.0.1:8000 if it runs, else the model is loaded here")
    s.add_argument("--local", action="store_true", help="run the model in this process even if a server runs "
                   "(implied by --model)")
    s.add_argument("--api-key", default=os.environ.get("GLM5_API_KEY"), help="for a server (default: $GLM5_API_KEY)")
    s.add_argument("--max-tokens", type=int, default=max_tokens, help=f"answer budget (default {max_tokens}; cut "
                   "short where the context or the server allows fewer)")
    s.add_argument("--temperature", type=float, default=None,
                   help="default: the model's generation_config.json (the shipped model: 0, greedy), else 1")
    s.add_argument("--top-p", type=float, default=None, help="default: the model's generation_config.json, else 1")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--no-think", action="store_true", help="thinking off (chat format: enable_thinking=false)")


def add_parser(sub) -> None:
    s = sub.add_parser("chat", help="terminal chat (streaming; reasoning dimmed)")
    _gen_args(s, max_tokens=1024)
    s.add_argument("--system", default=None, help="system message")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("generate", help="complete one prompt and print the result")
    _gen_args(s, max_tokens=256)
    s.add_argument("prompt")
    s.add_argument("--raw", action="store_true", help="complete the text as given (no chat format)")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.set_defaults(fn=cmd_generate)


def _backend(args):
    """The server --url names, else one running at the default address, else the model in this process; which one
    is said on stderr."""
    from .client import DEFAULT_URL, LocalBackend, RemoteBackend, find_server

    cmd = f"glm5 {args.cmd}"
    if args.url:
        backend = RemoteBackend(args.url, api_key=args.api_key)
        print(f"{cmd}: using the server at {args.url} (model {backend.model})", file=sys.stderr)
        return backend
    local = args.local or args.model is not None or args.tokenizer is not None
    if not local and find_server(DEFAULT_URL):
        backend = RemoteBackend(DEFAULT_URL, api_key=args.api_key)
        print(f"{cmd}: using the server at {DEFAULT_URL} (model {backend.model}; --local loads the model here "
              f"instead)", file=sys.stderr)
        return backend
    from .server.launch import build_engine

    why = ("--local" if args.local else "--model" if args.model is not None else
           "--tokenizer" if args.tokenizer is not None else f"no server at {DEFAULT_URL}")
    print(f"{cmd}: loading the model in this process ({why}); to share one model between clients, run "
          f"`glm5 serve` and they connect to it (or pass --url http://host:port)", file=sys.stderr)
    loaded = load_model_args(args, quiet=True)
    # One conversation at a time: a cache for one sequence of the full context.
    engine = build_engine(loaded.model, loaded.tokenizer, cache_bytes=cache_bytes_arg(args), max_num_seqs=1)
    return LocalBackend(engine, loaded.tokenizer, loaded.sampling)


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
        for c in d.get("tool_calls") or ():  # a call's first delta has its id and name, later ones more arguments
            f = c.get("function") or {}
            if "id" in c:
                calls.append({"id": c["id"], "type": "function", "function": {"name": f.get("name"), "arguments": ""}})
                out.print(f"\n[tool call] {f.get('name')} ", style="cyan", **opts)
            calls[c["index"]]["function"]["arguments"] += f.get("arguments") or ""
            out.print(f.get("arguments") or "", style="cyan", **opts)


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
