"""`run_speedrun`: tokenizer -> pre-training -> DSA dense warm-up -> sparse stage -> SFT -> indexer alignment -> HF
export -> eval (of the exported files) -> report.md, each stage a function of the run directory. A stage that finished
leaves `<stage>/done.json`; running again with the same --out-dir skips finished stages and resumes a training stage
from its newest checkpoint, so a killed speedrun loses at most `save_every` steps.

Layout of OUT: tokenizer/, pretrain/, dsa_warmup/, sparse/, sft/, dsa_align/ (each a glm5 train run: metrics.jsonl,
plots, checkpoints/), eval/eval.json, model/ (the exported checkpoint: config.json, model.safetensors, tokenizer
files), report.md, speedrun.json (timings).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .recipe import FULL, RECIPES, TRAIN_AS, TRAIN_STAGES, Recipe, indexer_only
from .report import write_report

log = logging.getLogger("glm5.speedrun")


# -- data ---------------------------------------------------------------------------------------------------------
def tokenizer_corpus(r: Recipe):
    """Text the BPE is trained on: the natural text, the encyclopedia, and the text of rendered training chats."""
    from ..chat import Special, render_parts
    from ..data import encyclopedia, examples, natural_text, world

    yield from natural_text()
    yield from encyclopedia(world(), seed=r.seed)  # the one world, whatever the seed (as mixture_docs)
    for fam in ("arithmetic", "world", "unknown", "tool", "chat"):
        for ex in examples(fam, "train", 400, seed=r.seed):
            for p, _ in render_parts(ex.messages, ex.tools, add_generation_prompt=False):
                if not isinstance(p, Special):
                    yield p


def retrieval_examples(r: Recipe, tok, n: int, lengths: tuple[int, int], split: str, seed: int):
    from ..data import examples

    rng = random.Random(f"speedrun/retrieval/{split}/{seed}")
    count = lambda s: len(tok.encode(s))  # noqa: E731
    return [examples("retrieval", split, 1, seed=seed * 100_003 + i, context_tokens=rng.randint(*lengths),
                     count_tokens=count)[0] for i in range(n)]


def mixture_docs(r: Recipe, tok, tokens: int, retrieval_lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """About `tokens` tokens of pre-training documents in r.mixture's proportions, shuffled. Chats are rendered
    without the generation prompt and trained on every token."""
    from ..data import encyclopedia, examples, natural_text, world
    from ..train.sft import chat_doc

    rng = random.Random(f"speedrun/mixture/{seed}")
    pools: dict[str, list[list[int]]] = {}
    nat = [tok.encode(t) for t in natural_text()]
    pools["natural"] = [d for d in nat if d]
    w = world()  # the world every question family and the eval ask about: r.seed changes the draw, never the facts
    docs = []
    for fam, frac in r.mixture.items():
        want, got, i = int(tokens * frac), 0, 0
        while got < want:
            if fam == "natural":
                new = pools["natural"][i:i + 64] or pools["natural"][:64]
                i = (i + 64) % len(pools["natural"])
            elif fam == "encyclopedia":  # every entity, re-paraphrased per round
                arts = encyclopedia(w, seed=seed * 1000 + i)
                rng.shuffle(arts)
                new = [tok.encode("\n\n".join(arts[j:j + 8])) for j in range(0, len(arts), 8)]
                i += 1
            else:
                n = 256 if fam != "retrieval" else 16
                exs = (retrieval_examples(r, tok, n, retrieval_lengths, "train", seed * 10_007 + i)
                       if fam == "retrieval" else examples(fam, "train", n, seed=seed * 1_000_003 + i))
                new = [chat_doc(tok, ex.messages, ex.tools)["ids"] for ex in exs]
                i += 1
            for d in new:
                if got >= want:
                    break
                docs.append(d)
                got += len(d)
    rng.shuffle(docs)
    return docs


def long_lengths(r: Recipe, spec) -> tuple[int, int]:
    """Retrieval context lengths for a stage: a whole conversation (context, question, answer) fits one row."""
    return r.long_retrieval_tokens[0], min(r.long_retrieval_tokens[1], spec.seq_len - 96)


def sft_examples(r: Recipe, tok, seed: int) -> list:
    from ..data import examples

    out = []
    for fam, n in r.sft_chats.items():
        if fam == "retrieval":
            out += retrieval_examples(r, tok, n, long_lengths(r, r.sft), "train", seed)
        else:
            out += examples(fam, "train", n, seed=seed)
    random.Random(f"speedrun/sft/{seed}").shuffle(out)
    return out


# -- the run directory --------------------------------------------------------------------------------------------
AUTOCASTS = ("auto", "bf16", "none")


def autocast_for(device: str) -> str:
    """bf16 autocast where bf16 matmuls are fast (CUDA, CPUs with AMX or AVX512-BF16); fp32 elsewhere (AVX2 CPUs
    multiply bf16 hundreds of times slower than fp32)."""
    from ..train.optim import bf16_is_fast

    return "bf16" if bf16_is_fast(device) else "none"


def platform_warning(r: Recipe, device: str, autocast: str) -> str | None:
    """What a user should know before a full-size run (FULL's model, whatever its data) on this machine with this
    autocast, or None."""
    if r.model == FULL.model and autocast == "none" and autocast_for(device) == "none":
        return ("this CPU has no fast bf16 (neither AMX nor AVX512-BF16): the speedrun trains in fp32, about twice as "
                "slowly as in bf16 (on 2 AVX2 cores about an hour, not 30 minutes: 58-69 minutes at 2 threads), and "
                "trains another model than the shipped one, which was trained in bf16")
    return None


def base_config(r: Recipe, tok):
    from ..config import ModelConfig

    eos = [tok.token_id(s) for s in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    return ModelConfig(**r.model, vocab_size=len(tok), index_topk=r.index_topk, eos_token_id=eos,
                       pad_token_id=eos[0])


class SpeedrunState:
    """One speedrun directory: where each stage writes, which stages finished, how long each took (speedrun.json)."""

    def __init__(self, out: Path, recipe: Recipe, device: str, autocast: str = "auto"):
        if autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {AUTOCASTS}, got {autocast!r}")
        self.out, self.r, self.device = out, recipe, device
        self.autocast = autocast_for(device) if autocast == "auto" else autocast
        self.timings: dict[str, float] = {}
        self.gflops: dict[str, float] = {}  # the machine's fp32 matmul speed as each stage started
        state = out / "speedrun.json"
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("recipe") != recipe.name:
                raise ValueError(f"{out} holds a speedrun of recipe {saved.get('recipe')!r}, not {recipe.name!r}: "
                                 "choose another --out-dir")
            if saved.get("autocast", self.autocast) != self.autocast:
                log.warning("%s trained so far with autocast %r; the stages left train with %r", out,
                            saved["autocast"], self.autocast)
            self.timings = saved.get("timings", {})
            self.gflops = saved.get("matmul_gflops", {})

    def done(self, stage: str) -> bool:
        return (self.out / stage / "done.json").is_file()

    def finish(self, stage: str, info: dict, seconds: float) -> None:
        from ..weights import atomic_write

        (self.out / stage).mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / stage / "done.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.save_state()

    def save_state(self) -> None:
        from ..weights import atomic_write

        state = {"recipe": self.r.name, "device": self.device, "autocast": self.autocast,
                 "threads": torch.get_num_threads(), "timings": self.timings, "matmul_gflops": self.gflops,
                 "longest_trained_retrieval": long_lengths(self.r, self.r.sft)[1], "recipe_settings": asdict(self.r)}
        atomic_write(self.out / "speedrun.json", lambda tmp: tmp.write_text(json.dumps(state, indent=2) + "\n"))

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        return Tokenizer.from_dir(self.out / "tokenizer")

    def last_model(self, stage: str) -> Path:
        from ..train import checkpoint as ckpt

        cks = ckpt.list_checkpoints(self.out / stage / "checkpoints")
        if not cks:
            raise FileNotFoundError(f"{self.out / stage}: no checkpoint (did the stage run?)")
        return cks[-1] / "model"


def matmul_gflops(n: int = 512, repeats: int = 9) -> float:
    """Median fp32 GFLOP/s of n^3 matrix products on this process's threads (~0.1 s): how fast the machine is right
    now. A shared machine's speed drifts by a third over a day; stage timings are read against it."""
    g = torch.Generator().manual_seed(0)  # not the global RNG
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return round(2 * n**3 / sorted(times)[repeats // 2] / 1e9, 1)


# -- stages: fn(run, its name, on_step) -> what its done.json records; a training stage calls on_step(record) ------
def stage_tokenizer(run: SpeedrunState, name: str, on_step) -> dict:
    from ..tokenizer_train import train_bpe_tokenizer

    out = train_bpe_tokenizer(tokenizer_corpus(run.r), run.r.vocab_size, run.out / "tokenizer")
    return {"dir": str(out), "vocab_size": len(run.tokenizer())}


def stage_train(run: SpeedrunState, name: str, on_step) -> dict:
    from ..train.loop import TrainConfig, train
    from ..train.sft import ChatDocs

    r, tok = run.r, run.tokenizer()
    spec = getattr(r, name)
    index = TRAIN_STAGES.index(name)
    if index == 0:  # random weights of the recipe's size
        cfg_path = run.out / "model_config.json"
        cfg_path.write_text(json.dumps(base_config(r, tok).to_hf(), indent=2) + "\n")
        model_from = str(cfg_path)
    else:  # the previous stage's weights
        model_from = str(run.last_model(TRAIN_STAGES[index - 1]))
    seed = r.seed + index
    if name == "sft":
        source = ChatDocs(sft_examples(r, tok, seed), tok)
    else:
        tokens = spec.steps * spec.batch_size * (spec.seq_len + 1)  # what the stage packs, at most
        lengths = r.pretrain_retrieval_tokens if name == "pretrain" else long_lengths(r, spec)
        source = mixture_docs(r, tok, tokens, lengths, seed)
    cfg = TrainConfig(model=model_from, out_dir=str(run.out / name), stage=TRAIN_AS[name],
                      seq_len=spec.seq_len, batch_size=spec.batch_size, steps=spec.steps, lr=spec.lr,
                      warmup_steps=spec.warmup_steps, schedule=spec.schedule, optimizer=spec.optimizer, mtp_depth=1,
                      device=run.device, autocast=run.autocast, seed=seed,
                      save_every=max(10, spec.steps // 4), keep_last=1,
                      resume="auto", progress=False, plots=True, recall_every=10)
    rec = train(cfg, source, on_step)
    if not rec:  # killed after the last checkpoint, before done.json: the run had nothing left to do
        from ..train.plots import read_metrics

        rec = read_metrics(run.out / name / "metrics.jsonl")[-1]
    model_dir = run.last_model(name)
    info = {"model": str(model_dir), "last": rec, "copy_nll": copy_probe(model_dir, tok),
            "name_copy_nll": name_probe(model_dir, tok), **fact_probe(model_dir, tok)}
    log.info("%s: copy NLL %.2f (copies below ~0.5, does not above ~2); declared-name NLL %.2f; facts %.0f%% recalled "
             "(NLL %.2f)", name, info["copy_nll"], info["name_copy_nll"], 100 * info["fact_recall"], info["fact_nll"])
    return info


def copy_probe(model_dir: str | Path, tok, n: int = 24) -> float:
    """Does the model copy from its context? Mean NLL per token of a calculator result where the answer repeats it
    ("The calculator returned 2183850."), over n heldout tool chats, dense attention (a pre-training checkpoint's
    indexer is untrained). Whether pre-training learns this is decided by chance at this budget, and every chat
    family needs it (a tool result, a needle's code, operands into column steps): ~0.4 after a pre-training that
    copies and 2.2 after one that does not, against ~2.3 for the same number where the tool first states it."""
    from ..data import examples
    from ..train.sft import chat_doc

    spans = []
    assistant = tok.token_id("<|assistant|>")
    for ex in examples("tool", "heldout", n):
        ids = chat_doc(tok, ex.messages, ex.tools)["ids"]
        num, start = tok.encode(ex.answer), len(ids) - ids[::-1].index(assistant)  # the last assistant turn
        at = next((i for i in range(start, len(ids) - len(num) + 1) if ids[i:i + len(num)] == num), None)
        if at is not None:  # else the number merged with a neighbouring token: not a clean probe
            spans.append((ids, at, len(num)))
    return _span_nll(model_dir, spans)


def name_probe(model_dir: str | Path, tok, n: int = 24) -> float:
    """Does the model read a tool declaration? Mean NLL per token of the name in the first `<tool_call>` of n
    held-out `tool_choice` chats that call a tool (names no training chat declares; every token after the tag is in
    the declaration above), dense attention. Near 0 where the model copies the name from its declaration; the
    fp32 full_reliable runs read ~6 after SFT (they write tool names from memory), ~9 after pre-training."""
    from ..data import examples
    from ..train.sft import chat_doc

    spans, tag, assistant = [], tok.token_id("<tool_call>"), tok.token_id("<|assistant|>")
    for ex in examples("tool_choice", "heldout", 4 * n):
        if len(spans) == n:
            break
        if ex.meta["expect"] != "call":
            continue
        ids, name = chat_doc(tok, ex.messages, ex.tools)["ids"], tok.encode(ex.meta["call"]["name"])
        at = ids.index(tag, ids.index(assistant)) + 1  # the call, not the system prompt's format line
        if ids[at:at + len(name)] == name:
            spans.append((ids, at, len(name)))
    return _span_nll(model_dir, spans)


def _span_nll(model_dir: str | Path, spans: list[tuple[list[int], int, int]]) -> float:
    """Mean NLL per token of ids[at:at + k] given what precedes it, over (ids, at, k) spans; dense attention (a
    pre-training checkpoint's indexer is untrained)."""
    from ..eval.run import attention_mode
    from ..loader import load_model

    model = load_model(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ids, at, k in spans:
        with torch.no_grad(), attention_mode(model, "dense"):
            logp = torch.log_softmax(model(torch.tensor([ids[:at + k]])).float()[0, at - 1:-1], -1)
        total -= logp.gather(-1, torch.tensor(ids[at:at + k])[:, None]).sum().item()
        count += k
    return round(total / max(count, 1), 3)


def fact_probe(model_dir: str | Path, tok, stride: int = 1, batch: int = 128) -> dict:
    """Does the model know the world? Every `stride`-th fact of glm5.data's world as the encyclopedia states it
    ("Zenand was founded in 1879."): the mean NLL per token of the value after its statement ("Zenand was founded
    in"), and the share of facts whose value the model completes greedily (every value token the argmax). Dense
    attention, right-padded batches (causal: padding never reaches an earlier position). The shipped pre-training
    reads 0.17 / 91%; a pre-training whose encyclopedia described another world than the questions' 1.91 / 6%."""
    from ..data import world
    from ..data.world import STATEMENTS
    from ..eval.run import attention_mode
    from ..loader import load_model

    model = load_model(model_dir, dtype=torch.float32).eval()
    items = []
    for e, attr, value in world().facts()[::stride]:
        head = STATEMENTS[attr].split("{y}")[0].format(x=e.name).rstrip()
        ids, prefix = tok.encode(f"{head} {value}"), tok.encode(head)
        if ids[:len(prefix)] == prefix and len(ids) > len(prefix):  # else the value merged into the head's last token
            items.append((ids, len(prefix)))
    total, count, recalled = 0.0, 0, 0
    for b0 in range(0, len(items), batch):
        chunk = items[b0:b0 + batch]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        with torch.no_grad(), attention_mode(model, "dense"):
            logp = torch.log_softmax(model(x).float(), -1)
        for row, (ids, k) in enumerate(chunk):
            lp, want = logp[row, k - 1:len(ids) - 1], torch.tensor(ids[k:])
            total -= lp.gather(-1, want[:, None]).sum().item()
            count += len(want)
            recalled += bool((lp.argmax(-1) == want).all())
    return {"fact_nll": round(total / max(count, 1), 3), "fact_recall": round(recalled / max(len(items), 1), 3)}


def stage_rl(run: SpeedrunState, name: str, on_step) -> dict:
    """`glm5 rl` from dsa_align's model, when the recipe has an RL stage (glm5.rl: rollout and trainer in two
    processes, the honesty reward). Its checkpoints are rl/checkpoints/step_N/model, as a training stage's."""
    spec = run.r.rl
    if spec is None:
        return {"skipped": "the recipe has no RL stage"}
    from ..rl.loop import RLConfig, RLRun
    from ..rl.trainer import RLTrainConfig

    cfg = RLConfig(model=str(run.last_model(TRAIN_STAGES[-1])), out_dir=str(run.out / name),
                   tokenizer=str(run.out / "tokenizer"), mode=spec.mode, max_staleness=spec.max_staleness,
                   steps=spec.steps, groups_per_step=spec.groups_per_step, group_size=spec.group_size,
                   max_tokens=spec.max_tokens, seed=run.r.seed, checkpoint_every=max(1, spec.steps // 4), keep_last=1,
                   resume="auto", progress=False, train=RLTrainConfig(lr=spec.lr))
    summary = RLRun(cfg).run(on_step)
    return {"model": str(run.last_model(name)), **summary}


def exported_stage(run: SpeedrunState) -> str:
    """The stage whose model the speedrun exports: rl's when it trained, else the last training stage's."""
    info = run.out / "rl" / "done.json"
    return "rl" if info.is_file() and "skipped" not in json.loads(info.read_text()) else TRAIN_STAGES[-1]


def stage_export(run: SpeedrunState, name: str, on_step) -> dict:
    from ..loader import load_model
    from ..weights import save_checkpoint

    dst = run.out / "model"
    tmp = run.out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    source = exported_stage(run)
    model = load_model(run.last_model(source), dtype=torch.float32)
    save_checkpoint(model, tmp, dtype=torch.bfloat16)  # the release format: BF16 safetensors + config.json
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(run.out / "tokenizer" / f, tmp / f)
    # greedy by default, as it is evaluated: a 7M model sampled at temperature 1 slips digits
    gen = {"do_sample": False, "eos_token_id": run.tokenizer().eos_ids, "pad_token_id": model.config.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    size = sum(f.stat().st_size for f in dst.iterdir())
    return {"dir": str(dst), "from": source, "bytes": size, "params": sum(p.numel() for p in model.parameters())}


def stage_eval(run: SpeedrunState, name: str, on_step) -> dict:
    from ..eval import evaluate, format_table
    from ..loader import load_model
    from ..tokenizer import Tokenizer

    r = run.r
    model = load_model(run.out / "model", dtype=torch.float32)
    tok = Tokenizer.from_dir(run.out / "model")
    result = evaluate(model, tok, n=r.eval_n, seed=r.seed + 1000, max_tokens=r.eval_max_tokens,
                      families=r.eval_suites, retrieval_lengths=r.eval_retrieval, progress=False)
    (run.out / "eval").mkdir(parents=True, exist_ok=True)
    (run.out / "eval" / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (run.out / "eval" / "table.md").write_text(format_table(result) + "\n")
    return {"json": str(run.out / "eval" / "eval.json")}


def stage_report(run: SpeedrunState, name: str, on_step) -> dict:
    return {"report": str(write_report(run.out, STAGES))}


STAGES = {  # the speedrun, in the order it runs
    "tokenizer": stage_tokenizer,
    "pretrain": stage_train,
    "dsa_warmup": stage_train,
    "sparse": stage_train,
    "sft": stage_train,
    "dsa_align": stage_train,
    "rl": stage_rl,  # skipped where the recipe has none
    "export": stage_export,
    "eval": stage_eval,  # of the exported files, as shipped
    "report": stage_report,
}


# -- the run ------------------------------------------------------------------------------------------------------
def stage_weights(r: Recipe) -> dict[str, float]:
    """Rough seconds per stage on 2 CPU cores (for the ETA only): training by tokens, attention by length."""
    def train_s(s):
        return s.steps * s.batch_size * (s.seq_len + 1) / (5000 / (1 + s.seq_len / 4096))

    w = {"tokenizer": 20.0, "export": 3.0, "report": 5.0,
         "eval": 1.5 * r.eval_n + 0.6 * sum(L * n for L, n in r.eval_retrieval.items()) / 1024}
    for name in TRAIN_STAGES:
        w[name] = train_s(getattr(r, name)) * (0.4 if indexer_only(name) else 1.0) + 10
    w["rl"] = 0.0 if r.rl is None else 0.05 * r.rl.steps * r.rl.groups_per_step * r.rl.group_size * r.rl.max_tokens / 8
    return w


def run_speedrun(out_dir: str | Path = "runs/speedrun", recipe: str | Recipe = "full", device: str = "cpu",
                 progress: bool = True, stop_after: str | None = None, autocast: str = "auto") -> Path:
    """Run (or continue) a speedrun in out_dir; returns the exported model directory. autocast: "auto" (bf16 where
    bf16 matmuls are fast, else fp32: `autocast_for`), "bf16" or "none" (fp32)."""
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = SpeedrunState(out, r, device, autocast)
    run.save_state()
    if warning := platform_warning(r, device, run.autocast):
        log.warning("%s", warning)
    weights = stage_weights(r)
    total = sum(weights.values())
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = (TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*cols, disable=not progress, refresh_per_second=2) as bar:
        overall = bar.add_task(f"speedrun ({r.name})", total=total, info="")
        done_w = sum(weights[s] for s in STAGES if run.done(s))
        bar.update(overall, completed=done_w)
        for stage, fn in STAGES.items():
            if run.done(stage):
                log.info("%s: done earlier, skipped", stage)
                if stage == stop_after:
                    break
                continue
            run.gflops[stage] = matmul_gflops()
            t0 = time.perf_counter()
            task = bar.add_task(f"  {stage}", total=1.0, info="")

            def on_step(rec, task=task, stage=stage):  # a training stage's progress
                steps = getattr(r, stage).steps
                frac = rec["step"] / steps
                bar.update(task, completed=frac, info=f"step {rec['step']}/{steps} loss {rec['loss']:.3f}")
                bar.update(overall, completed=done_w + weights[stage] * frac)

            info = fn(run, stage, on_step)
            dt = time.perf_counter() - t0
            run.finish(stage, info, dt)
            done_w += weights[stage]
            bar.update(task, completed=1.0, info=f"{dt:.0f} s")
            bar.update(overall, completed=done_w)
            log.info("%s: %.0f s", stage, dt)
            if stage == stop_after:
                break
    return out / "model"


def ship(out_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Install a finished speedrun as the package's default model (glm5/assets/model/): the exported checkpoint,
    its eval (without the per-example records) and the report with its plots. Replaces what was there."""
    from ..loader import SHIPPED_MODEL_DIR

    out = Path(out_dir)
    dest = Path(dest) if dest is not None else SHIPPED_MODEL_DIR
    old = dest.with_name(dest.name + ".old")
    if old.is_dir() and not dest.exists():  # a ship killed between its two renames: the old model is still whole
        os.replace(old, dest)
    if dest.exists() and not (dest / "speedrun.json").is_file():
        raise FileExistsError(f"{dest} exists and is not a shipped speedrun model: refusing to replace it")
    for stage in ("export", "eval", "report"):
        if not (out / stage / "done.json").is_file():
            raise FileNotFoundError(f"{out}: stage {stage!r} has not finished; run the speedrun to the end first")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / "model", tmp)
    result = json.loads((out / "eval" / "eval.json").read_text())
    result.pop("records", None)
    (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    for f in ("report.md", "losses.png", "eval.png", "speedrun.json"):
        if (out / f).is_file():
            shutil.copy2(out / f, tmp / f)
    for f in tmp.iterdir():
        f.chmod(0o644)  # package data: readable by everyone (the checkpoint writer creates private temp files)
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)  # two renames: a reader sees the old model or the new one, never half of either
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
