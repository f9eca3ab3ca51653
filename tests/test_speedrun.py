"""`glm5 speedrun` end to end in its CI-sized recipe: every stage runs, the exported checkpoint loads (in glm5 and
in transformers' tokenizer), the report holds the eval table, and a stopped run continues where it stopped."""

import json

import pytest
import torch

from glm5.speedrun import STAGES, run_speedrun


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("speedrun")
    run_speedrun(out, "ci", progress=False, stop_after="pretrain")
    state = json.loads((out / "speedrun.json").read_text())
    assert set(state["timings"]) == {"tokenizer", "pretrain"}  # stopped where asked
    model = run_speedrun(out, "ci", progress=False)  # continues: the two finished stages are skipped
    return out, model


def test_every_stage_ran_and_continued_without_redoing(ci_run):
    out, _ = ci_run
    state = json.loads((out / "speedrun.json").read_text())
    assert set(state["timings"]) == set(STAGES)
    assert set(state["matmul_gflops"]) == set(STAGES) and min(state["matmul_gflops"].values()) > 0  # kept on resume
    for stage in STAGES:
        assert (out / stage / "done.json").is_file()
    lines = (out / "pretrain" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln) for ln in lines]
    assert [r["step"] for r in steps if "event" not in r] == list(range(1, 9))  # ran once, not again on the 2nd call
    sft = [json.loads(ln) for ln in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    from glm5.speedrun.recipe import CI

    assert sft[-1]["stage"] == "pretrain" and "indexer_kl" not in sft[-1]  # the SFT trains with dense attention
    used = {}
    for stage in ("pretrain", "dsa_warmup", "sparse", "sft", "dsa_align"):  # each stage trains with its own optimizer
        [ck] = (out / stage / "checkpoints").iterdir()
        used[stage] = json.loads((ck / "trainer_state.json").read_text())["config"]["optimizer"]
    assert used == {s: getattr(CI, s).optimizer for s in used} and len(set(used.values())) == 2

    # the RL stage trained from dsa_align's model, and the export is its model
    rl = json.loads((out / "rl" / "done.json").read_text())
    assert rl["steps"] == CI.rl.steps and rl["buffer"]["trained"] == CI.rl.steps * CI.rl.groups_per_step
    assert json.loads((out / "export" / "done.json").read_text())["from"] == "rl"


def test_exported_model_loads_and_generates(ci_run):
    from glm5 import load_model
    from glm5.chat import render_chat
    from glm5.tokenizer import Tokenizer

    out, model_dir = ci_run
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / f).is_file(), f
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id
    ids = torch.tensor([render_chat(tok, [{"role": "user", "content": "What is 1 + 2?"}]).ids])
    assert torch.isfinite(model(ids)).all()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    msgs = [{"role": "user", "content": "What is 12 + 34?"}]
    assert hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        render_chat(tok, msgs).ids
    # greedy by default (as evaluated), in the file transformers reads too, ending where our engine ends
    from transformers import GenerationConfig

    from glm5.loader import sampling_defaults

    gen = GenerationConfig.from_pretrained(str(model_dir))
    assert gen.do_sample is False and list(gen.eos_token_id) == tok.eos_ids
    assert sampling_defaults(model_dir) == {"temperature": 0.0}


def test_report_has_the_eval_table_and_plots(ci_run):
    out, _ = ci_run
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert {"arithmetic", "world", "unknown", "tool", "chat", "retrieval/sparse", "retrieval/dense", "scope"} == \
        set(result["suites"])  # the recipe's eval_suites
    report = (out / "report.md").read_text()
    assert (out / "eval" / "table.md").read_text().strip() in report
    assert (out / "losses.png").is_file() and "losses.png" in report
    assert (out / "eval.png").is_file() and "eval.png" in report
    by = result["suites"]["world"]["by_phrasing"]  # each held-out wording: its count and outcomes, in the report too
    assert sum(c["n"] for c in by.values()) == result["suites"]["world"]["n"]
    assert "World questions by wording" in report and all(p.replace("{x}", "X") in report for p in by)


