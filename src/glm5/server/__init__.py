"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) and the `glm5 serve` command (its terminal clients,
`glm5 chat` / `glm5 generate`, are glm5.client and glm5.client_cli).

    from glm5.server import create_app, BackgroundServer
    with BackgroundServer(create_app("tiny")) as srv:   # uvicorn on a free 127.0.0.1 port, in a thread
        ...  # openai.OpenAI(base_url=srv.url + "/v1", api_key="x")

Layers, each knowing only the one below: app.py (routes, errors, limits) → serving.py (chat / completions, chat format, SSE) →
runs.py (admission, sampling params, abort on exit) → worker.py (the engine thread) → glm5.engine.
"""

from .app import create_app
from .launch import BackgroundServer, build_engine
from .runs import Limits

__all__ = ["BackgroundServer", "Limits", "build_engine", "create_app"]
