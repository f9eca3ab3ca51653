"""The rollout buffer between rollout and trainer: groups in, oldest-first batches out, under a bound on staleness.

A group is the G samples of one prompt. Every generated token carries the policy version that sampled it (the
engine swaps weights mid-flight, so one sample can span versions). The staleness of a group trained by policy
version v is v - (its oldest token's version). With bound tau (`max_staleness`), a group is admitted only while
v_now - oldest <= tau, and checked again when a batch is drawn, so no group is ever trained staler than tau, however
slow the trainer (AReaL's admission control, areal/infra/staleness_manager.py; PRIME-RL's max_off_policy_steps).
tau = 0 is synchronous on-policy training.

Batches are drawn oldest first: dropping whatever turned stale starves slow, hard prompts (tinker-cookbook's
experience), so the groups nearest the bound go first. `capacity` tells the rollout side how many more groups it may
start so that they will not go stale (AReaL's formula), which keeps drops rare in the first place.

Dynamic sampling (DAPO; slime's dynamic-sampling filter): a group whose rewards are all equal has zero advantage
for every sample and carries no gradient; it is dropped on arrival and counted, and the rollout over-samples to
refill (capacity does not count it).

Every group is counted exactly once: generated = dropped_uniform + dropped_stale + trained + queued. The counters,
the histogram, the queue and the set of group uids ever put go into state_dict (plain Python and tensors: loadable
with torch.load(weights_only=True)), so a resumed run neither trains a group twice (a uid put again is refused) nor
loses one (the queue comes back), and the staleness bound still holds after resume (it is checked against the
trainer's version at every draw, not remembered). The buffer is thread-safe: rollout and trainer threads share it.

Letters: G samples of one group, T tokens of one sample.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

FORMAT = 1
COUNTERS = ("generated", "admitted", "dropped_stale", "dropped_uniform", "trained")


@dataclass
class Group:
    """One prompt's G samples. versions[i] holds the policy version of each generated token of sample i (a list of
    ints or a tensor [T_i]). data carries what the trainer needs (token ids, behaviour log-probs, loss masks) and
    must be plain Python / tensors for the buffer's state_dict to stay loadable with weights_only=True."""
    uid: str | int
    rewards: Sequence[float]  # [G]
    versions: Sequence[Sequence[int] | torch.Tensor]  # [G][T_i]
    data: dict = field(default_factory=dict)

    @property
    def oldest(self) -> int:
        """The version of the oldest token of any sample: the one the staleness bound is measured from."""
        mins = [int(torch.as_tensor(v).min()) for v in self.versions if len(v)]
        if not mins:
            raise ValueError(f"group {self.uid!r} has no generated token, so no policy version to bound")
        return min(mins)

    def to_dict(self) -> dict:
        return {"uid": self.uid, "rewards": [float(r) for r in self.rewards], "versions": list(self.versions),
                "data": self.data}


