"""`glm5 serve` vs llama.cpp's `llama-server` on the same random `small` GLM-5 checkpoint, side by side on the CPU.

    .venv/bin/python bench/llamacpp.py                       # decode at 512 and 4096, prefill at 512 and 4096
    .venv/bin/python bench/llamacpp.py --long --threads 1    # decode at 32768 too, one thread each
    .venv/bin/python bench/llamacpp.py --quick               # 512 only, one repeat: a sanity run
    .venv/bin/python bench/llamacpp.py --llama-cpp DIR       # a llama.cpp tree with build/bin/llama-server

llama.cpp: without --llama-cpp the script builds it once into --cache-dir: `pip download --no-binary :all:
--no-deps llama-cpp-python==VERSION` (the sdist vendors a llama.cpp tree), extract vendor/llama.cpp, then
`cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF` and build the `llama-server`
target only (about 15 minutes on 2 cores). Later runs find the binary and skip all of it.

Checkpoint: glm5 builds the seeded random `small` preset in fp32 (max_position_embeddings raised to fit the longest
context) and saves it in Hugging Face layout (`glm5.save_checkpoint`). llama.cpp's own converter,
convert_hf_to_gguf.py (class GlmMoeDsaModel, arch "glm-dsa"), turns it into a GGUF in f32 (--outtype bf16 stores the
llama.cpp weights in bf16 instead; glm5 serve computes in fp32 on a CPU either way, and this AVX2-class CPU has no
native bf16, so f32 is the like-for-like run). The MTP layer is left out of the GGUF (--no-mtp): neither server
drafts with it here.

Tokenizer: the checkpoint gets glm5's shipped byte-level BPE tokenizer.json (4,096 entries), its vocabulary padded
with plain vocabulary entries `<|padN|>` for ids 4096..32767, entries no merge produces, so encoding text is
unchanged. Without the padding the two servers would not compute the same function: glm5 serve samples only ids its
tokenizer has (the preset's lm_head has 32,768 rows) while llama.cpp samples every row. The converter identifies a
BPE pre-tokenizer by hashing the tokens of a test string and refuses hashes it does not know; this tokenizer's split
regex is character for character the one llama.cpp's "qwen2" pre-tokenizer implements (checked here before
converting), so the converter runs through a shim that answers "qwen2" for it instead of editing llama.cpp. Both
servers get token-id prompts, so text tokenization plays no part in the timings.

Same function: greedy (temperature 0) tokens from both servers on the same token-id prompts, compared token by token
(llama-server reports token ids in its logprobs; glm5 serve reports token strings, matched through the same
tokenizer), with the two servers' logprobs of the tokens they agree on. One prompt is short enough that every key
stays in the indexer's top-k for every checked token (dense attention: the rest of the model alone), the others are
the decode contexts, where the DSA selection decides which keys each token attends to. There the two differ in one
detail: a key whose every indexer head is ReLU-clipped scores exactly 0, and such ties at the top-k boundary are
broken by position in glm5 (earliest first, so the choice depends on the scores alone) but by memory layout in
ggml_top_k (and in torch.topk, which transformers uses). With random weights that happens in a fraction of a percent
of (layer, query) rows, enough to move logprobs by ~1e-3; dense, the two agree to ~1e-5. End tokens are masked on
both sides so each generates exactly the tokens asked for: llama-server's `ignore_eos` sets its end-of-generation
logits to -inf; glm5's `min_tokens` does the same for its eos ids (the same ids: <|endoftext|>, <|user|>,
<|observation|>). With random weights the logits are nearly flat, so a small difference can flip an argmax; at the
first difference each side's lead over its runner-up is printed, so a near-tie shows as one.

How llama.cpp runs DSA (src/models/glm-dsa.cpp; build_attn with top_k in src/llama-graph.cpp; ggml-cpu's flash
attention): the lightning indexer scores every cached key (its fused GGML_OP_LIGHTNING_INDEXER), ggml_top_k picks
index_topk of them, and attention then runs over the whole cache through a -inf mask built from those indices.
Without flash attention it multiplies and softmaxes every cached key (a sparse result at dense cost); with it, the CPU
kernel skips masked keys one at a time at decode, but at prefill its tiled kernel skips only key tiles masked for
every query of the tile, which scattered top-k choices rarely are. Either way the mask is built over the whole cache.

llama.cpp's flash attention is off by default here: with it, llama.cpp casts an f32 KV cache to f16 before
attending (build_attn_mha), every step, so its logprobs drift from fp32 by up to ~1e-2 within a few decode tokens;
without it they stay within ~1e-5 of glm5's. Its own defaults (--kv-type f16 --flash-attn auto) are one flag away.

Timing: both servers run at once, each with --threads N (llama-server: -t N -tb N, one slot, KV cache in f32 and
flash attention off unless --kv-type / --flash-attn say otherwise; glm5 serve: --threads N --max-num-seqs 1), and the
requests alternate between them, never overlapping, so slow drifts in the machine's load hit both alike. Every request
is a streamed /v1/completions with a token-id prompt, timed by this client from the bytes as they arrive:
  - decode tokens/s at context C: a C-token prompt, --gen tokens; (tokens - 1) / (time of the last token - time of
    the first), i.e. time per output token after the first, prefill excluded. A warm-up request first puts the
    prompt in each server's prefix cache, so repeats do not pay the prefill again. llama-server's own
    `timings.predicted_per_second` (the same quantity, measured inside the server) is printed beside it.
  - prefill tokens/s at P: a fresh P-token prompt per repeat (no prefix-cache hit on either side), one output token;
    P / time to the first token. llama-server's own `timings.prompt_per_second` is printed beside it.
Each number is the median of --repeats. The machine may be shared: for each request the script counts the CPU time
the machine spent outside the two servers and itself (/proc) and reports it as cores other processes kept busy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from machine import (busy_cores, busy_cpu_s, cpu_name, free_port, start_server, tree_cpu_s,  # bench/machine.py
                     wait_healthy, wait_quiet)

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp tree is built
# The split regex of glm5's tokenizer.json, which llama.cpp implements as its "qwen2" pre-tokenizer
# (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2, whose comment quotes this exact string).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
FORMAT_IDS = 17  # glm5's format tokens are ids 0..16; prompts draw from the rest
# Runs llama.cpp's converter with get_vocab_base_pre answering "qwen2" (argv: tree, converter arguments...).
CONVERT_SHIM = """
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# -- llama.cpp: find or build ---------------------------------------------------------------------------------------
def server_binary(tree: Path) -> Path:
    return tree / "build" / "bin" / "llama-server"


