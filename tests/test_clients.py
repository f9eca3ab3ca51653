"""The terminal clients (glm5.client, glm5.client_cli): they find a running server or say they load their own model,
keep their answer budget within what the server allows, and drive a local engine through the engine's one loop
(run_to_completion), as Engine.generate and the eval do."""

from __future__ import annotations

import json
import re
import socket

import pytest
import torch

import glm5
from glm5.config import tiny
from glm5.engine import Engine, RequestError, SamplingParams, run_to_completion
from glm5.server import Limits

from .server_util import TOK, ScriptedEngine, idle, start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = TOK.encode(" la" * 12)


@pytest.fixture
def scripted():
    eng = ScriptedEngine(SCRIPT, max_model_len=4096)
    srv = start(eng)
    yield eng, srv
    srv.stop()


# --------------------------------------------------------------------------------------------- finding a server
def test_find_server(scripted, monkeypatch):
    from glm5.client import find_server

    _, srv = scripted
    assert find_server(srv.url) == {"status": "ok", "model": "tiny"}
    assert find_server(srv.url + "/v1/") is not None
    assert find_server(f"http://127.0.0.1:{_free_port()}") is None
    import inspect
    import urllib.request

    seen = []

    def urlopen(url, timeout):  # a server that never answers: the probe gives up after its own short timeout
        seen.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert find_server(srv.url) is None and seen == [inspect.signature(find_server).parameters["timeout"].default]
    assert seen[0] <= 0.5


def test_generate_uses_the_server_that_runs(scripted, monkeypatch, capsys):
    from glm5.cli import main

    eng, srv = scripted
    monkeypatch.setattr("glm5.client.DEFAULT_URL", srv.url)
    assert main(["generate", "hi", "--raw", "--max-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith(f"glm5 generate: using the server at {srv.url} (model tiny; --local loads the model "
                              "here instead)\n")
    assert len(eng.prompts) == 1 and out.out.strip() == TOK.decode(SCRIPT[:3]).strip()  # from the server


def test_local_flag_and_model_load_in_process(scripted, monkeypatch, capsys):
    from glm5.cli import main

    eng, srv = scripted
    monkeypatch.setattr("glm5.client.DEFAULT_URL", srv.url)
    for flag in (["--local"], []):
        assert main(["generate", "hi", "--model", "tiny", "--max-tokens", "2", *flag]) == 0
        err = capsys.readouterr().err
        why = "--local" if flag else "--model"
        assert err.startswith(f"glm5 generate: loading the model in this process ({why}); to share one model "
                              "between clients, run `glm5 serve`")
    assert eng.prompts == []  # the running server was not asked


class _Loaded(Exception):
    pass


def test_without_a_server_it_says_how_to_connect(monkeypatch, capsys):
    from glm5.cli import main

    def load(*a, **kw):
        raise _Loaded

    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setattr("glm5.client.DEFAULT_URL", url)
    monkeypatch.setattr("glm5.loader.load", load)
    with pytest.raises(_Loaded):
        main(["chat"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"glm5 chat: loading the model in this process (no server at {url}); to share one model between "
                   "clients, run `glm5 serve` and they connect to it (or pass --url http://host:port)")


# ------------------------------------------------------------------------------------------- the answer budget
def test_default_budget_fits_the_servers_limits(monkeypatch, capsys):
    """generate's default budget (256 tokens) is above this server's --max-tokens and context: the answer is cut to
    what the server allows, not refused."""
    from glm5.cli import main

    for limits, ctx, expect in ((Limits(max_tokens=5), 4096, 5), (Limits(), 40, None)):
        eng = ScriptedEngine(TOK.encode(" x" * 300), max_model_len=ctx)
        srv = start(eng, limits=limits)
        try:
            assert main(["generate", "hi", "--raw", "--url", srv.url]) == 0
            out = capsys.readouterr()
            usage = json.loads(re.search(r"\[length, (\{.*\})\]", out.err).group(1))
            assert usage["completion_tokens"] == (expect if expect is not None else ctx - len(eng.prompts[-1]))
            assert main(["generate", "hi", "--raw", "--url", srv.url, "--max-tokens", "3"]) == 0
            assert '"completion_tokens": 3' in capsys.readouterr().err  # a budget that fits is kept
        finally:
            srv.stop()


def test_local_budget_fits_the_context():
    from glm5.client import LocalBackend

    model = glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size, max_position_embeddings=16))
    eng = Engine(model, max_num_seqs=1, eos_token_ids=[], detokenize=TOK.decode)
    backend = LocalBackend(eng, TOK, {"temperature": 0.0})
    "".join(backend.complete("hello there", max_tokens=1000))
    assert backend.last_finish_reason == "length"
    assert backend.last_usage["prompt_tokens"] + backend.last_usage["completion_tokens"] == 16


# ---------------------------------------------------------------------------------------- one loop for the engine
def _model():
    return glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size))


