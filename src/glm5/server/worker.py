"""The engine thread: one thread owns the (not thread-safe) Engine; the event loop talks to it through a command
queue one way and `loop.call_soon_threadsafe` the other.

Why a thread and not an asyncio task: a step is CPU-bound torch work (tens of milliseconds to seconds); on the
event loop it would stall every connection, health check and disconnect notice for its duration. torch releases
the GIL inside its kernels, so the loop keeps serving while the thread computes.

Protocol:
  - `await worker.add(prompt_ids, params, request_id, sink_queue)` queues an add; the thread calls
    `engine.add_request` between steps and resolves the awaitable (or raises the engine's RequestError /
    ValueError into the caller: a bad request, the caller's 400).
  - after every step, each request's StepOutputs of that step go to its sink queue as one list (one
    `call_soon_threadsafe` per step for all requests); a request's sink is dropped once its n samples finished.
  - `worker.abort(request_id)` is fire-and-forget: queued behind that request's add, so it works even before
    the add has run; the engine frees the blocks at once and reports finish_reason "abort".
  - a step that raises fails every request in flight: each sink receives an `EngineFailure`, their requests are
    aborted in the engine (best effort), and the thread keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..engine import SamplingParams

log = logging.getLogger("glm5.server")


class EngineFailure(RuntimeError):
    """The engine raised during a step; the request cannot complete (the server answers 500)."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    remaining: int  # samples not yet finished


def _resolve(fut: asyncio.Future, exc: BaseException | None):
    if not fut.done():
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _deliver(items: list[tuple[asyncio.Queue, object]]):
    for q, item in items:
        q.put_nowait(item)


class EngineWorker:
    def __init__(self, engine, name: str = "glm5-engine"):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # touched by the engine thread only
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.stats: dict = engine.stats()  # snapshot after the last step (replaced whole: safe to read anywhere)
        self.steps = 0
        self.busy_s = 0.0  # time spent inside engine.step()
        self.failures = 0

    # -- event-loop side -------------------------------------------------------------------------------------------
    def start(self):
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0):
        """Abort whatever is still in flight and end the thread (after the server drained its connections)."""
        if self._thread.is_alive():
            self._cmds.put(("stop",))
            self._thread.join(timeout)

    async def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sink: asyncio.Queue):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._thread.is_alive():
            raise EngineFailure("the engine thread is not running")
        self._cmds.put(("add", prompt_ids, params, request_id, _Sink(loop, sink, params.n), fut))
        await fut

    def abort(self, request_id: str):
        self._cmds.put(("abort", request_id))

    # -- engine thread ---------------------------------------------------------------------------------------------
    def _run(self):
        eng = self.engine
        while True:
            cmds = [] if eng.has_unfinished() else [self._cmds.get()]  # idle: sleep until a command comes
            while True:
                try:
                    cmds.append(self._cmds.get_nowait())
                except queue.Empty:
                    break
            for cmd in cmds:
                if cmd[0] == "stop":
                    self._shutdown()
                    return
                self._command(cmd)
            if eng.has_unfinished():
                self._step()

    def _command(self, cmd):
        if cmd[0] == "add":
            _, prompt, params, rid, sink, fut = cmd
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except Exception as e:  # RequestError / ValueError: the caller's bad request
                self._call(sink.loop, _resolve, fut, e)
                return
            self._sinks[rid] = sink
            self._call(sink.loop, _resolve, fut, None)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])  # its "abort" outputs come out of the next step() and reach the sink

    def _step(self):
        t0 = time.perf_counter()
        try:
            outs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the %d requests in flight", len(self._sinks))
            self.failures += 1
            self._fail_all(EngineFailure(f"engine step failed: {type(e).__name__}: {e}"))
            return
        self.busy_s += time.perf_counter() - t0
        self.steps += 1
        per_req: dict[str, list] = {}
        for o in outs:
            per_req.setdefault(o.request_id, []).append(o)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, group in per_req.items():
            sink = self._sinks.get(rid)
            if sink is None:  # aborted by its client: nobody listens
                continue
            errors = [o.error for o in group if getattr(o, "error", None)]
            if errors:  # the engine failed this request alone (bad logits, a failing stop check): say so, loudly
                self.failures += 1
                del self._sinks[rid]
                by_loop.setdefault(sink.loop, []).append((sink.queue, EngineFailure(errors[0])))
                continue
            sink.remaining -= sum(o.finished for o in group)
            if sink.remaining <= 0:
                del self._sinks[rid]
            by_loop.setdefault(sink.loop, []).append((sink.queue, group))
        self.stats = self.engine.stats()
        for loop, items in by_loop.items():
            self._call(loop, _deliver, items)

    def _fail_all(self, err: EngineFailure):
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, sink in self._sinks.items():
            try:
                self.engine.abort(rid)
            except Exception:  # the engine is already in trouble; the sink still has to hear about it
                log.exception("abort of %s after a failed step", rid)
            by_loop.setdefault(sink.loop, []).append((sink.queue, err))
        self._sinks.clear()
        for loop, items in by_loop.items():
            self._call(loop, _deliver, items)
        try:
            self.stats = self.engine.stats()
        except Exception:  # keep the last snapshot; the failure is logged above
            log.exception("engine stats after a failed step")

    def _shutdown(self):
        for rid in list(self._sinks):
            self.engine.abort(rid)
        if self._sinks:
            self._step()  # returns the aborts first: every waiter hears its request ended

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn, *args):
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: its waiters are gone
            pass
