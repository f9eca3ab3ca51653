"""What a new user meets first: the KV cache sized to the model and the machine, the context /v1/models advertises
equal to what the server accepts, start-up failures as one early line, and strict request types."""

from __future__ import annotations

import argparse
import json
import socket

import httpx
import pytest
import torch

import glm5
from glm5.config import tiny
from glm5.engine import Engine, SamplingParams
from glm5.engine import kv_cache
from .server_util import TOK, ScriptedEngine, start, tiny_engine

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def _tiny_model(max_position_embeddings=64):
    return glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size, max_position_embeddings=max_position_embeddings))


def _token_bytes(cfg) -> int:
    """Bytes one token takes in the cache, counted from the config: a latent row [C | R] per layer, an index key
    per layer with its own indexer, fp32."""
    full = sum(t == "full" for t in cfg.indexer_types)
    return 4 * (cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + full * cfg.index_head_dim)


# ------------------------------------------------------------------------------------------------ KV cache size
def test_default_cache_holds_every_admitted_sequence_at_full_context():
    model = _tiny_model(max_position_embeddings=40)
    eng = Engine(model, max_num_seqs=3, block_size=16)
    per_seq_blocks = 3  # ceil(40 / 16)
    assert eng.blocks.num_blocks == 3 * per_seq_blocks
    assert eng.cache.nbytes == 3 * per_seq_blocks * 16 * _token_bytes(model.config)
    assert eng.max_model_len == 40
    assert "3 sequences x 40 tokens" in eng.cache_sizing
    assert Engine(model, cache_bytes=1 << 20).cache.nbytes <= 1 << 20  # an explicit size still wins


def test_default_cache_is_capped_by_free_memory(monkeypatch):
    model = _tiny_model(max_position_embeddings=4096)
    per_block = 16 * _token_bytes(model.config)
    monkeypatch.setattr(kv_cache, "free_memory", lambda device: 40 * per_block)
    eng = Engine(model, max_num_seqs=8, block_size=16)
    assert eng.blocks.num_blocks == int(kv_cache.MEMORY_SHARE["cpu"] * 40)  # 50% of 40 blocks' worth
    assert eng.max_model_len == 20 * 16  # the context shrinks to what the cache holds, and says so
    assert "50% of the" in eng.cache_sizing and "MiB free" in eng.cache_sizing


def test_free_memory_reads_the_machine():
    free = kv_cache.free_memory(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert free is not None and 0.5 * avail < free < 2 * avail


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_cache_memory_is_resident_only_as_blocks_fill():
    """The cache is reserved, not written: a 512 MiB cache adds far less than 512 MiB of resident memory until its
    blocks are used (torch.zeros would write every page)."""
    model = _tiny_model()
    before = _rss()
    eng = Engine(model, cache_bytes=512 << 20, block_size=16)
    grown = _rss() - before
    assert eng.cache.nbytes > 500 << 20
    assert grown < 64 << 20, f"resident memory grew by {grown >> 20} MiB for an unused cache"
    (g,), = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))  # the zeros are real zeros
    assert len(g.token_ids) == 4 and float(eng.cache.lat[:, 100:200].abs().sum()) == 0.0


def test_startup_lines_name_context_and_cache():
    from glm5.server.cli import startup_lines

    eng = Engine(_tiny_model(max_position_embeddings=48), max_num_seqs=2)
    lines = startup_lines(eng, "tiny", "127.0.0.1", 8000, False)
    assert lines[0] == "model tiny (float32; --dtype), context 48 tokens, up to 2 sequences at once"
    assert lines[1].startswith("KV cache 0 MiB (2 sequences x 48 tokens x") and "--cache-mib" in lines[1]
    assert lines[2].startswith("torch threads: ") and "--small-step-threads" in lines[2]
    assert lines[3] == "http://127.0.0.1:8000/v1"


def test_dtype_flag_loads_the_model_in_that_dtype_and_auto_keeps_fp32_on_a_cpu():
    """--dtype (serve, chat, generate): auto is float32 on a CPU; bfloat16 loads bf16 weights, which decode."""
    from glm5.cli import add_model_args, load_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    auto = load_model_args(p.parse_args(["--model", "tiny"]), quiet=True)
    assert auto.model.lm_head.weight.dtype == torch.float32
    bf16 = load_model_args(p.parse_args(["--model", "tiny", "--dtype", "bfloat16"]), quiet=True)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    (g,), = Engine(bf16.model, cache_bytes=4 << 20).generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
    assert len(g.token_ids) == 3
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "float16"])


