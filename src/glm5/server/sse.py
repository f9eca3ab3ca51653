"""Server-sent events and client-disconnect handling.

`SSEResponse` streams a body while listening for the client's disconnect (Starlette does so only for ASGI spec
< 2.4; here always), and runs `on_close` however the stream ends: finished, client gone, or cancelled by a server
shutdown. That is what frees a vanished client's cache blocks: on_close aborts the run. Leaving the generator to
the garbage collector would free them at some unknown later time.

Once a stream has started, its status (200) is sent: an error after that can only be told in the stream. The body
is wrapped so that any exception the generator raises ends the stream as OpenAI's does, with an error event and
`data: [DONE]`, rather than a torn connection (which clients report as a network error and retry). The same when
the server cancels the stream: on SIGTERM uvicorn drains, and when `--drain-timeout` expires it cancels the requests
still running; a stream then ends with a 503 `server_shutting_down` error event and `[DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .protocol import APIError

log = logging.getLogger("glm5.server")


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _guarded(body: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in body:
            yield event
    except Exception as e:
        log.exception("error inside a stream")
        err = e if isinstance(e, APIError) else APIError(500, f"internal server error: {type(e).__name__}: {e}",
                                                         code="internal_error")
        yield sse(json.dumps(err.body()))
        yield sse("[DONE]")
    finally:
        await body.aclose()


def shutdown_error() -> APIError:
    """What a request still running when the drain timeout expires is told (stream event or JSON body)."""
    return APIError(503, "The server is shutting down and its drain timeout (--drain-timeout) expired before this "
                         "response finished; retry the request.", code="server_shutting_down")


# How long the final events of a cancelled stream may take to write: a client that stopped reading must not hold
# up the shutdown.
FINAL_WRITE_S = 2.0


class SSEResponse(StreamingResponse):
    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(_guarded(body), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        sent = {"start": False, "end": False}

        async def send_tracked(msg):
            await send(msg)
            if msg["type"] == "http.response.start":
                sent["start"] = True
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                sent["end"] = True

        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send_tracked)
                    except OSError:  # the client went away while we wrote
                        pass
                    tg.cancel_scope.cancel()

                async def listen():
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        except anyio.get_cancelled_exc_class():
            # Our own scope's cancel (finished, client gone) never escapes the task group: a cancellation here
            # comes from outside, i.e. uvicorn ending the requests still running when the drain timeout expired.
            # The stream ends as any failed stream does. The cancellation is not re-raised: this task's only work
            # is this response, which is now complete (re-raising would only make uvicorn log a traceback and close
            # a connection that is closing anyway).
            if not sent["end"]:
                with anyio.move_on_after(FINAL_WRITE_S, shield=True):
                    await self._send_final(send_tracked, sent["start"])
        finally:
            self.on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()

    async def _send_final(self, send, started: bool):
        if not started:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        events = sse(json.dumps(shutdown_error().body())) + sse("[DONE]")
        try:
            await send({"type": "http.response.body", "body": events.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone too
            pass


async def until_disconnected(request: Request, work: Awaitable) -> object | None:
    """Run `work`; if the client disconnects first, cancel it and return None. Exceptions of `work` propagate
    as themselves (not wrapped in an ExceptionGroup)."""
    result: list = []
    error: list = []

    async def run(tg):
        try:
            result.append(await work)
        except Exception as e:
            error.append(e)
        tg.cancel_scope.cancel()

    async def listen(tg):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg)
        tg.start_soon(listen, tg)
    if error:
        raise error[0]
    return result[0] if result else None
