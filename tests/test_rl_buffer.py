"""The rollout buffer: staleness admission, oldest-first draws, dynamic sampling, counters, checkpoint round trip."""

import io
import json
import random

import pytest
import torch

from glm5.rl.buffer import Group, RolloutBuffer


def grp(uid, oldest, rewards=(1.0, 0.0), span=2):
    """A group whose samples' tokens run from version `oldest` up to oldest + span (the engine swapped weights)."""
    versions = [list(range(oldest + i % (span + 1), oldest + span + 1)) for i in range(len(rewards))]
    return Group(uid, list(rewards), versions, {"tokens": torch.arange(3) + len(str(uid))})


@pytest.mark.parametrize("bad", [-1, -5, 1.5, True, None])
def test_negative_or_non_integer_staleness_is_refused(bad):
    with pytest.raises(ValueError, match="max_staleness must be an integer >= 0"):
        RolloutBuffer(bad)


def test_admission_measures_from_the_oldest_token():
    buf = RolloutBuffer(max_staleness=2)
    assert buf.put(grp("a", 3), version=5) == "admitted"  # staleness 2: at the bound
    assert buf.put(grp("b", 2), version=5) == "dropped_stale"  # its oldest token is 3 versions behind
    # one sample is fresh but another started at version 2: the group is as old as its oldest token
    mixed = Group("c", [1.0, 0.0], [[5, 5], [2, 3, 4, 5]])
    assert mixed.oldest == 2 and buf.put(mixed, version=5) == "dropped_stale"
    assert buf.stats()["dropped_stale"] == 2 and len(buf) == 1
    with pytest.raises(ValueError, match="newer than the trainer"):
        buf.put(grp("d", 6), version=5)
    with pytest.raises(ValueError, match="finite"):
        buf.put(Group("e", [1.0, float("nan")], [[5], [5]]), version=5)
    with pytest.raises(ValueError, match="no generated token"):
        buf.put(Group("f", [1.0, 0.0], [[], []]), version=5)


def test_batches_are_oldest_first_and_stale_groups_never_reach_the_trainer():
    buf = RolloutBuffer(max_staleness=1)
    for uid, oldest in (("x5", 5), ("x4", 4), ("x3", 3), ("y4", 4)):  # a lagging engine delivers x4 late
        assert buf.put(grp(uid, oldest), version=5) in ("admitted", "dropped_stale")
    assert buf.stats()["dropped_stale"] == 1  # x3 is 2 behind
    assert buf.get_batch(4, version=5) is None and len(buf) == 3  # not enough: nothing taken
    assert [g.uid for g in buf.get_batch(2, version=5)] == ["x4", "y4"]  # oldest first, ties in arrival order
    # the trainer moves on to version 7 before drawing again: x5 (oldest 5) is now 2 behind and is dropped
    assert buf.put(grp("z6", 6), version=7) == "admitted"
    assert buf.get_batch(1, version=7)[0].uid == "z6"
    s = buf.stats()
    assert s["dropped_stale"] == 2 and s["trained"] == 3 and s["queued"] == 0
    assert s["staleness"] == {1: 3}  # x4, y4 at version 5 and z6 at 7: all one version behind
    buf.check()


def test_dynamic_sampling_drops_groups_with_equal_rewards():
    buf = RolloutBuffer(max_staleness=0)
    assert buf.put(grp("same", 0, rewards=(1.0, 1.0, 1.0)), version=0) == "dropped_uniform"
    assert buf.put(grp("zero", 0, rewards=(0.0, 0.0)), version=0) == "dropped_uniform"
    assert buf.put(grp("diff", 0, rewards=(1.0, 1.0, -1.0)), version=0) == "admitted"
    assert buf.stats()["dropped_uniform"] == 2 and len(buf) == 1
    off = RolloutBuffer(max_staleness=0, dynamic_sampling=False)
    assert off.put(grp("same", 0, rewards=(1.0, 1.0)), version=0) == "admitted"


def test_capacity_follows_the_areal_formula():
    buf = RolloutBuffer(max_staleness=1)
    assert buf.capacity(version=0, batch_groups=4) == 8  # (1 + 0 + 1) * 4
    for i in range(3):
        buf.put(grp(i, 0), version=0)
    buf.put(grp("u", 0, rewards=(1.0, 1.0)), version=0)  # dropped by dynamic sampling: frees its slot
    assert buf.capacity(version=0, batch_groups=4, running=2) == 8 - 3 - 2
    buf.get_batch(2, version=0)
    assert buf.capacity(version=1, batch_groups=4) == 12 - 2 - 1