def test_models_advertises_the_context_the_server_accepts():
    eng = tiny_engine(max_position_embeddings=48)
    srv = start(eng)
    try:
        (card,) = httpx.get(srv.url + "/v1/models").json()["data"]
        ctx = card["max_model_len"]
        assert ctx == eng.max_model_len == 48
        prompt = [5, 6, 7, 8]
        body = {"prompt": prompt, "temperature": 0, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=dict(body, max_tokens=ctx - len(prompt)), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == ctx - len(prompt)
        r = httpx.post(srv.url + "/v1/completions", json=dict(body, max_tokens=ctx - len(prompt) + 1))
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert f"maximum context length is {ctx} tokens" in err["message"]
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------- start-up errors
def test_port_out_of_range_is_an_argparse_error(capsys):
    from glm5.cli import main, port_number

    assert port_number("0") == 0 and port_number("65535") == 65535
    for bad in ("99999", "-1", "eighty"):
        with pytest.raises(argparse.ArgumentTypeError):
            port_number(bad)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "99999"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --port: 99999 is not a port number (0 to 65535)" in err and "Traceback" not in err


def test_busy_port_fails_before_the_model_loads(capsys, monkeypatch):
    from glm5.cli import main

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr("glm5.loader.load", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == (f"glm5 serve: error: port {port} is in use on 127.0.0.1 (another glm5 serve? stop it, or pass "
                   f"--port N; --port 0 takes any free port)\n")


def test_serve_without_config_json_says_so_in_one_line(tmp_path, capsys):
    from glm5.cli import main

    d = tmp_path / "my model"
    d.mkdir()
    assert main(["serve", "--model", str(d), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"glm5 serve: error: {d}: no config.json, so not a checkpoint directory\n"  # a path, not a repr
    assert main(["serve", "--model", "tiny", "--tokenizer", str(d), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"glm5 serve: error: {d}: no tokenizer.json") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["serve", "--cache-mib", "0"])
    assert "argument --cache-mib: '0' is not a positive integer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- strict request types
@pytest.fixture(scope="module")
def scripted():
    srv = start(ScriptedEngine([100, 101, 102]))
    yield srv
    srv.stop()


@pytest.mark.parametrize("path, field, value, expect", [
    (CHAT, "stream", "yes", 'stream: expected true or false, got "yes"'),
    (CHAT, "max_tokens", True, "max_tokens: expected an integer, got true"),
    (CHAT, "n", 1.5, "n: expected an integer, got 1.5"),
    (CHAT, "top_k", "5", 'top_k: expected an integer, got "5"'),
    (CHAT, "seed", True, "seed: expected an integer, got true"),
    (CHAT, "logprobs", 1, "logprobs: expected true or false, got 1"),
    (CHAT, "top_logprobs", False, "top_logprobs: expected an integer, got false"),
    (CHAT, "temperature", "0.5", 'temperature: expected a number, got "0.5"'),
    ("/v1/completions", "logprobs", True, "logprobs: expected an integer, got true"),
    ("/v1/completions", "echo", "no", 'echo: expected true or false, got "no"'),
])
def test_wrong_types_are_400s(scripted, path, field, value, expect):
    body = {"messages": USER} if path == CHAT else {"prompt": "hi"}
    r = httpx.post(scripted.url + path, json={**body, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] == expect and err["param"] == field and err["type"] == "invalid_request_error"


def test_nan_and_infinity_are_refused_by_name(scripted):
    for literal, shown in (("NaN", "NaN"), ("1e999", "Infinity"), ("-Infinity", "-Infinity")):
        raw = '{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % literal
        r = httpx.post(scripted.url + CHAT, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == f"temperature: NaN and infinity are not allowed, got {shown}"


def test_right_types_still_pass(scripted):
    """An integer where a number is expected is fine (OpenAI takes "temperature": 1)."""
    r = httpx.post(scripted.url + CHAT, json={"messages": USER, "temperature": 1, "top_p": 1, "max_tokens": 2,
                                              "stream": False, "n": 1, "seed": 3})
    assert r.status_code == 200, r.text
    assert json.loads(r.text)["usage"]["completion_tokens"] == 2
