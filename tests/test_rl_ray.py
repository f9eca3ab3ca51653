"""glm5 rl --backend ray on a two-node Ray cluster simulated on this machine (ray.cluster_utils.Cluster: a head and a
second node with a resource of its own), started once for the module: the same weights as the local backend, workers
on both nodes, a rollout worker killed with SIGKILL mid-rollout, a slow rollout worker, a trainer failure and
--resume, two trainer ranks against one, and the one-line errors for Ray missing or out of reach."""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from glm5.rl import loop as rl_loop
from glm5.rl.loop import RLError, RLRun, TrainerFailed, check_config
from glm5.rl.ray_backend import RayPool

from . import test_rl_loop
from .test_rl_loop import config, metrics, one_turn_generate, weights

ckpt = test_rl_loop.ckpt  # the tiny random model fixture, shared

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes with one CPU each, so two one-thread rollout workers can only run one on each. Each run joins
    it by address (--ray-address) and leaves it when it stops."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = c.add_node(num_cpus=1, resources={"second_node": 1})
    c.wait_for_nodes()
    yield c, {c.head_node.node_id, second.node_id}, second.node_id
    c.shutdown()


@pytest.fixture(scope="module")
def local_sync(ckpt, tmp_path_factory):
    """The reference: the local backend, sync, 3 steps, a checkpoint after each; the weights after each step, the
    metrics, the run directory."""
    out = tmp_path_factory.mktemp("local")
    run, after = RLRun(config(ckpt, out, mode="sync", checkpoint_every=1, keep_last=3)), []
    run.run(on_step=lambda rec: after.append(weights(run)))
    return after, metrics(out), out