def test_ship_installs_and_replaces_only_a_shipped_model(ci_run, tmp_path):
    from glm5 import load_model
    from glm5.speedrun import ship

    out, _ = ci_run
    dest = tmp_path / "assets" / "model"
    for _ in range(2):  # the second ship replaces the first
        assert ship(out, dest) == dest
    assert load_model(dest).config.vocab_size > 0 and (dest / "report.md").is_file()
    assert "records" not in json.loads((dest / "eval.json").read_text())
    assert not (tmp_path / "assets" / "model.tmp").exists() and not (tmp_path / "assets" / "model.old").exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ship(out, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_other_recipe_in_the_same_directory_is_refused(ci_run, tmp_path):
    out, _ = ci_run
    with pytest.raises(ValueError, match="recipe"):
        run_speedrun(out, "full", progress=False)


def test_the_stage_table_trains_the_recipe_stages_in_order():
    from dataclasses import fields

    from glm5.speedrun.pipeline import STAGES, stage_train
    from glm5.speedrun.recipe import TRAIN_AS, TRAIN_STAGES, Recipe, Stage

    assert tuple(name for name, fn in STAGES.items() if fn is stage_train) == TRAIN_STAGES == tuple(TRAIN_AS)
    assert tuple(f.name for f in fields(Recipe) if f.type in (Stage, "Stage")) == TRAIN_STAGES


def test_mixture_holds_each_family_in_its_share(ci_run):
    """mixture_docs fills each family's share of the tokens, overshooting it by less than one document."""
    from dataclasses import replace

    from glm5.speedrun.pipeline import mixture_docs
    from glm5.speedrun.recipe import CI
    from glm5.tokenizer import Tokenizer

    out, _ = ci_run
    tok = Tokenizer.from_dir(out / "tokenizer")
    tokens = 20_000
    docs = mixture_docs(replace(CI, mixture={"encyclopedia": 0.5, "arithmetic": 0.5}), tok, tokens, (64, 100), seed=0)
    assistant = tok.token_id("<|assistant|>")  # in every chat, in no encyclopedia article
    longest = max(map(len, docs))
    articles = sum(len(d) for d in docs if assistant not in d)
    chats = sum(len(d) for d in docs if assistant in d)
    assert tokens // 2 <= articles < tokens // 2 + longest and tokens // 2 <= chats < tokens // 2 + longest


def test_every_seed_reads_about_the_world_it_is_asked_about(ci_run):
    """The recipe seed changes initialisation and data order, never the world: the pre-training encyclopedia and
    the tokenizer's corpus state the facts of the world the held-out questions ask about (seed 1 included)."""
    from dataclasses import replace

    from glm5.data import examples, world
    from glm5.speedrun.pipeline import mixture_docs, tokenizer_corpus
    from glm5.speedrun.recipe import CI
    from glm5.tokenizer import Tokenizer

    out, _ = ci_run
    tok = Tokenizer.from_dir(out / "tokenizer")
    asked = examples("world", "heldout", 20, seed=3)
    r = replace(CI, seed=1, mixture={"encyclopedia": 1.0})
    text = "\n".join(tok.decode(d) for d in mixture_docs(r, tok, 30_000, (64, 100), seed=1))
    corpus = "\n".join(tokenizer_corpus(r))
    assert all(ex.meta["entity"] in corpus and ex.answer in corpus for ex in asked)
    ours, other = {e.name for e in world(0).entities}, {e.name for e in world(1).entities}
    assert sum(name in text for name in ours) > 20 and not any(name in text for name in other - ours)


def test_heldout_questions_use_words_no_training_text_holds():
    """The heldout world questions use words no training text holds ("founding", "hometown", "birth"): the eval
    measures answering in other words. Every question phrasing stays in its own split."""
    import re

    from glm5.data.world import QUESTIONS
    from glm5.speedrun.pipeline import tokenizer_corpus
    from glm5.speedrun.recipe import FULL

    words = lambda t: set(re.findall(r"[a-z]+", t.lower()))  # noqa: E731
    corpus = set().union(*map(words, tokenizer_corpus(FULL)))  # natural text, encyclopedia, train-split chats
    asked = set()
    for train, heldout in QUESTIONS.values():
        assert not set(train) & set(heldout)
        asked |= set().union(*(words(q.replace("{x}", "")) for q in heldout))
    assert asked - corpus


def test_fact_probe_scores_each_fact_as_one_unpadded_pass_would(ci_run):
    """Each training stage records fact_probe; its batched, padded NLL and recall equal a per-fact reference: one
    forward over the statement alone, the value's tokens scored after its head."""
    from glm5 import load_model
    from glm5.data import world
    from glm5.data.world import STATEMENTS
    from glm5.model.model import Impl
    from glm5.speedrun.pipeline import fact_probe
    from glm5.tokenizer import Tokenizer

    out, model_dir = ci_run
    for stage in ("pretrain", "dsa_warmup", "sparse", "sft", "dsa_align"):
        info = json.loads((out / stage / "done.json").read_text())
        assert info["fact_nll"] > 0 and 0 <= info["fact_recall"] <= 1
    assert "facts recalled" in (out / "report.md").read_text()
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    model.impl = Impl(dsa="off")
    nll, count, recalled, n = 0.0, 0, 0, 0
    for e, attr, value in world().facts()[::40]:
        text = STATEMENTS[attr].format(x=e.name, y=value)
        head = text[: text.index(f" {value}")]
        ids, k = tok.encode(f"{head} {value}"), len(tok.encode(head))
        assert tok.decode(ids[k:]).strip() == value  # CI's tiny tokenizer keeps the value out of the head
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], -1)
        nll -= sum(logp[i - 1, ids[i]].item() for i in range(k, len(ids)))
        count += len(ids) - k
        recalled += all(logp[i - 1].argmax().item() == ids[i] for i in range(k, len(ids)))
        n += 1
    got = fact_probe(model_dir, tok, stride=40, batch=5)
    assert got["fact_nll"] == pytest.approx(nll / count, abs=2e-3) and got["fact_recall"] == round(recalled / n, 3)


