"""glm5 rl --backend ray on a two-node Ray cluster simulated on this machine (ray.cluster_utils.Cluster: a head and a
second node with a resource of its own), started once for the module: the same weights as the local backend, workers
on both nodes, a rollout worker killed with SIGKILL mid-rollout, a trainer failure and --resume, and the one-line
errors for Ray missing or out of reach."""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from glm5.rl import loop as rl_loop
from glm5.rl.loop import RLError, RLRun, TrainerFailed, check_config
from glm5.rl.ray_backend import RayPool

from . import test_rl_loop
from .test_rl_loop import config, metrics, weights

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
    yield c, {c.head_node.node_id, second.node_id}
    c.shutdown()


@pytest.fixture(scope="module")
def local_sync(ckpt, tmp_path_factory):
    """The reference: the local backend, sync, 3 steps; the weights after each step, and the metrics."""
    out = tmp_path_factory.mktemp("local")
    run, after = RLRun(config(ckpt, out, mode="sync")), []
    run.run(on_step=lambda rec: after.append(weights(run)))
    return after, metrics(out)


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
    local, ms = local_sync
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