def _run(buf, rng, steps, version, uid0, trained, ckpt_at=None):
    """A seeded rollout/trainer interleaving: each step a few groups arrive (some uniform, some from a lagging
    engine) and the trainer takes a batch when one is ready, advancing the version. Returns (version, next uid,
    state at ckpt_at)."""
    state, uid = None, uid0
    for step in range(steps):
        for _ in range(rng.randint(0, 4)):
            lag = rng.choice([0, 0, 1, 2, 3, 4])
            rewards = rng.choice([(1.0, 0.0, 1.0), (1.0, 1.0, 1.0), (0.0, -1.0, 1.0)])
            buf.put(grp(f"g{uid}", max(0, version - lag), rewards, span=min(lag, 1)), version)
            uid += 1
        batch = buf.get_batch(3, version)
        if batch is not None:
            for g in batch:
                assert version - g.oldest <= buf.max_staleness
                trained.append(g.uid)
            version += 1
        buf.check()
        if step == ckpt_at:
            f = io.BytesIO()
            torch.save({"buffer": buf.state_dict(), "version": version, "uid": uid, "rng": rng.getstate()}, f)
            state = f.getvalue()
    return version, uid, state


def test_counters_add_up_and_resume_neither_repeats_nor_loses_a_group():
    # one uninterrupted run
    buf, trained = RolloutBuffer(max_staleness=2), []
    _run(buf, random.Random(0), 60, 0, 0, trained)
    s = buf.stats()
    assert s["generated"] == s["dropped_uniform"] + s["dropped_stale"] + s["trained"] + s["queued"]
    assert s["dropped_stale"] > 0 and s["dropped_uniform"] > 0 and s["trained"] > 20  # every path was exercised
    assert sum(s["staleness"].values()) == s["trained"] == len(trained) == len(set(trained))
    assert max(s["staleness"]) <= 2

    # the same run killed after step 29 (state saved there), resumed in a fresh buffer from the checkpoint
    first, rest = [], []
    _, _, blob = _run(RolloutBuffer(max_staleness=2), random.Random(0), 30, 0, 0, first, ckpt_at=29)
    ck = torch.load(io.BytesIO(blob), weights_only=True)  # plain data only: no pickled classes
    resumed = RolloutBuffer(max_staleness=2)
    resumed.load_state_dict(ck["buffer"])
    rng = random.Random()
    rng.setstate(ck["rng"])
    _run(resumed, rng, 30, ck["version"], ck["uid"], rest)
    assert first + rest == trained  # exactly the same groups, in the same order, none twice
    assert resumed.stats() == s
    queued = s["queued"]  # a trainer far ahead finds every queued group stale: dropped, counted, never trained
    assert queued > 0 and resumed.get_batch(1, version=10**6) is None
    assert resumed.stats()["dropped_stale"] == s["dropped_stale"] + queued and len(resumed) == 0
    with pytest.raises(ValueError, match="already put"):  # a resumed rollout replaying a group is refused
        resumed.put(grp("g3", 0), version=0)


def test_state_dict_round_trips_through_json_with_plain_data():
    buf = RolloutBuffer(max_staleness=3)
    buf.put(Group(7, [1, 0], [[2, 3], [3]], {"ids": [[1, 2], [3]]}), version=3)
    buf.put(Group("q", [0.5, 0.0], [[1], [1, 2]], {"ids": [[4], [5, 6]]}), version=3)
    buf.put(Group("u", [0.0, 0.0], [[3], [3]]), version=3)
    buf.get_batch(1, version=3)
    restored = RolloutBuffer(max_staleness=3)
    restored.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert restored.stats() == buf.stats()
    (g,) = restored.get_batch(1, version=3)
    assert (g.uid, g.rewards, g.versions, g.data) == (7, [1.0, 0.0], [[2, 3], [3]], {"ids": [[1, 2], [3]]})
    with pytest.raises(ValueError, match="already put"):
        restored.put(Group("u", [1.0, 0.0], [[3], [3]]), version=3)  # dropped groups are remembered too
    with pytest.raises(ValueError, match="format"):
        restored.load_state_dict({"format": 99})
