"""The engine as the server runs it, and uvicorn (in the foreground, or in a thread for tests and benchmarks).
Which model is served is glm5.loader's business."""

from __future__ import annotations

import logging
import socket
import threading
import time

from ..tokenizer import Tokenizer

log = logging.getLogger("glm5.server")


def build_engine(model, tok: Tokenizer, *, cache_bytes: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, seed: int = 0, speculative_tokens: int = 0,
                 small_step_threads: int | None = None):
    """The engine as the server runs it: stops on the tokenizer's turn-end tokens, can match stop strings, and never
    takes or samples an id the tokenizer lacks (a checkpoint may pad its vocabulary past the tokenizer's)."""
    from ..engine import Engine

    return Engine(model, cache_bytes=cache_bytes, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=max_num_batched_tokens, eos_token_ids=tok.eos_ids, detokenize=tok.decode,
                  seed=seed, vocab_limit=len(tok), speculative_tokens=speculative_tokens,
                  small_step_threads=small_step_threads)


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   drain_timeout: float | None = 60.0):
    import uvicorn

    # timeout_graceful_shutdown: how long SIGTERM waits for in-flight requests before cancelling them.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                          access_log=log_level == "debug", lifespan="on")


class BackgroundServer:
    """uvicorn on a free 127.0.0.1 port in a daemon thread (tests, benchmarks, `glm5 chat` in-process)."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout: float = 5.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=self.port, log_level=log_level,
                                                    drain_timeout=drain_timeout))
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
        """What SIGTERM does to `glm5 serve`: stop accepting, drain for up to drain_timeout, shut down."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
