"""The trainer as W ranks on Ray (`glm5 rl --backend ray --trainer-ranks W`, W > 1): W actors in one torch.distributed
process group (gloo), each training on its share of every batch with glm5.rl.trainer.train_step under DDP.

- Each rank is an actor holding a replica of the model and its optimizer (loaded from --model like the driver's,
  or from the checkpoint a resumed run continues) and reserving `num_cpus` = its threads (--train-threads).
- Rendezvous: rank 0 picks a free TCP port on its node, and the driver hands (address, port) to every rank, which
  joins the process group there: no fixed port, nothing set in the environment. Gloo runs on CPU, which is where
  the RL trainer runs.
- A step: the driver puts the batch in the object store once and every rank reads all of it; each computes the
  global token count from it (so the token-level normalisation needs no collective), trains on its share
  (glm5.rl.trainer.shard, balanced by tokens), DDP averages the gradients (each backward scaled by W to undo the
  average), and every rank clips the same gradients and steps the same replica. Rank 0 returns the statistics,
  summed over ranks, and its new weights, which the driver copies into its own model: the one it pushes to the
  rollout workers and exports at the end.
- Checkpoints: rank 0 writes them with the loop's state from the driver (buffer, counters), through the same
  function as a one-rank run, so they hold the same and a run may resume with any W. A resumed run's ranks each
  read the checkpoint's weights, optimizer state and RNG, so the checkpoint directory must be one all their nodes
  see.
- A rank that dies or a step that raises stops the run (the loop's TrainerFailed); `--resume auto` continues from
  the last checkpoint. Ranks are not restarted: a step that failed half-way may have left the replicas apart.

Against one rank the results differ only by rounding: the same terms are summed, in another fp32 order (each rank
sums its own tokens' gradients, then DDP sums the ranks'), over micro-batches of other shapes.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch

from .ray_backend import pack, unpack
from .trainer import RLTrainConfig, ddp_policy_loss, load_state, make_optimizer, save_state, train_step


class TrainerRank:
    """One rank: a replica of the model and its optimizer; DDP once the process group is up (join)."""

    def __init__(self, model: str, tokenizer: str | None, cfg: RLTrainConfig, rank: int, world: int, threads: int):
        from ..loader import load

        torch.set_num_threads(threads)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.model = load(model, tokenizer_dir=tokenizer).model.float()
        self.opt = make_optimizer(self.model, cfg)
        self.net = None

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it now: where the process group meets (rank 0's)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int, resume: str | None, timeout_s: float) -> None:
        """Join the process group at host:port (every rank at once: it returns when all have), after loading the
        checkpoint `resume` if given."""
        import torch.distributed as dist

        from ..train import checkpoint as ckpt

        if resume:
            load_state(resume, ckpt.load(resume), self.model, self.opt)
        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=timeout_s))
        self.net = ddp_policy_loss(self.model, self.cfg)

    def step(self, groups: list) -> tuple[dict, dict | None]:
        """One optimizer step on this rank's share of the groups -> (statistics, rank 0's packed weights)."""
        stats = train_step(self.model, self.opt, groups, self.cfg, net=self.net, rank=self.rank, world=self.world)
        return stats, pack(self.model.state_dict()) if self.rank == 0 else None

    def save(self, root: str, step: int, rl_state: dict, keep_last: int) -> str:
        return str(save_state(root, step, self.model, self.opt, rl_state, keep_last))


class TrainerGroup:
    """W TrainerRank actors, driven from the loop: step(batch), save(...), stop()."""

    def __init__(self, model: str, tokenizer: str | None, cfg: RLTrainConfig, world: int, threads: int,
                 resume: str | None = None, ready_timeout: float = 600.0, timeout_s: float = 1800.0):
        """timeout_s: how long a collective waits for a rank (torch.distributed's timeout)."""
        import ray

        from .worker import RLError

        self.ray = ray
        cls = ray.remote(TrainerRank)
        self.actors = [cls.options(num_cpus=threads).remote(model, tokenizer, cfg, r, world, threads)
                       for r in range(world)]
        try:
            host, port = ray.get(self.actors[0].address.remote(), timeout=ready_timeout)
            self._all([a.join.remote(host, port, resume, timeout_s) for a in self.actors], ready_timeout)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise RLError(f"glm5 rl: the {world} trainer ranks did not start in {ready_timeout:.0f} s: Ray found no "
                          f"node with {threads} free CPUs for each (--train-threads)") from None
        except BaseException:
            self.stop()
            raise

    def step(self, groups: list) -> tuple[dict, dict]:
        """-> (the step's statistics, the new weights as a state dict)."""
        ref = self.ray.put(groups)  # one copy in the object store, read by every rank
        (stats, packed), *_ = self._all([a.step.remote(ref) for a in self.actors])
        return stats, unpack(packed)

    def save(self, root, step: int, rl_state: dict, keep_last: int):
        from pathlib import Path

        return Path(self.ray.get(self.actors[0].save.remote(str(root), step, rl_state, keep_last)))

    def stop(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 -- already dead
                pass

    def _all(self, refs: list, timeout: float | None = None) -> list:
        """Every rank's result, raising the first failure as soon as it comes (the other ranks would wait for the
        failed one in their next collective until the process group's timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = self.ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise self.ray.exceptions.GetTimeoutError(f"no answer in {timeout:.0f} s")
            self.ray.get(done[0])
        return self.ray.get(refs)