def build_llama_cpp(cache: Path, version: str) -> Path:
    """The vendored llama.cpp tree of llama-cpp-python==version under cache, with llama-server built."""
    tree = cache / f"llama.cpp-{version}"
    if server_binary(tree).exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        print(f"downloading the llama-cpp-python {version} sdist into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
    if not (tree / "CMakeLists.txt").exists():
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tempfile.TemporaryDirectory(dir=cache) as tmp, tarfile.open(sdist) as tar:
            tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
            shutil.rmtree(tree, ignore_errors=True)
            shutil.move(Path(tmp) / prefix, tree)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama-server in {tree}/build (log: {log}); about 15 minutes on 2 cores", flush=True)
    with open(log, "w") as f:
        for cmd in (["cmake", "-S", str(tree), "-B", str(tree / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                     "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"],
                    ["cmake", "--build", str(tree / "build"), "--target", "llama-server", "-j", str(os.cpu_count())]):
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"llama.cpp build failed: {' '.join(cmd)} (see {log})")
    return tree


def llama_version(exe: Path) -> str:
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(("version", "built with"))]
    return "; ".join(lines) or "unknown"


# -- the checkpoint --------------------------------------------------------------------------------------------------
def make_checkpoint(out: Path, max_positions: int, seed: int):
    """The seeded random `small` model (fp32) in HF layout, with glm5's tokenizer padded to the model's vocabulary."""
    import torch

    import glm5
    from glm5.config import resolve_config
    from glm5.tokenizer import DEFAULT_TOKENIZER_DIR

    cfg = resolve_config("small")
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, max_positions))
    model = glm5.load_model(cfg, dtype=torch.float32, seed=seed)
    glm5.save_checkpoint(model, out)
    spec = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_text())
    split = spec["pre_tokenizer"]["pretokenizers"][0]
    if split["pattern"]["Regex"] != QWEN2_SPLIT:
        sys.exit(f"{DEFAULT_TOKENIZER_DIR}/tokenizer.json: the split regex {split['pattern']['Regex']!r} is not the "
                 f"one llama.cpp's 'qwen2' pre-tokenizer implements ({QWEN2_SPLIT!r}); pick the matching "
                 "pre-tokenizer name in CONVERT_SHIM")
    vocab = spec["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}
    for i in range(cfg.vocab_size):
        if i not in used:
            vocab[f"<|pad{i}|>"] = i
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    shutil.copy(DEFAULT_TOKENIZER_DIR / "tokenizer_config.json", out / "tokenizer_config.json")
    return cfg


def convert(tree: Path, ckpt: Path, outtype: str, gguf: Path, log: Path):
    cmd = [sys.executable, "-c", CONVERT_SHIM, str(tree), str(ckpt), "--outtype", outtype, "--outfile", str(gguf),
           "--no-mtp"]
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"convert_hf_to_gguf.py failed (see {log})")


