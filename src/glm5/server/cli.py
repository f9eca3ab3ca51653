"""`glm5 serve`: the OpenAI-compatible server. glm5/cli.py calls `add_parser(sub)`; `python -m glm5.server.cli
serve ...` runs the glm5 command line (the terminal clients, `glm5 chat` / `glm5 generate`, are glm5/client_cli.py).

    glm5 serve [--model DIR|preset] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--cache-mib N]

Start-up checks what can fail fast before the model loads: the port is bound first (a busy one is a one-line
error), then the model is loaded, and the bound socket is handed to uvicorn.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys

from ..cli import MIB, add_model_args, cache_bytes_arg, load_model_args, port_number


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0: any free port)")
    s.add_argument("--api-key", default=os.environ.get("GLM5_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GLM5_API_KEY, else no key)")
    s.add_argument("--metrics-require-key", action="store_true",
                   help="require the --api-key on /metrics too (default: /metrics is open, as vLLM's is, so a "
                   "scraper without the key keeps working; /health stays open either way)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine batch (the KV cache is sized "
                   "for this many at full context)")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step")
    s.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="MTP speculative decoding: draft tokens the model's MTP layer proposes and one forward "
                   "verifies per step, 0 to 15 (default 0: off). Output is as without it (greedy: the same tokens)")
    s.add_argument("--small-step-threads", type=int, default=None, metavar="N",
                   help="torch threads for steps of little work (decodes of a few sequences; default 1: on the CPUs "
                   "measured a second thread only slowed them). Larger steps use --threads")
    s.add_argument("--max-queue", type=int, default=256, help="sequences (prompts x n) held beyond the running batch; "
                   "more get 429")
    s.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    s.add_argument("--max-body-mib", type=float, default=8.0, help="largest request body (413 above)")
    s.add_argument("--drain-timeout", type=float, default=60.0, help="on SIGTERM, seconds to let in-flight "
                   "requests finish; those still running then end with a 503 server_shutting_down error (streams: "
                   "an error event and [DONE])")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(fn=cmd_serve)


class PortError(OSError):
    pass


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening; uvicorn listens on it), or PortError in one sentence."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortError(f"port {port} is in use on {host} (another glm5 serve? stop it, or pass --port N; "
                            f"--port 0 takes any free port)") from None
        raise PortError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def cmd_serve(args) -> int:
    try:
        sock = bind(args.host, args.port)
    except PortError as e:
        print(f"glm5 serve: error: {e}", file=sys.stderr)
        return 2
    with sock:
        return _serve(args, sock)


def _serve(args, sock: socket.socket) -> int:
    import uvicorn

    from .app import create_app
    from .launch import build_engine, uvicorn_config
    from .runs import Limits

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    loaded = load_model_args(args)
    try:
        engine = build_engine(loaded.model, loaded.tokenizer, cache_bytes=cache_bytes_arg(args),
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              speculative_tokens=args.speculative_tokens, small_step_threads=args.small_step_threads)
    except ValueError as e:  # e.g. --speculative-tokens for a model without its MTP layer
        print(f"glm5 serve: error: {e}", file=sys.stderr)
        return 2
    limits = Limits(max_body_bytes=int(args.max_body_mib * MIB), max_tokens=args.max_tokens, max_queue=args.max_queue)
    name = args.served_model_name or loaded.name
    app = create_app(engine, tokenizer=loaded.tokenizer, model_name=name, api_key=args.api_key or None,
                     limits=limits, sampling=loaded.sampling, metrics_require_key=args.metrics_require_key)
    for line in startup_lines(engine, name, args.host, sock.getsockname()[1], bool(args.api_key)):
        print(f"glm5 serve: {line}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"glm5 serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    server = uvicorn.Server(uvicorn_config(app, host=args.host, port=sock.getsockname()[1], log_level=args.log_level,
                                           drain_timeout=args.drain_timeout))
    # uvicorn handles SIGTERM / SIGINT while it runs (stop accepting, drain, shut down), then re-raises the signal
    # under the handlers found at start; these make that re-raise a clean exit (status 0) after the drain.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    server.run(sockets=[sock])
    return 0


def startup_lines(engine, name: str, host: str, port: int, api_key: bool) -> list[str]:
    """What serve says before it takes requests: the context it accepts, the KV cache and why that size, where."""
    st, cfg = engine.stats(), engine.config
    ctx = f"context {st['max_model_len']} tokens"
    if st["max_model_len"] < cfg.max_position_embeddings:
        ctx += f" (all the KV cache holds; the model's is {cfg.max_position_embeddings})"
    spec = f", up to {st['speculative_tokens']} MTP draft tokens a step" if st.get("speculative_tokens") else ""
    dtype = str(engine.model.lm_head.weight.dtype).removeprefix("torch.")
    return [f"model {name} ({dtype}; --dtype), {ctx}, up to {engine.scheduler.max_num_seqs} sequences at once{spec}",
            f"KV cache {st['cache_bytes'] / MIB:.0f} MiB ({engine.cache_sizing}; --cache-mib sets it)"
            + (", memory taken as it fills" if engine.device.type == "cpu" else ""),
            *([threads_line(engine.threads)] if engine.device.type == "cpu" else []),
            f"http://{host}:{port}/v1{'  (API key required)' if api_key else ''}"]


def threads_line(t) -> str:
    """The engine's per-step thread counts (engine/threads.py), as serve says them."""
    return (f"torch threads: {t.threads} for steps of {t.all_from}+ tokens, {t.small} below (decodes of a few "
            f"sequences; --threads, --small-step-threads)")


def main(argv: list[str] | None = None) -> int:
    """`python -m glm5.server.cli serve ...`: the glm5 command line (one parser, one error policy)."""
    from ..cli import main as glm5_main

    return glm5_main(argv)


if __name__ == "__main__":
    sys.exit(main())