class RolloutBuffer:
    """A FIFO of groups ordered by their oldest token's version; see the module docstring."""

    def __init__(self, max_staleness: int, dynamic_sampling: bool = True):
        if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
            raise ValueError(f"max_staleness must be an integer >= 0 (0 = synchronous on-policy; tau = how many "
                             f"policy versions the trainer may be ahead of a sample's oldest token), "
                             f"got {max_staleness!r}")
        self.max_staleness, self.dynamic_sampling = max_staleness, dynamic_sampling
        self._lock = threading.Lock()
        self._queue: list[tuple[int, int, Group]] = []  # (oldest version, arrival seq, group), kept sorted
        self._seq = 0
        self._seen: set = set()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.histogram: Counter = Counter()  # staleness at training -> number of groups

    # -- rollout side -----------------------------------------------------------------------------------------------
    def put(self, group: Group, version: int) -> str:
        """Offer a finished group while the trainer is at `version` (the version its next optimizer step starts
        from). Returns what happened: "admitted", "dropped_stale" or "dropped_uniform"."""
        rewards = [float(r) for r in group.rewards]
        if not rewards or any(r != r or r in (float("inf"), float("-inf")) for r in rewards):
            raise ValueError(f"group {group.uid!r}: rewards must be a non-empty list of finite numbers (skip "
                             f"samples whose reward failed before putting the group), got {rewards!r}")
        if len(group.versions) != len(rewards):
            raise ValueError(f"group {group.uid!r}: {len(rewards)} rewards but {len(group.versions)} version lists "
                             f"(one per sample)")
        oldest = group.oldest
        if oldest > version:
            raise ValueError(f"group {group.uid!r} has a token of policy version {oldest}, newer than the trainer's "
                             f"{version}: versions must come from the trainer's own counter")
        with self._lock:
            if group.uid in self._seen:
                raise ValueError(f"group uid {group.uid!r} was already put into this buffer (or the run it resumes): "
                                 f"putting it again would train it twice")
            self._seen.add(group.uid)
            self.counts["generated"] += 1
            if version - oldest > self.max_staleness:
                outcome = "dropped_stale"
            elif self.dynamic_sampling and len(set(rewards)) == 1:
                outcome = "dropped_uniform"
            else:
                outcome = "admitted"
                self._insert(oldest, group)
            self.counts[outcome] += 1
            return outcome

    def _insert(self, oldest: int, group: Group) -> None:
        entry = (oldest, self._seq, group)
        self._seq += 1
        i = len(self._queue)
        while i > 0 and self._queue[i - 1][:2] > entry[:2]:  # groups mostly arrive in order: a short walk back
            i -= 1
        self._queue.insert(i, entry)

    def capacity(self, version: int, batch_groups: int, running: int = 0) -> int:
        """How many more groups the rollout may start now without any of them going stale, if the trainer takes
        batch_groups groups per version: (max_staleness + version + 1) * batch_groups - (trained + queued +
        running) (AReaL's StalenessManager). Groups dropped by dynamic sampling free their slot: over-sampling."""
        with self._lock:
            used = self.counts["trained"] + len(self._queue) + running
        return max(0, (self.max_staleness + version + 1) * batch_groups - used)

    # -- trainer side -----------------------------------------------------------------------------------------------
    def _drop_stale(self, version: int) -> None:
        keep = [e for e in self._queue if version - e[0] <= self.max_staleness]
        self.counts["dropped_stale"] += len(self._queue) - len(keep)
        self._queue = keep

    def get_batch(self, n: int, version: int) -> list[Group] | None:
        """The n oldest admissible groups for the optimizer step that starts from `version`, or None (nothing
        taken) while fewer than n are queued. Groups that turned stale while queued are dropped first."""
        if n <= 0:
            raise ValueError(f"batch size must be >= 1 group, got {n}")
        with self._lock:
            self._drop_stale(version)
            if len(self._queue) < n:
                return None
            batch, self._queue = self._queue[:n], self._queue[n:]
            self.counts["trained"] += n
            for oldest, _, _ in batch:
                self.histogram[version - oldest] += 1
            return [g for _, _, g in batch]

    def __len__(self) -> int:
        return len(self._queue)

    def stats(self) -> dict:
        """Counters, queue length and the staleness histogram, e.g. for metrics.jsonl."""
        with self._lock:
            return {**self.counts, "queued": len(self._queue), "staleness": dict(sorted(self.histogram.items()))}

    def check(self) -> None:
        """Raise if a group was lost or counted twice: every generated group is dropped, trained or queued, and the
        admitted ones are among the trained, the queued and those that went stale in the queue."""
        with self._lock:
            c, queued = self.counts, len(self._queue)
            ok = (c["generated"] == c["dropped_uniform"] + c["dropped_stale"] + c["trained"] + queued
                  and c["trained"] + queued <= c["admitted"] <= c["generated"] - c["dropped_uniform"])
        if not ok:
            raise AssertionError(f"rollout buffer counters do not add up: {self.stats()}")

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        with self._lock:
            return {"format": FORMAT, "max_staleness": self.max_staleness, "dynamic_sampling": self.dynamic_sampling,
                    "counts": dict(self.counts), "histogram": [[s, n] for s, n in sorted(self.histogram.items())],
                    "queue": [g.to_dict() for _, _, g in self._queue], "seen": sorted(self._seen, key=str),
                    "seq": self._seq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters, histogram, queue and seen uids. max_staleness stays the constructor's: a resumed run may
        tighten or loosen the bound, and the queue is re-checked against it at the next draw."""
        if state.get("format") != FORMAT:
            raise ValueError(f"rollout buffer state has format {state.get('format')!r}, this code reads {FORMAT}")
        missing = [k for k in ("counts", "histogram", "queue", "seen", "seq") if k not in state]
        if missing or set(state["counts"]) != set(COUNTERS):
            raise ValueError(f"rollout buffer state is missing {', '.join(missing) or 'counters'} (expected counters "
                             f"{', '.join(COUNTERS)})")
        with self._lock:
            self.counts = {k: int(state["counts"][k]) for k in COUNTERS}
            self.histogram = Counter({int(s): int(n) for s, n in state["histogram"]})
            self._seen = set(state["seen"])
            self._queue, self._seq = [], 0
            for d in state["queue"]:
                g = Group(d["uid"], d["rewards"], d["versions"], d["data"])
                self._insert(g.oldest, g)
            self._seq = max(self._seq, int(state["seq"]))