def ray_config(ckpt, out, cluster, **kw):
    return config(ckpt, out, backend="ray", ray_address=cluster[0].address, **kw)


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_ray_worker_trains_the_local_backends_weights_and_resumes_like_it(ckpt, cluster, local_sync,
                                                                              tmp_path, monkeypatch):
    """Sync, R = 1: bit for bit the local backend's weights after each step. The trainer fails at step 3: the run
    stops, naming its last checkpoint; --resume auto on Ray finishes with the local backend's weights still."""
    real = rl_loop.train_step
    calls = []

    def fails_at_step_3(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, on purpose")
        return real(*a, **kw)

    monkeypatch.setattr(rl_loop, "train_step", fails_at_step_3)
    local, ms, _ = local_sync
    run, after = RLRun(ray_config(ckpt, tmp_path, cluster, mode="sync", checkpoint_every=1)), []
    with pytest.raises(TrainerFailed, match=r"step 3 \(RuntimeError: out of memory, on purpose\).*step_00000002"):
        run.run(on_step=lambda rec: after.append(weights(run)))
    assert len(after) == 2 and all(same_weights(a, b) for a, b in zip(after, local))
    pushes = metrics(tmp_path)
    assert all(m["push_s"] is not None and len(m["push_e2e_s"]) == 1 for m in pushes)  # each push acknowledged

    monkeypatch.setattr(rl_loop, "train_step", real)
    run = RLRun(ray_config(ckpt, tmp_path, cluster, mode="sync", checkpoint_every=1, resume="auto"))
    assert run.step == 2
    summary = run.run()
    assert same_weights(weights(run), local[-1])  # as if it had never stopped
    assert [m["trained_groups"] for m in metrics(tmp_path)] == [m["trained_groups"] for m in ms]
    assert summary["backend"] == "ray" and summary["workers"][0]["node"] in cluster[1]
    assert summary["samples"]["trained"] == 6 * 4


def test_workers_on_both_nodes_outlive_a_killed_worker(ckpt, cluster, tmp_path, monkeypatch):
    """Two one-CPU workers, so one on each node, both given groups (least loaded first). SIGKILL of the worker just
    sent group 4 (it cannot have finished it): the run finishes; a new actor takes its place and takes the pushes
    since; group 4 is started again; no group is trained twice; the sample counts add up; the staleness bound
    holds."""
    killed = {}
    submit = RayPool.submit

    def submit_then_kill(pool, orders):
        submit(pool, orders)
        gids = [o[0] for o in orders if o[0] >= 4]
        if gids and not killed:
            s = next(s for s in pool.slots if gids[0] in s.outstanding)
            os.kill(s.info["pid"], signal.SIGKILL)
            killed.update(gid=gids[0], index=s.index, pid=s.info["pid"])
            while not pool.restarts:  # the death seen, and the replacement up, before the run can end without it
                pool.wait_ready()

    monkeypatch.setattr(RayPool, "submit", submit_then_kill)
    slots, sends = [], []  # every worker slot started; every order sent: (slot, kind, version or groups)
    start, send = RayPool._start, RayPool._send

    def recording_start(pool, index):
        slot = start(pool, index)
        slots.append((slot, None if pool.weights is None else pool.weights[0]))
        return slot

    def recording_send(pool, slot, msg, weights=None):
        sends.append((slot, msg[0], msg[1] if len(msg) > 1 else None))
        return send(pool, slot, msg, weights)

    monkeypatch.setattr(RayPool, "_start", recording_start)
    monkeypatch.setattr(RayPool, "_send", recording_send)
    run = RLRun(ray_config(ckpt, tmp_path, cluster, mode="async", max_staleness=1, rollout_workers=2, steps=5))
    summary = run.run()
    workers = summary["workers"]
    assert {w["node"] for w in workers} == cluster[1] and all(w["groups"] > 0 for w in workers)
    assert killed and summary["steps"] == 5 and summary["worker_restarts"] == 1
    w = workers[killed["index"]]
    assert w["restarts"] == 1 and w["pid"] != killed["pid"] and w["version"] >= 4  # (the stop may beat push 5)
    ms = metrics(tmp_path)
    requeued = [g for m in ms for g in m["requeued"]]
    assert killed["gid"] in requeued and summary["groups_requeued"] == len(requeued) == len(set(requeued))
    arrived = [g for m in ms for gs in m["arrivals"].values() for g in gs]
    trained = [g for m in ms for g in m["trained_groups"]]
    assert len(arrived) == len(set(arrived)) and len(trained) == len(set(trained)) == 10
    assert max(s for m in ms for s in m["staleness"]) <= 1
    s = summary["samples"]
    assert s["trained"] == 10 * 4
    assert s["generated"] == (s["trained"] + s["queued"] + s["dropped_uniform"] + s["dropped_stale"] +
                              s["dropped_failed"] + s["skipped_reward"])
    b = summary["buffer"]
    assert b["generated"] == b["dropped_uniform"] + b["dropped_stale"] + b["trained"] + b["queued"]
    # the replacement's first order is the newest weights, before any group (groups sampled with the checkpoint's
    # weights would go stale; whether a group goes stale anyway depends on timing, so the order is checked)
    (new, newest), = slots[2:]
    first = next((kind, v) for slot, kind, v in sends if slot is new)
    assert new.index == killed["index"] and newest is not None and first == ("weights", newest)


SLOW_S = 1.5  # seconds the slow worker sleeps before each group: over ten times a group's rollout here


def slow_on_the_second_node(engine, tokenizer, example, group_size, seed):
    """A rollout hook: one_turn_generate, after sleeping SLOW_S on the node with the `second_node` resource."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if any(n["NodeID"] == node and "second_node" in n["Resources"] for n in ray.nodes()):
        time.sleep(SLOW_S)
    return one_turn_generate(engine, tokenizer, example, group_size, seed)


def test_a_slow_worker_delays_only_its_own_groups(ckpt, cluster, tmp_path):
    """Two one-CPU workers, one on each node; the one on the second node sleeps before every group. Async, tau 1:
    each order goes to the worker with fewer unfinished groups, so the fast worker keeps taking orders while the slow
    one sleeps and returns more groups; the run finishes, every sample is counted once by its fate, and no trained
    group is staler than tau."""
    run = RLRun(ray_config(ckpt, tmp_path, cluster, mode="async", max_staleness=1, rollout_workers=2, steps=4,
                           generate="tests.test_rl_ray:slow_on_the_second_node"))
    summary = run.run()
    assert summary["steps"] == 4 and summary["worker_restarts"] == 0
    workers = summary["workers"]
    slow, fast = ([w for w in workers if (w["node"] == cluster[2]) is on_second] for on_second in (True, False))
    assert len(slow) == len(fast) == 1 and fast[0]["groups"] > slow[0]["groups"], workers
    ms = metrics(tmp_path)
    assert max(s for m in ms for s in m["staleness"]) <= 1
    s = summary["samples"]
    assert s["trained"] == 4 * 2 * 4
    assert s["generated"] == (s["trained"] + s["queued"] + s["dropped_uniform"] + s["dropped_stale"] +
                              s["dropped_failed"] + s["skipped_reward"])
    b = summary["buffer"]
    assert b["generated"] == b["dropped_uniform"] + b["dropped_stale"] + b["trained"] + b["queued"]


LR = config("", "").train.lr  # the learning rate of every run here


def test_two_trainer_ranks_resume_a_one_rank_run_and_train_its_weights(ckpt, cluster, local_sync, tmp_path):
    """W = 2 trainer ranks (Ray actors, DDP over gloo) resume the local backend's one-rank sync run from its step-1
    checkpoint (each rank loads its weights and AdamW state) and train steps 2 and 3 on the same seed and data: the
    same groups, rewards and token counts, the gradient norm (before clipping) to 1e-5 relative, the weights to
    LR / 10 after each step; the step-3 checkpoint rank 0 writes holds what the one-rank run's holds.

    Not bit for bit: each rank sums its own samples' gradients and DDP sums the ranks', another fp32 order, over
    micro-batches padded to each rank's longest sample. The gradients then differ by rounding (~1e-7 relative),
    which the gradient norm shows. AdamW divides each coordinate's step by its own gradient's size, so where a
    gradient is itself near rounding size the step can differ by up to LR: the weights' bound is therefore in units
    of LR (measured: under LR / 100), while a sample trained twice or left out, or AdamW's state not loaded, moves
    many coordinates by about LR. A third node gives the ranks their two CPUs, for this test only."""
    local, ms, local_out = local_sync
    shutil.copytree(local_out / "checkpoints" / "step_00000001", tmp_path / "checkpoints" / "step_00000001")
    shutil.copy(local_out / "metrics.jsonl", tmp_path / "metrics.jsonl")
    node = cluster[0].add_node(num_cpus=2)
    try:
        run = RLRun(ray_config(ckpt, tmp_path, cluster, mode="sync", trainer_ranks=2, resume="auto"))
        assert run.step == 1 and run.opt is None  # the ranks hold the optimizer
        after = []
        summary = run.run(on_step=lambda rec: after.append(weights(run)))
    finally:
        cluster[0].remove_node(node)
    assert summary["trainer_ranks"] == 2 and summary["steps"] == 3
    for a, b in zip(after, local[1:], strict=True):
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max() for k in a) < LR / 10
    m2 = metrics(tmp_path)
    assert [m["step"] for m in m2] == [1, 2, 3]  # step 1's line is the one-rank run's, kept by the resume
    for key in ("trained_groups", "reward_mean", "tokens", "clipped", "icepop_masked_share"):
        assert [m[key] for m in m2[1:]] == [m[key] for m in ms[1:]], key
    assert [m["grad_norm"] for m in m2[1:]] == pytest.approx([m["grad_norm"] for m in ms[1:]], rel=1e-5)

    ours, theirs = (checkpoint_contents(d / "checkpoints" / "step_00000003") for d in (tmp_path, local_out))
    assert ours.keys() == theirs.keys() and ours["files"] == theirs["files"] and ours["rl"] == theirs["rl"]
    for name in ("model", "optimizer.safetensors", "rng.safetensors"):
        assert ours[name].keys() == theirs[name].keys(), name
        for k, t in theirs[name].items():
            assert ours[name][k].shape == t.shape and ours[name][k].dtype == t.dtype, k
    model, opt = ours["model"], ours["optimizer.safetensors"]
    assert max((model[k] - t).abs().max() for k, t in theirs["model"].items()) < LR / 10
    # AdamW's moments: rounding-level differences, relative to each tensor's largest entry
    assert all((opt[k] - t).abs().max() <= 1e-4 * t.abs().max() for k, t in theirs["optimizer.safetensors"].items())


def checkpoint_contents(step_dir: Path) -> dict:
    """A checkpoint's files, its tensors (the model's under "model"), and its loop state but for the run's options."""
    from safetensors.torch import load_file

    out = {"files": sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()), "model": {}}
    for p in step_dir.rglob("*.safetensors"):
        (out["model"] if p.parent.name == "model" else out.setdefault(p.name, {})).update(load_file(str(p)))
    out["rl"] = json.loads((step_dir / "trainer_state.json").read_text())["rl"]
    del out["rl"]["config"]  # backend, trainer_ranks: the options differ
    return out


def test_ray_missing_or_out_of_reach_is_one_clear_line(ckpt, tmp_path, monkeypatch, capsys):
    with pytest.raises(RLError, match=r"--ray-address 127\.0\.0\.1:1: no Ray head answers there") as e:
        check_config(config(ckpt, tmp_path, backend="ray", ray_address="127.0.0.1:1"))
    assert "\n" not in str(e.value)
    with pytest.raises(RLError, match="expected HOST:PORT"):
        check_config(config(ckpt, tmp_path, backend="ray", ray_address="headnode"))
    from glm5.cli import main

    args = ["rl", "--model", str(ckpt), "--out-dir", str(tmp_path), "--backend", "ray", "--ray-address",
            "127.0.0.1:1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no Ray head answers" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RLError, match=r"Ray is not installed .*pip install 'glm5\[rl\]'") as e:
        check_config(config(ckpt, tmp_path, backend="ray"))
    assert "\n" not in str(e.value)
    assert main(args[:-3] + ["--quiet"]) == 2 and "Ray is not installed" in capsys.readouterr().err
    assert not Path(tmp_path, "metrics.jsonl").exists()  # nothing ran
