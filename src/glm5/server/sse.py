"""Server-sent events and client-disconnect handling.

`SSEResponse` streams a body while listening for the client's disconnect (Starlette does so only for ASGI spec
< 2.4; here always), and runs `on_close` however the stream ends: finished, client gone, or cancelled by a server
shutdown. That is what frees a vanished client's cache blocks: on_close aborts the run. Leaving the generator to
the garbage collector would free them at some unknown later time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse


def sse(data: str) -> str:
    return f"data: {data}\n\n"


class SSEResponse(StreamingResponse):
    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we wrote
                        pass
                    tg.cancel_scope.cancel()

                async def listen():
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        finally:
            self.on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


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
