"""The Ray backend of `glm5 rl`: R rollout workers as Ray actors on the nodes of a cluster, behind the loop's
WorkerPool (glm5.rl.loop). The loop, the buffer and the trainer are the local backend's; what differs is where the
workers live and how weights travel.

- Each worker is an actor owning one RolloutWorker (engine, rollout, reward) and running the same `serve` loop as a
  local worker process, on a thread of the actor: `put` feeds its inbox, `drain` long-polls its outbox. The actor is
  threaded, so a `put` lands while a `drain` waits; Ray does not keep a threaded actor's calls in order, so every
  order carries a sequence number and the actor hands them to the loop in that order. Each actor reserves
  `num_cpus` = its engine's threads, and actors are spread over nodes (SPREAD) before they share one.
- Weights travel through the object store: one `ray.put` per push, and every worker pulls that same object (a node
  fetches it once; workers on that node map it read-only, and update_weights copies it into the engine). The object
  holds each tensor's bytes as a numpy array, which Ray stores out of band; a pickled torch tensor would be copied
  once more on each side. The newest push stays referenced, so a restarted worker gets it too.
- Load balancing: an order goes to the live worker with the fewest unfinished groups, and replies are taken from
  whichever worker answers first (ray.wait), so a slow worker delays only its own groups.
- Fault tolerance: a worker whose actor dies (its process killed, its node gone) or whose drain stops coming back
  (the health check: a drain returns every DRAIN_S seconds, with or without news) is replaced by a new actor that
  gets the newest weights before any order. Its unfinished groups go back to the loop as ("lost", gids), and the
  loop starts them again. A group reaches the driver whole, in one reply, so a lost group has no sample trained and
  a group that arrived is never started again.

The trainer is the driver process (one rank), or W > 1 ranks as Ray actors under DDP (glm5.rl.ray_trainer); the
driver keeps the buffer and the version counters either way. Every node opens the checkpoint directory itself
(--model and --tokenizer must be paths all nodes see, as on a shared file system), and imports the reward and
rollout-hook modules (Ray puts the driver's working directory on the workers' import path).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import traceback
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from .worker import RLError, WorkerConfig, serve

log = logging.getLogger("glm5.rl")

DRAIN_S = 1.0  # a drain answers after at most this long: the heartbeat the health check reads


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RLError(f"glm5 rl --backend ray: Ray is not installed ({e}); install it with pip install "
                      f"'glm5[rl]' (or pip install ray)") from None
    return ray


def check_ray(address: str | None, timeout: float = 5.0) -> None:
    """Ray imports, and a head answers at `address` (a TCP connect: ray.init itself retries an unreachable
    address for minutes before it gives up)."""
    import_ray()
    if not address or address in ("auto", "local"):
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise RLError(f"glm5 rl: --ray-address {address}: no Ray head answers there ({e.strerror or e}); start one "
                      f"with `ray start --head`, or leave --ray-address out to start Ray on this machine") from None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RLError(f"glm5 rl: --ray-address {address}: expected HOST:PORT (the address `ray start --head` "
                      f"prints), ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def pack(state_dict: dict) -> dict:
    """name -> (the tensor's bytes as a uint8 numpy array, dtype name, shape): what ray.put stores zero-copy. Bytes,
    not values, so bf16 and fp8 (no numpy dtype) travel unchanged."""
    out = {}
    for k, v in state_dict.items():
        t = v.detach().cpu().contiguous()
        out[k] = (t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return out


def unpack(packed: dict) -> dict:
    with warnings.catch_warnings():
        # the object store's arrays are read-only; update_weights only reads them
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(a).view(getattr(torch, dt)).reshape(shape) for k, (a, dt, shape) in packed.items()}


class RolloutActor:
    """One rollout worker: glm5.rl.worker.serve on a thread, orders in through `put`, replies out through `drain`."""

    def __init__(self, cfg: WorkerConfig, index: int):
        import ray

        self.inbox, self.outbox = queue.Queue(), queue.Queue()
        self.lock = threading.Lock()
        self.pending: dict[int, tuple] = {}
        self.next_seq = 0
        info = {"index": index, "node": ray.get_runtime_context().get_node_id()}
        self.thread = threading.Thread(target=serve, args=(cfg, self.inbox, self.outbox), kwargs={"info": info},
                                       daemon=True, name="glm5-rollout")
        self.thread.start()

    def put(self, seq: int, msg: tuple, weights: dict | None = None) -> None:
        """Order number seq; weights is the pushed object (Ray resolves the ObjectRef before this runs)."""
        try:
            if weights is not None:
                msg = (msg[0], msg[1], unpack(weights), msg[3])
            with self.lock:
                self.pending[seq] = msg
                while self.next_seq in self.pending:
                    self.inbox.put(self.pending.pop(self.next_seq))
                    self.next_seq += 1
        except Exception:  # noqa: BLE001 -- the driver reads it from the outbox and stops the run
            self.outbox.put(("error", traceback.format_exc()))

    def drain(self, wait_s: float) -> list:
        """The replies waiting, after waiting up to wait_s for the first."""
        try:
            out = [self.outbox.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self.outbox.get_nowait())
            except queue.Empty:
                return out


@dataclass
class _Slot:
    """Worker number `index` and the actor that is it now (a new one after each restart)."""
    index: int
    actor: object
    started: float
    seq: int = 0  # the next order's sequence number
    drain: object = None  # the ObjectRef of the drain in flight
    drain_sent: float = 0.0
    ready: bool = False
    info: dict = field(default_factory=dict)
    outstanding: set = field(default_factory=set)  # gids sent and not come back
    groups: int = 0  # groups it returned
    version: int | None = None  # the newest weights it acknowledged
    restarts: int = 0


class RayPool:
    """R rollout workers as Ray actors; the glm5.rl.loop.WorkerPool interface. Joins the cluster at `address`, or
    starts Ray here with exactly the CPUs the workers reserve, plus `other_cpus` for the run's other actors (the
    trainer ranks, glm5.rl.ray_trainer), when there is none, unless this process is connected already; it
    disconnects at stop() only what it connected."""

    def __init__(self, cfg: WorkerConfig, n: int, address: str | None = None, ready_timeout: float = 600.0,
                 health_timeout: float = 60.0, max_restarts: int | None = None, other_cpus: int = 0):
        ray = self.ray = import_ray()
        self.cfg, self.n = cfg, n
        self.ready_timeout, self.health_timeout = ready_timeout, health_timeout
        self.max_restarts = 4 * n if max_restarts is None else max_restarts
        self.connected = not ray.is_initialized()
        if self.connected:
            try:
                if address:
                    ray.init(address=address)
                else:
                    ray.init(num_cpus=n * cfg.threads + other_cpus, include_dashboard=False)
            except Exception as e:  # noqa: BLE001 -- ConnectionError, RuntimeError, ValueError: one line either way
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                where = f"--ray-address {address}: cannot join the Ray cluster" if address else "cannot start Ray"
                raise RLError(f"glm5 rl: {where} ({first})") from None
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < n * cfg.threads + other_cpus:  # an autoscaler may add nodes; a fixed cluster never will
            log.warning("rl: the Ray cluster has %g CPUs and %d rollout workers reserve %d each (and the trainer "
                        "ranks %d): some wait for more nodes (or give fewer --rollout-threads, --train-threads)",
                        cpus, n, cfg.threads, other_cpus)
        self.cls = ray.remote(RolloutActor)
        self.weights: tuple[int, object] | None = None  # the newest push: (version, ObjectRef)
        self.replies: deque = deque()
        self.restarts = 0
        self.stopped: dict | None = None
        try:
            self.slots = [self._start(i) for i in range(n)]
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("rl: %d rollout workers on %d nodes", n, len({s.info.get("node") for s in self.slots}))

    # -- the WorkerPool interface ---------------------------------------------------------------------------------
    def push(self, version: int, state_dict: dict) -> None:
        t = time.time()
        ref = self.ray.put(pack(state_dict))  # a copy in the object store: the trainer may change its own now
        self.weights = (version, ref)
        for s in self.slots:
            self._send(s, ("weights", version, None, t), ref)

    def submit(self, orders: list) -> None:
        by_slot = defaultdict(list)
        for order in orders:
            live = [s for s in self.slots if s.ready] or self.slots  # a restarting worker waits for its engine
            s = min(live, key=lambda s: (len(s.outstanding), s.index))
            s.outstanding.add(order[0])
            by_slot[s.index].append(order)
        for i, batch in by_slot.items():
            self._send(self.slots[i], ("generate", batch))

    def get(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no rollout worker sent anything in {timeout:.0f} s")
            self._poll(min(left, 5.0))
        return self.replies.popleft()

    def stop(self) -> dict:
        if self.stopped is not None:
            return self.stopped
        ray, infos = self.ray, {}
        slots = getattr(self, "slots", [])
        try:
            for s in slots:
                self._send(s, ("stop",))
            deadline = time.monotonic() + 30
            while len(infos) < len(slots) and time.monotonic() < deadline:
                refs = {s.drain: s for s in slots if s.index not in infos}
                done, _ = ray.wait(list(refs), num_returns=1, timeout=deadline - time.monotonic())
                for ref in done:
                    s = refs[ref]
                    try:
                        replies = ray.get(ref)
                    except ray.exceptions.RayError:
                        infos[s.index] = {}
                        continue
                    for r in replies:
                        if r[0] == "pushed":  # a push that landed before the stop
                            s.version = r[1]
                        elif r[0] == "stopped":
                            infos[s.index] = r[1]
                    if s.index not in infos:
                        self._drain(s)
        except Exception:  # noqa: BLE001 -- stopping must not hide the error that stopped the run
            log.warning("rl: stopping the rollout workers failed", exc_info=True)
        for s in slots:
            try:
                ray.kill(s.actor)
            except Exception:  # noqa: BLE001 -- already dead
                pass
        workers = [{"index": s.index, "node": s.info.get("node"), "pid": s.info.get("pid"), "groups": s.groups,
                    "restarts": s.restarts, "version": s.version, **infos.get(s.index, {})} for s in slots]
        mean = {k: sum(w.get(k, 0.0) for w in workers) / max(1, len(workers)) for k in ("busy_s", "idle_s")}
        self.stopped = {**mean, "workers": workers}
        if self.connected and ray.is_initialized():
            ray.shutdown()
        return self.stopped

    # -- workers ----------------------------------------------------------------------------------------------------
    def wait_ready(self) -> None:
        """Take the replies in (they wait for get()), then block until every worker's engine is up (a restarted
        one's too)."""
        self._poll(DRAIN_S)
        while not all(s.ready for s in self.slots):
            self._poll(DRAIN_S)

    def _start(self, index: int) -> _Slot:
        actor = self.cls.options(num_cpus=self.cfg.threads, max_concurrency=4, scheduling_strategy="SPREAD",
                                 name=None).remote(self.cfg, index)
        s = _Slot(index, actor, started=time.monotonic())
        self._drain(s)
        if self.weights is not None:  # a restarted worker: the newest weights before any order
            self._send(s, ("weights", self.weights[0], None, time.time()), self.weights[1])
        return s

    def _send(self, s: _Slot, msg: tuple, weights=None) -> None:
        s.actor.put.remote(s.seq, msg, weights)  # a failure shows at the next drain (or the actor's death)
        s.seq += 1

    def _drain(self, s: _Slot) -> None:
        s.drain, s.drain_sent = s.actor.drain.remote(DRAIN_S), time.monotonic()

    def _poll(self, wait_s: float) -> None:
        """Take the replies of every worker that answered within wait_s; replace the dead and the silent."""
        ray = self.ray
        refs = {s.drain: s for s in self.slots}
        done, _ = ray.wait(list(refs), num_returns=1, timeout=wait_s)
        if done:  # and every other that is in by now
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in done:
            s = refs[ref]
            try:
                replies = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # ActorDiedError: its process or node is gone
                self._replace(s, (str(e).strip().splitlines() or [type(e).__name__])[0])
                continue
            self._drain(s)
            for r in replies:
                self._handle(s, r)
        now = time.monotonic()
        for s in list(self.slots):
            if s.ready and now - s.drain_sent > self.health_timeout + DRAIN_S:
                self._replace(s, f"no answer in {self.health_timeout:.0f} s")
            elif not s.ready and now - s.started > self.ready_timeout:
                raise RLError(f"glm5 rl: rollout worker {s.index} did not start in {self.ready_timeout:.0f} s: Ray "
                              f"found no node with {self.cfg.threads} free CPUs for it, or its engine did not load")

    def _handle(self, s: _Slot, r: tuple) -> None:
        kind = r[0]
        if kind == "ready":
            s.ready, s.info = True, r[1]
        elif kind == "group":
            s.outstanding.discard(r[1])
            s.groups += 1
            self.replies.append((*r, s.index))
        elif kind == "pushed":
            s.version = r[1]
            self.replies.append(r)
        elif kind == "error":
            raise RuntimeError(f"rollout worker {s.index} (node {s.info.get('node')}) failed:\n{r[1]}")

    def _replace(self, s: _Slot, reason: str) -> None:
        """A new actor for worker s.index; its unfinished groups go back to the loop."""
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RLError(f"glm5 rl: rollout workers failed {self.restarts} times, the limit is {self.max_restarts} "
                          f"(the last: worker {s.index}: {reason})")
        try:
            self.ray.kill(s.actor)  # dead already, or silent: it must not come back with old groups
        except Exception:  # noqa: BLE001
            pass
        lost = sorted(s.outstanding)
        log.warning("rl: rollout worker %d (node %s, pid %s) lost: %s; restarting it, %d groups to start again",
                    s.index, s.info.get("node"), s.info.get("pid"), reason, len(lost))
        new = self._start(s.index)
        new.restarts, new.groups = s.restarts + 1, s.groups
        self.slots[s.index] = new
        if lost:
            self.replies.append(("lost", lost, f"worker {s.index}: {reason}"))