# -- the servers -----------------------------------------------------------------------------------------------------
def llama_args(gguf: Path, args, n_ctx: int) -> list[str]:
    # -b / -ub stay at llama.cpp's defaults (2048 / 512), as glm5 serve keeps its --max-num-batched-tokens 2048.
    return ["-m", str(gguf), "-t", str(args.threads), "-tb", str(args.threads), "-c", str(n_ctx), "-np", "1",
            "-ctk", args.kv_type, "-ctv", args.kv_type, "-fa", args.flash_attn]


def start_llama(exe: Path, port: int, llama_argv: list[str], log) -> subprocess.Popen:
    """llama-server in a subprocess writing to the file log; returns once /health answers 200."""
    proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(port), *llama_argv],
                            stdout=log, stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, log, "llama-server")


class Side:
    """One server and how a request to it asks for exactly n output tokens with the end tokens masked."""

    def __init__(self, name: str, url: str):
        self.name, self.url = name, url

    def body(self, ids: list[int], n: int, **kw) -> dict:
        b = {"prompt": ids, "max_tokens": n, "temperature": 0.0, **kw}
        if self.name == "glm5":
            b["min_tokens"] = n  # eos ids get -inf until n tokens exist (vLLM semantics)
        else:
            b["ignore_eos"] = True  # llama-server: end-of-generation logits get -inf
        return b