def _probed_and_dense(ci_run, key: str, label: str):
    """Every training stage recorded the probe `key` and the report shows `label`; -> the final model's dir, its
    tokenizer, and the model in fp32 with dense attention (what the probes read)."""
    from glm5 import load_model
    from glm5.model.model import Impl
    from glm5.tokenizer import Tokenizer

    out, model_dir = ci_run
    for stage in ("pretrain", "dsa_warmup", "sparse", "sft", "dsa_align"):
        assert json.loads((out / stage / "done.json").read_text())[key] > 0
    assert label in (out / "report.md").read_text()
    model = load_model(model_dir, dtype=torch.float32).eval()
    model.impl = Impl(dsa="off")
    return model_dir, Tokenizer.from_dir(model_dir), model

def test_copy_probe_scores_the_repeated_tool_result(ci_run):
    """Each training stage records copy_probe; it equals the NLL read off one full-sequence forward pass at the
    positions where the answer repeats the calculator's result."""
    from glm5.data import examples
    from glm5.speedrun.pipeline import copy_probe
    from glm5.train.sft import chat_doc

    model_dir, tok, model = _probed_and_dense(ci_run, "copy_nll", "copy NLL")
    nll, count = 0.0, 0
    for ex in examples("tool", "heldout", 6):
        ids = chat_doc(tok, ex.messages, ex.tools)["ids"]
        # the number starts where the decoded text last reads "The calculator returned "
        prefix = max(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith("The calculator returned "))
        num = tok.encode(ex.answer)
        assert ids[prefix:prefix + len(num)] == num
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], -1)
        nll -= sum(logp[prefix - 1 + i, t].item() for i, t in enumerate(num))
        count += len(num)
    assert copy_probe(model_dir, tok, n=6) == pytest.approx(nll / count, abs=2e-3)


def test_name_probe_scores_the_called_declared_name(ci_run):
    """Each training stage records name_probe; it equals the NLL, read off one full-sequence forward pass, of the
    name the gold call writes after the assistant's `<tool_call>` (found here by decoding, not by token ids)."""
    from glm5.data import examples
    from glm5.speedrun.pipeline import name_probe
    from glm5.train.sft import chat_doc

    model_dir, tok, model = _probed_and_dense(ci_run, "name_copy_nll", "declared-name NLL")
    nll, count, n = 0.0, 0, 0
    for ex in examples("tool_choice", "heldout", 16):
        if ex.meta["expect"] != "call" or n == 4:
            continue
        ids = chat_doc(tok, ex.messages, ex.tools)["ids"]
        text = tok.decode(ids)
        name = ex.meta["call"]["name"]
        assert "<|assistant|>" in text and f"<tool_call>{name}" in text.split("<|assistant|>", 1)[1]
        # the system prompt's format line shows the tag once; the call is the second
        start = min(k for k in range(len(ids)) if tok.decode(ids[:k]).count("<tool_call>") == 2)
        name_ids = tok.encode(name)
        assert ids[start:start + len(name_ids)] == name_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], -1)
        nll -= sum(logp[start - 1 + i, t].item() for i, t in enumerate(name_ids))
        count += len(name_ids)
        n += 1
    assert n == 4 and name_probe(model_dir, tok, n=4) == pytest.approx(nll / count, abs=2e-3)


def test_full_run_without_fast_bf16_is_warned_about(monkeypatch):
    """A full speedrun on a CPU without fast bf16 trains in fp32, about twice as slowly: said up front. Where bf16 is
    fast, and for the CI-sized recipe, nothing is said. A full-size recipe with other data is warned about too."""
    import glm5.speedrun.pipeline as P
    from glm5.speedrun.recipe import CI, FULL, FULL_RELIABLE

    for autocast, recipe, warned in (("none", FULL, True), ("bf16", FULL, False), ("none", CI, False),
                                     ("none", FULL_RELIABLE, True)):
        monkeypatch.setattr(P, "autocast_for", lambda device, a=autocast: a)
        msg = P.platform_warning(recipe, "cpu", autocast)
        assert (msg is not None) == warned and (not warned or "fp32" in msg and "hour" in msg)
    assert P.platform_warning(FULL, "cpu", "bf16") is None  # asked for bf16 on such a CPU: slow, but its choice


def test_autocast_is_chosen_recorded_and_checked(tmp_path, monkeypatch):
    """--autocast auto resolves per machine; an explicit choice is kept and written to speedrun.json (which the
    training stages' configs read as run.autocast); anything else is refused before any work."""
    import glm5.speedrun.pipeline as P
    from glm5.speedrun.recipe import CI

    monkeypatch.setattr(P, "autocast_for", lambda device: "bf16")
    assert P.SpeedrunState(tmp_path / "a", CI, "cpu").autocast == "bf16"
    run = P.SpeedrunState(tmp_path / "b", CI, "cpu", "none")
    (tmp_path / "b").mkdir()
    run.save_state()
    assert run.autocast == "none" and json.loads((tmp_path / "b" / "speedrun.json").read_text())["autocast"] == "none"
    with pytest.raises(ValueError, match="autocast must be one of"):
        P.SpeedrunState(tmp_path / "c", CI, "cpu", "fp16")