def test_interrupted_local_chat_frees_the_engine():
    from glm5.client import LocalBackend

    eng = Engine(_model(), num_blocks=64, block_size=4, eos_token_ids=[], detokenize=TOK.decode)
    backend = LocalBackend(eng, TOK, {"temperature": 0.0})
    deltas = backend.chat([{"role": "user", "content": "hi"}], max_tokens=200)
    next(deltas)
    assert not idle(eng)
    deltas.close()  # Ctrl-C in `glm5 chat`
    assert idle(eng) and not eng.has_unfinished()
    assert eng.stats()["aborted_requests"] == 1
    (g,), = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))  # usable at once
    assert len(g.token_ids) == 3


def test_run_to_completion_is_what_generate_and_the_eval_use():
    from glm5.eval.run import _generate

    model = _model()
    prompts = [[5, 6, 7, 8], [9, 10], list(range(20, 38))]
    greedy = SamplingParams(temperature=0, max_tokens=5)
    ref = [c[0].token_ids for c in Engine(model, num_blocks=64, block_size=4, eos_token_ids=[]).generate(
        prompts, greedy)]
    eng = Engine(model, num_blocks=64, block_size=4, eos_token_ids=[])
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i, o in run_to_completion(eng, prompts, greedy):
        streamed[i] += o.new_token_ids
    assert [streamed[i] for i in range(3)] == ref
    outs = _generate(eng, prompts, 5, hidden=True)
    assert [o[0] for o in outs] == ref and all(o[1] == "length" for o in outs)
    # hidden states of every token fed: the prompt and all outputs but the last, as a full forward computes them
    for p, (ids, _, h, _) in zip(prompts, outs):
        assert h.shape == (len(p) + len(ids) - 1, model.config.hidden_size)
        full = model.hidden(torch.tensor([p + ids[:-1]]), torch.arange(len(p) + len(ids) - 1)[None])[0]
        torch.testing.assert_close(h, full.float(), rtol=1e-4, atol=1e-4)


def test_a_refused_prompt_runs_nothing():
    eng = Engine(_model(), num_blocks=64, block_size=4)
    bad = [1, 2, TOK.vocab_size + 5]
    with pytest.raises(RequestError, match="not a token id"):
        list(run_to_completion(eng, [[5, 6, 7], bad], SamplingParams(temperature=0, max_tokens=4)))
    assert not eng.has_unfinished() and eng.blocks.num_used == 0


def test_serving_classes_have_distinct_names():
    """One name, one class, across the serving side (engine, server, clients, eval)."""
    import importlib
    import inspect
    import pkgutil

    seen: dict[str, str] = {}
    mods = ["glm5.client", "glm5.client_cli"]
    for pkg in ("glm5.engine", "glm5.server", "glm5.eval"):
        mods += [pkg] + [m.name for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__, pkg + ".")]
    clashes = []
    for name in mods:
        mod = importlib.import_module(name)
        for cname, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != name:
                continue
            if cname in seen and seen[cname] != name:
                clashes.append(f"{cname}: {seen[cname]} and {name}")
            seen[cname] = name
    assert not clashes, clashes
    assert "Generation" in seen and seen["Completion"] == "glm5.server.protocol"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("glm5.server.client")  # the terminal clients live beside the server