def stream(client: httpx.Client, side: Side, ids: list[int], n: int) -> dict:
    """One streamed completion, timed here: first token, last token, prompt and output token counts, and the cores
    that processes other than the two servers and this client kept busy meanwhile."""
    body = side.body(ids, n, stream=True, stream_options={"include_usage": True})
    busy0, ours0 = busy_cpu_s(), tree_cpu_s(os.getpid())  # this client and both servers, its children
    t0 = time.perf_counter()
    first = last = None
    usage = timings = None
    with client.stream("POST", side.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{side.name}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(f"{side.name}: {ev['error']}")
            if any(ch.get("text") or ch.get("finish_reason") for ch in ev.get("choices") or ()):
                first = first if first is not None else now
                last = now
            usage, timings = ev.get("usage") or usage, ev.get("timings") or timings
    wall = time.perf_counter() - t0
    others = (busy_cpu_s() - busy0 - (tree_cpu_s(os.getpid()) - ours0)) / wall
    out = {"ttft": first - t0, "decode_s": last - first, "wall": wall, "timings": timings or {},
           "prompt_tokens": (usage or {}).get("prompt_tokens"), "tokens": (usage or {}).get("completion_tokens"),
           "others": max(0.0, others)}
    if out["prompt_tokens"] != len(ids) or out["tokens"] != n:
        raise RuntimeError(f"{side.name}: usage says {out['prompt_tokens']} prompt / {out['tokens']} output tokens, "
                           f"expected {len(ids)} / {n}")
    return out


def greedy(client: httpx.Client, side: Side, ids: list[int], n: int, tok) -> list[tuple[str, float, float]]:
    """[(token string, its logprob, gap to the runner-up's logprob)] of a greedy completion, token strings as glm5
    serve prints them (llama-server's token ids go through the same tokenizer)."""
    from glm5.server.outputs import token_text

    r = client.post(side.url + "/v1/completions", json=side.body(ids, n, logprobs=2))
    if r.status_code != 200:
        raise RuntimeError(f"{side.name}: HTTP {r.status_code}: {r.text[:300]}")
    lp = r.json()["choices"][0]["logprobs"]
    if side.name == "glm5":
        tops = [sorted(d.values(), reverse=True) for d in lp["top_logprobs"]]
        return [(s, x, t[0] - t[1]) for s, x, t in zip(lp["tokens"], lp["token_logprobs"], tops)]
    out = []
    for c in lp["content"]:
        t = sorted((x["logprob"] for x in c["top_logprobs"]), reverse=True)
        out.append((token_text(tok, c["id"])[0], c["logprob"], t[0] - t[1]))
    return out


# -- measuring -------------------------------------------------------------------------------------------------------
def measure(client, sides: list[Side], args, prompts, kind: str) -> dict:
    """{side name: [result per repeat]}; repeats alternate which side goes first. prompts(r) -> token ids."""
    res = {s.name: [] for s in sides}
    for r in range(args.repeats):
        for s in sides if r % 2 == 0 else sides[::-1]:
            res[s.name].append(stream(client, s, prompts(r), args.gen if kind == "decode" else 1))
    return res


def decode_tps(x: dict) -> float:
    return (x["tokens"] - 1) / x["decode_s"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def agreement(a: list[tuple], b: list[tuple]) -> dict:
    """Greedy tokens equal before the first difference, how far apart the two servers' logprobs of those tokens
    are, and at the first difference each side's token and its lead over its runner-up (a near-tie if tiny)."""
    n = min(len(a), len(b))
    k = next((i for i in range(n) if a[i][0] != b[i][0]), n)
    d = [abs(a[i][1] - b[i][1]) for i in range(k)]
    first = (f"token {k}: glm5 {a[k][0]!r} leads by {a[k][2]:.2g}, llama.cpp {b[k][0]!r} by {b[k][2]:.2g}"
             if k < n else "-")
    return {"equal": f"{k}/{n}", "d0": f"{d[0]:.1e}" if d else "-", "dmax": f"{max(d):.1e}" if d else "-",
            "first": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp tree with build/bin/llama-server (default: build one "
                    "into --cache-dir)")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "glm5-bench" / "llama.cpp")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    ap.add_argument("--contexts", default="512,4096", help="decode contexts (prompt tokens)")
    ap.add_argument("--long", action="store_true", help="decode at 32768 too (each server prefills it once)")
    ap.add_argument("--prefill", default="512,4096", help="prefill prompt lengths")
    ap.add_argument("--gen", type=int, default=64, help="output tokens per decode request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared at each decode context")
    ap.add_argument("--outtype", choices=["f32", "bf16"], default="f32", help="llama.cpp weight storage")
    ap.add_argument("--kv-type", choices=["f32", "f16", "bf16"], default="f32", help="llama.cpp KV cache type "
                    "(its own default is f16; glm5 keeps the cache in fp32)")
    ap.add_argument("--flash-attn", choices=["off", "on", "auto"], default="off", help="llama.cpp flash attention "
                    "(its own default is auto, which is on for a CPU; on casts an f32 cache to f16 first)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="first wait up to this many seconds for the "
                    "machine's other processes to leave the CPUs alone")
    ap.add_argument("--keep", type=Path, help="keep the checkpoint, GGUF and server logs in this directory")
    ap.add_argument("--quick", action="store_true", help="decode and prefill at 512 only, 16 tokens, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.prefill, args.gen, args.repeats, args.check_tokens = "512", "512", 16, 1, 16
    contexts = [int(c) for c in args.contexts.split(",") if c] + ([32768] if args.long else [])
    prefills = [int(p) for p in args.prefill.split(",") if p]
    n_ctx = -(-(max(contexts + prefills) + max(args.gen, args.check_tokens) + 1) // 1024) * 1024

    import torch

    repo = Path(__file__).resolve().parent.parent
    rev = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    tree = args.llama_cpp or build_llama_cpp(args.cache_dir, LLAMA_CPP_PYTHON)
    exe = server_binary(tree)
    if not exe.exists():
        sys.exit(f"{exe}: no llama-server there (build the llama-server target of {tree}, or leave out --llama-cpp)")
    if args.wait_quiet:
        print(f"waited {wait_quiet(args.wait_quiet):.0f} s for a quiet machine", flush=True)

    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"cpu: {cpu_name()}, {os.cpu_count()} logical CPUs; {args.threads} compute thread(s) per server")
    print(f"glm5 {rev}, torch {torch.__version__}; llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}: "
          f"{llama_version(exe)}")

    work = args.keep or Path(tempfile.mkdtemp(prefix="glm5-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, gguf = work / "ckpt", work / f"small-{args.outtype}.gguf"
    t0 = time.perf_counter()
    cfg = make_checkpoint(ckpt, n_ctx, args.seed)
    convert(tree, ckpt, args.outtype, gguf, work / "convert.log")
    print(f"model: random `small` preset, seed {args.seed}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
          f"index_topk {cfg.index_topk}, max_position_embeddings {cfg.max_position_embeddings}; glm5 fp32, "
          f"GGUF {args.outtype} ({gguf.stat().st_size / 2**20:.0f} MiB), made in {time.perf_counter() - t0:.0f} s")

    from glm5.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt)
    g_port, l_port = free_port(), free_port()
    g_argv = ["--model", str(ckpt), "--threads", str(args.threads), "--max-num-seqs", "1"]
    l_argv = llama_args(gguf, args, n_ctx)
    print(f"glm5 serve {' '.join(g_argv)}")
    print(f"llama-server {' '.join(l_argv)}")
    procs = []
    try:
        with open(work / "glm5.log", "w") as glog, open(work / "llama.log", "w") as llog:
            procs.append(start_server(g_port, g_argv, glog))
            procs.append(start_llama(exe, l_port, l_argv, llog))
            sides = [Side("glm5", f"http://127.0.0.1:{g_port}"), Side("llama.cpp", f"http://127.0.0.1:{l_port}")]
            print(f"cores busy with both servers up and idle: {busy_cores(2.0):.2f} of {os.cpu_count()}", flush=True)
            rows = run(sides, args, contexts, prefills, cfg, tok)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(args, cfg, *rows)


def run(sides, args, contexts, prefills, cfg, tok):
    rng = random.Random(args.seed)
    draw = lambda n: [rng.randrange(FORMAT_IDS, cfg.vocab_size) for _ in range(n)]  # noqa: E731
    dec, pre, agree = {}, {}, {}
    with httpx.Client(timeout=None) as client:
        # Every key within the top-k for every checked token: dense attention on both sides.
        dense = cfg.index_topk - args.check_tokens
        ids = draw(dense)
        agree[dense] = agreement(*(greedy(client, s, ids, args.check_tokens, tok) for s in sides))
        for C in contexts:
            ids = draw(C)
            for s in sides:  # warm-up: the prompt enters each server's prefix cache
                stream(client, s, ids, 1)
            dec[C] = measure(client, sides, args, lambda r: ids, "decode")
            agree[C] = agreement(*(greedy(client, s, ids, args.check_tokens, tok) for s in sides))
            print(f"decode {C}: glm5 {med(map(decode_tps, dec[C]['glm5'])):.1f} tok/s, llama.cpp "
                  f"{med(map(decode_tps, dec[C]['llama.cpp'])):.1f} tok/s; greedy tokens equal "
                  f"{agree[C]['equal']}", flush=True)
        for P in prefills:
            fresh = [draw(P) for _ in range(args.repeats)]
            pre[P] = measure(client, sides, args, lambda r: fresh[r], "prefill")
            print(f"prefill {P}: glm5 {med(P / x['ttft'] for x in pre[P]['glm5']):.0f} tok/s, llama.cpp "
                  f"{med(P / x['ttft'] for x in pre[P]['llama.cpp']):.0f} tok/s", flush=True)
    return dec, pre, agree


def load_note(xs: list[dict]) -> str:
    o = [x["others"] for x in xs]
    return f"{med(o):.2f} / {max(o):.2f}"


def report(args, cfg, dec, pre, agree):
    print(f"\n### Same function: greedy tokens ({args.check_tokens} per prompt, temperature 0)\n")
    print("| prompt tokens | attention while checking | greedy tokens equal | \\|logprob diff\\| of token 0 | "
          "max over the equal tokens | first difference |")
    print("|--:|:--|--:|--:|--:|:--|")
    for C, a in agree.items():
        s0 = cfg.index_topk - C + 1  # the first token whose forward sees more than index_topk keys
        att = "dense (every key in the top-k)" if s0 >= args.check_tokens else f"sparse from token {max(s0, 0)}"
        first = a["first"].replace("|", "\\|")  # token strings like <|pad5|> inside a markdown cell
        print(f"| {C} | {att} | {a['equal']} | {a['d0']} | {a['dmax']} | {first} |")
    print(f"\n### Batch-1 decode, tokens/s ({args.gen} output tokens; time per output token after the first; "
          f"median of {args.repeats})\n")
    print("| context | glm5 serve | llama-server | glm5 / llama.cpp | llama-server own timing | "
          "other processes' cores, median / max |")
    print("|--:|--:|--:|--:|--:|--:|")
    for C, d in dec.items():
        g, lc = med(map(decode_tps, d["glm5"])), med(map(decode_tps, d["llama.cpp"]))
        own = med(x["timings"].get("predicted_per_second") for x in d["llama.cpp"])
        print(f"| {C} | {g:.1f} | {lc:.1f} | **{g / lc:.2f}x** | {own:.1f} | {load_note(d['glm5'] + d['llama.cpp'])} |")
    print(f"\n### Prefill, tokens/s (prompt tokens / time to the first output token, fresh prompt each time; "
          f"median of {args.repeats})\n")
    print("| prompt | glm5 serve | llama-server | glm5 / llama.cpp | llama-server own timing | "
          "other processes' cores, median / max |")
    print("|--:|--:|--:|--:|--:|--:|")
    for P, d in pre.items():
        g, lc = med(P / x["ttft"] for x in d["glm5"]), med(P / x["ttft"] for x in d["llama.cpp"])
        own = med(x["timings"].get("prompt_per_second") for x in d["llama.cpp"])
        print(f"| {P} | {g:.0f} | {lc:.0f} | **{g / lc:.2f}x** | {own:.0f} | {load_note(d['glm5'] + d['llama.cpp'])} |")
    print(f"\nother processes' cores: CPU time the machine spent outside the two servers and this client during a "
          f"request / its wall time (this machine has {os.cpu_count()} logical CPUs; 0 on a quiet machine).")


if __name__ == "__main__":
    main()
