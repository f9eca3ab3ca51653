"""Which model to serve, the engine around it, and running uvicorn (in the foreground, or in a thread for tests
and benchmarks).

Default model (no --model): the model shipped inside the package (glm5/assets/model/, produced by the training
work) when it exists; until then the `small` preset with random weights and the shipped tokenizer's vocabulary, with
a banner saying that it is untrained.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS, ConfigError
from ..tokenizer import Tokenizer

log = logging.getLogger("glm5.server")

ASSET_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"


@dataclass
class Loaded:
    model: object
    tokenizer: Tokenizer
    name: str
    untrained: bool
    source: str
    # sampling defaults the checkpoint recommends (generation_config.json); requests and flags override them
    sampling: dict = field(default_factory=dict)

    def banner(self) -> str:
        if not self.untrained:
            return f"glm5: serving {self.name} from {self.source}"
        line = "=" * 78
        return (f"{line}\n  UNTRAINED MODEL: {self.source} with random weights. Its output is noise.\n"
                f"  It exercises the engine, server and chat format end to end; for real answers pass\n"
                f"  --model DIR (a trained checkpoint with tokenizer.json).\n{line}")


def load_for_serving(spec: str | Path | None = None, *, tokenizer_dir: str | Path | None = None, device="cpu",
                     dtype=None, seed: int = 0) -> Loaded:
    """spec: None (the default model), a preset (tiny, small: random weights, vocabulary resized to the tokenizer),
    or a checkpoint directory (its tokenizer.json, or tokenizer_dir)."""
    from ..api import load_model

    if spec is None:
        if (ASSET_MODEL_DIR / "config.json").is_file():
            spec = ASSET_MODEL_DIR
        else:
            spec = "small"
    if isinstance(spec, str) and spec in PRESETS:
        if spec == "glm5":
            raise ConfigError("preset 'glm5' is the full 744B-parameter model: random weights of that size cannot be "
                              "served here; pass a checkpoint directory (--model DIR) or a small preset (tiny, small)")
        tok = Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir else Tokenizer.default()
        cfg = PRESETS[spec]().replace(vocab_size=tok.vocab_size)
        model = load_model(cfg, dtype=dtype, device=device, seed=seed)
        return Loaded(model, tok, f"glm5-{spec}-untrained", True, f"the '{spec}' preset")
    p = Path(spec)
    if not p.is_dir():
        raise ConfigError(f"--model {spec!r}: neither a preset ({', '.join(k for k in PRESETS if k != 'glm5')}) "
                          f"nor a checkpoint directory")
    tdir = Path(tokenizer_dir) if tokenizer_dir else p
    if not (tdir / "tokenizer.json").is_file():
        if p.resolve() == ASSET_MODEL_DIR and tokenizer_dir is None:
            tdir = None  # the shipped model uses the shipped tokenizer
        else:
            raise ConfigError(f"{tdir}: no tokenizer.json; pass --tokenizer DIR")
    tok = Tokenizer.from_dir(tdir) if tdir is not None else Tokenizer.default()
    model = load_model(p, dtype=dtype, device=device)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}: they do not belong together")
    name = "glm5" if p.resolve() == ASSET_MODEL_DIR else p.resolve().name
    return Loaded(model, tok, name, False, str(p), sampling_defaults(p))


SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int}
OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # what applies where neither request nor model says


def with_openai_defaults(sampling: dict | None) -> dict:
    """A checkpoint's sampling defaults (`sampling_defaults`) completed with OpenAI's for the keys it leaves out."""
    return {**OPENAI_SAMPLING, **(sampling or {})}


def sampling_defaults(model_dir: str | Path) -> dict:
    """The sampling a checkpoint recommends, from its generation_config.json (the file transformers and vLLM read):
    temperature / top_p / top_k where given, and `do_sample: false` as greedy (temperature 0). glm5 applies them
    where a request or a flag leaves a value unset, as vLLM does; without the file, OpenAI's defaults (temperature
    1, top_p 1). The shipped model is evaluated greedily and ships `do_sample: false`."""
    p = Path(model_dir) / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a JSON object, got {type(cfg).__name__}")
    out = {}
    for key, kind in SAMPLING_KEYS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (kind is int and v != int(v)):
            raise ConfigError(f"{p}: {key} must be a non-negative {kind.__name__}, got {v!r}")
        out[key] = kind(v)
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def build_engine(model, tok: Tokenizer, *, cache_bytes: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, seed: int = 0):
    """The engine as the server runs it: stops on the tokenizer's turn-end tokens, and can match stop strings."""
    from ..engine import Engine

    return Engine(model, cache_bytes=cache_bytes, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=max_num_batched_tokens, eos_token_ids=tok.eos_ids, detokenize=tok.decode,
                  seed=seed)


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   drain_timeout: float | None = 60.0):
    import uvicorn

    # timeout_graceful_shutdown: how long SIGTERM waits for in-flight requests before cancelling them.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                          access_log=log_level == "debug", lifespan="on")


class BackgroundServer:
    """uvicorn on a free 127.0.0.1 port in a daemon thread (tests, benchmarks, `glm5 chat` in-process)."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=self.port, log_level=log_level,
                                                    drain_timeout=5.0))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="glm5-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0):
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
