"""glm5 rl end to end on a tiny random model: the three modes, the staleness bound, resume after SIGKILL, token in /
token out, trainer vs engine log-probs, weight pushes, and the errors a user gets for bad options."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import glm5
from glm5.config import tiny
from glm5.engine import Engine, SamplingParams
from glm5.rl import loop as rl_loop
from glm5.rl.loop import RLConfig, RLError, RLRun, check_config
from glm5.rl.rollout import Rollout, Sample
from glm5.rl.trainer import RLTrainConfig, _pack, sample_logprobs
from glm5.rl.worker import RolloutWorker, WorkerConfig
from glm5.tokenizer import Tokenizer

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.default()


def first_token_parity(sample) -> float:
    """A reward with variance on a random model: the first sampled token's parity (P(all G equal) = 2 / 2^G)."""
    return float(sample.token_ids[0] % 2)


def one_turn_generate(engine, tokenizer, example, group_size, seed):
    """A rollout hook: one turn, no chat parsing beyond the text, through engine.generate."""
    from glm5.chat import render_chat
    from glm5.chat_parse import ParsedOutput

    prompt = render_chat(tokenizer, example.prompt_messages).ids
    (gens,) = engine.generate([prompt], SamplingParams(n=group_size, temperature=1.0, max_tokens=5, seed=seed))
    return [Sample(0, i, example, prompt + g.token_ids, len(prompt), [0] * len(prompt) + [1] * len(g.token_ids),
                   [0.0] * len(prompt) + g.logprobs, [-1] * len(prompt) + g.policy_versions, g.finish_reason, 1,
                   ParsedOutput(content=tokenizer.decode(g.token_ids))) for i, g in enumerate(gens)]


def raising_reward(sample) -> float:
    if sample.uid.endswith("-0"):
        raise RuntimeError("broken on purpose")
    return first_token_parity(sample)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GLM-5 with the shipped tokenizer and no MTP layer (RL does not need one); index_topk 8, so
    sampled sequences are longer than what DSA keeps."""
    d = tmp_path_factory.mktemp("rl") / "tiny"
    cfg = tiny().replace(vocab_size=TOK.vocab_size, index_topk=8, num_nextn_predict_layers=0,
                         max_position_embeddings=512)
    glm5.save_checkpoint(perturb(glm5.load_model(cfg), seed=3, std=0.05), d)
    TOK.save(d)
    return d


def config(ckpt, out, **kw) -> RLConfig:
    base = dict(model=str(ckpt), out_dir=str(out), steps=3, groups_per_step=2, group_size=4, families=("arithmetic",),
                reward="tests.test_rl_loop:first_token_parity", max_tokens=6, rollout_threads=1, train_threads=1,
                checkpoint_every=100, progress=False, train=RLTrainConfig(lr=1e-3))
    return RLConfig(**{**base, **kw})


def weights(run) -> dict:
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_async_at_staleness_0_trains_the_same_weights_as_sync(ckpt, tmp_path):
    runs = {}
    for mode, tau in (("sync", 2), ("async", 0)):
        r = RLRun(config(ckpt, tmp_path / mode, mode=mode, max_staleness=tau))
        summary = r.run()
        assert summary["buffer"]["trained"] == 6 and summary["steps"] == 3
        runs[mode] = (weights(r), metrics(tmp_path / mode))
    (ws, ms), (wa, ma) = runs["sync"], runs["async"]
    assert ws.keys() == wa.keys() and all(torch.equal(ws[k], wa[k]) for k in ws)
    assert [m["trained_groups"] for m in ms] == [m["trained_groups"] for m in ma]
    assert all(m["staleness_max"] == 0 for m in ms + ma)
    start = glm5.load_model(ckpt)  # and training did change them
    assert not torch.equal(start.state_dict()["model.layers.0.self_attn.o_proj.weight"],
                           ws["model.layers.0.self_attn.o_proj.weight"])
    idx = [k for k in ws if ".indexer." in k]
    assert idx and all(torch.equal(ws[k], start.state_dict()[k]) for k in idx)  # the indexers stay frozen


def test_slow_trainer_never_trains_past_the_staleness_bound(ckpt, tmp_path, monkeypatch):
    real = rl_loop.train_step

    def slow(*a, **kw):
        time.sleep(1.5)  # the rollout runs ahead while this step trains
        return real(*a, **kw)

    monkeypatch.setattr(rl_loop, "train_step", slow)
    run = RLRun(config(ckpt, tmp_path, mode="async", max_staleness=1, steps=4))
    summary = run.run()
    ms = metrics(tmp_path)
    assert max(s for m in ms for s in m["staleness"]) <= 1
    assert any(s == 1 for m in ms for s in m["staleness"])  # the rollout did run ahead
    b = summary["buffer"]
    assert b["generated"] == b["dropped_uniform"] + b["dropped_stale"] + b["trained"] + b["queued"]
    trained = [g for m in ms for g in m["trained_groups"]]
    assert len(trained) == len(set(trained)) == 8


@pytest.mark.parametrize("mode, tau, push_every", [("one-step-off", 2, 1), ("async", 1, 3)])
def test_other_schedules_finish_within_their_bound(ckpt, tmp_path, mode, tau, push_every):
    """one-step-off (bound 1 whatever --max-staleness says) and async pushing every 3 steps with bound 1 (the loop
    pushes early rather than let the engine's weights fall out of the bound) both finish, every group within it."""
    run = RLRun(config(ckpt, tmp_path, mode=mode, max_staleness=tau, push_every=push_every, steps=4))
    summary = run.run()
    bound = 1
    ms = metrics(tmp_path)
    assert [m["step"] for m in ms] == [1, 2, 3, 4] and summary["buffer"]["trained"] == 8
    assert max(s for m in ms for s in m["staleness"]) <= bound


def test_a_prompt_without_room_ends_its_group_instead_of_losing_it(ckpt):
    model = glm5.load_model(ckpt)
    eng = Engine(model, num_blocks=2, block_size=16, eos_token_ids=[])  # 32 tokens of context
    ro = Rollout(eng, TOK, max_tokens=4, score=lambda s: (0.0, "malformed"))
    from glm5.data import examples

    ex = examples("retrieval", "train", 1, 0)[0]  # far longer than 32 tokens
    ro.submit(3, ex, 2, seed=1)
    assert ro.busy
    (group,) = ro.step()
    assert [s.finish_reason for s in group] == ["length", "length"] and not ro.busy


def test_cli_sigkill_then_resume_trains_every_group_once(ckpt, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "glm5.cli", "rl", "--model", str(ckpt), "--out-dir", str(out), "--mode", "async",
            "--max-staleness", "1", "--steps", "5", "--groups-per-step", "2", "--group-size", "4", "--families",
            "arithmetic", "--reward", "tests.test_rl_loop:first_token_parity", "--max-tokens", "6",
            "--checkpoint-every", "1", "--rollout-threads", "1", "--train-threads", "1", "--lr", "1e-3", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while not (out / "checkpoints" / "step_00000002").exists():
        assert p.poll() is None, p.stdout.read().decode()
        assert time.monotonic() - t0 < 300
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    r = subprocess.run(args + ["--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stderr and (out / "rl.png").is_file()
    loaded = glm5.load(out / "model")  # the exported model serves as it is: weights, tokenizer
    assert loaded.tokenizer.vocab_size == TOK.vocab_size and not loaded.untrained
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5]
    trained = [g for m in ms for g in m["trained_groups"]]
    assert len(trained) == len(set(trained)) == 10  # none trained twice
    assert max(s for m in ms for s in m["staleness"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    b = summary["buffer"]
    assert b["generated"] == b["dropped_uniform"] + b["dropped_stale"] + b["trained"] + b["queued"]
    # none lost: every group that arrived was trained, dropped or is still queued
    arrived = [g for m in ms for gs in m["arrivals"].values() for g in gs]
    dropped = [g for m in ms for k, gs in m["arrivals"].items() if k != "admitted" for g in gs]
    assert set(trained) <= set(arrived) and not set(trained) & set(dropped)


def test_trainer_log_probs_equal_the_engines(ckpt):
    """fp32: the trainer's full forward and the engine's paged, sparse decode agree to 1e-4 on sequences longer
    than index_topk (8 here: DSA really drops keys). Under bf16 autocast the trainer's log-probs move by up to 0.44 on
    this sharp random model (a bf16 trainer against an fp32 engine): inside IcePop's [0.5, 2] ratio window (|delta| <
    log 2), so the correction reweights these tokens rather than dropping them; a larger mismatch would be dropped."""
    model = glm5.load_model(ckpt)
    prompts = [list(range(5, 25)), list(range(40, 52))]
    outs = Engine(model, eos_token_ids=[], seed=1).generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=30,
                                                                                  seed=7))
    samples = [{"ids": p + c.token_ids, "mask": [0] * len(p) + [1] * len(c.token_ids),
                "logprobs": [0.0] * len(p) + c.logprobs} for p, cs in zip(prompts, outs) for c in cs]
    assert min(len(s["ids"]) for s in samples) > 4 * model.config.index_topk
    got = sample_logprobs(model, samples)
    for s, lp in zip(samples, got):
        want = torch.tensor([x for x, m in zip(s["logprobs"], s["mask"]) if m])
        assert lp.shape == want.shape and (lp - want).abs().max() < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got16 = sample_logprobs(model, samples)
    diff = max(float((lp - torch.tensor([x for x, m in zip(s["logprobs"], s["mask"]) if m])).abs().max())
               for s, lp in zip(samples, got16))
    assert 1e-3 < diff < math.log(2)


def test_pushed_weights_serve_like_a_fresh_engine(ckpt):
    w = RolloutWorker(WorkerConfig(model=str(ckpt), reward="tests.test_rl_loop:first_token_parity", threads=1))
    new = perturb(glm5.load_model(ckpt), seed=11, std=0.05)
    sd = {k: v.clone() for k, v in new.state_dict().items()}
    assert w.handle(("weights", 4, sd, time.time()))[0][:2] == ("pushed", 4)
    prompts, sp = [[3, 4, 5, 6], [9, 8, 7, 6, 5, 4, 3]], SamplingParams(temperature=0.0, max_tokens=8)
    served = w.engine.generate(prompts, sp)
    fresh = Engine(new, eos_token_ids=TOK.eos_ids).generate(prompts, sp)
    for a, b in zip(served, fresh):
        assert a[0].token_ids == b[0].token_ids and a[0].logprobs == b[0].logprobs
        assert set(a[0].policy_versions) == {4}


def test_rewards_that_fail_skip_their_sample_only(ckpt, caplog):
    caplog.set_level(logging.WARNING, logger="glm5.rl.rewards")
    w = RolloutWorker(WorkerConfig(model=str(ckpt), reward="tests.test_rl_loop:raising_reward", threads=1,
                                   max_tokens=4))
    from glm5.data import examples

    w.handle(("generate", [(7, examples("arithmetic", "train", 1, 0)[0], 3, 1)]))
    replies = []
    while w.rollout.busy:
        replies += w.poll()
    (kind, gid, samples), = replies
    assert kind == "group" and gid == 7 and [s["reward"] is None for s in samples] == [True, False, False]
    assert "7-0" in caplog.text and "broken on purpose" in caplog.text


def test_a_rollout_hook_replaces_the_builtin_rollout(ckpt, tmp_path):
    w = RolloutWorker(WorkerConfig(model=str(ckpt), reward="tests.test_rl_loop:first_token_parity", threads=1,
                                   generate="tests.test_rl_loop:one_turn_generate"))
    from glm5.data import examples

    w.handle(("generate", [(5, examples("arithmetic", "train", 1, 0)[0], 4, 9)]))
    (kind, gid, samples), = w.poll()
    assert kind == "group" and gid == 5 and len(samples) == 4
    assert all(1 <= sum(s["mask"]) <= 5 and s["reward"] in (0.0, 1.0) for s in samples)
    summary = RLRun(config(ckpt, tmp_path, steps=2, generate="tests.test_rl_loop:one_turn_generate")).run()
    assert summary["buffer"]["trained"] == 4
    with pytest.raises(RLError, match="--generate: rollout hook must be given as 'module:function'"):
        check_config(config(ckpt, tmp_path, generate="nope"))


def test_tool_episode_trains_exactly_the_sampled_ids():
    """The shipped model calls the calculator: every id with loss mask 1 is one the engine sampled, in order; the
    tool's answer sits between the turns with mask 0; the trainer's batch holds these same ids."""
    from glm5.data import examples
    from glm5.eval.score import score

    loaded = glm5.load()
    eng = Engine(loaded.model, eos_token_ids=loaded.tokenizer.eos_ids)
    sampled: dict[tuple, list[int]] = {}  # (request, sample index) -> the ids the engine sampled
    step = eng.step

    def recording_step():
        outs = step()
        for o in outs:
            sampled.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
        return outs

    eng.step = recording_step
    ro = Rollout(eng, loaded.tokenizer, max_tokens=120, score=lambda s: (0.0, score(s.example, s.output,
                                                                                    s.finish_reason)))
    ro.submit(0, examples("tool", "heldout", 1, 0)[0], 2, seed=5)
    groups = []
    while ro.busy:
        groups += ro.step()
    (group,) = groups
    for s in group:
        assert s.turns == 2, loaded.tokenizer.decode(s.ids[s.prompt_len:])
        runs, cur, kinds = [], [], []
        for t, m in zip(s.ids[s.prompt_len:], s.mask[s.prompt_len:]):
            if kinds and kinds[-1] != m:
                runs.append(cur)
                cur = []
            if not kinds or kinds[-1] != m:
                kinds.append(m)
            cur.append(t)
        runs.append(cur)
        assert kinds == [1, 0, 1]
        obs = loaded.tokenizer.decode(runs[1])
        assert obs.startswith("<tool_response>") and obs.endswith("<|assistant|><think>"), obs
        assert s.versions[s.prompt_len:] == [0 if m else -1 for m in s.mask[s.prompt_len:]]
        # each turn is exactly what one engine sequence sampled
        assert runs[0] in sampled.values() and runs[2] in sampled.values()
        ids_BT, mask_BT, _ = _pack([{"ids": s.ids, "mask": s.mask, "logprobs": s.logprobs}], "cpu")
        assert ids_BT[0].tolist() == s.ids and mask_BT[0].tolist() == [bool(m) for m in s.mask[1:]]


def test_bad_options_fail_before_the_run_with_one_clear_line(ckpt, tmp_path):
    cases = [
        (dict(families=("arithmetic", "poetry")), "unknown 'poetry'"),
        (dict(max_staleness=-1), "--max-staleness -1"),
        (dict(reward="nope"), "module:function"),
        (dict(reward="glm5.rl.rewards:no_such_fn"), "no attribute 'no_such_fn'"),
        (dict(families=("chat",), reward=RLConfig.reward), "does not score them"),
        (dict(group_size=1), "--group-size 1"),
        (dict(backend="slurm"), "--backend 'slurm': expected one of local, ray"),
        (dict(rollout_workers=2), "--rollout-workers 2 needs --backend ray"),
        (dict(ray_address="10.0.0.1:6379"), "--ray-address 10.0.0.1:6379 needs --backend ray"),
        (dict(trainer_ranks=2), "--trainer-ranks 2 needs --backend ray"),
        (dict(trainer_ranks=0), "--trainer-ranks 0: must be >= 1"),
        # 2 groups a step: a batch may hold only 4 samples, and each rank needs one
        (dict(backend="ray", trainer_ranks=5), "--trainer-ranks 5: each rank trains on at least one sample"),
    ]
    for kw, msg in cases:
        with pytest.raises(RLError, match=msg.replace("(", r"\(")) as e:
            check_config(config(ckpt, tmp_path, **kw))
        assert "\n" not in str(e.value)
    from glm5.quant import quantize_checkpoint

    quantize_checkpoint(ckpt, tmp_path / "fp8", to="fp8")
    with pytest.raises(RLError, match="FP8 checkpoint.*--to bf16"):
        check_config(config(tmp_path / "fp8", tmp_path))
