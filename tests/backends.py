"""Real backends for the tests, each on its own thread and event loop, on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web


class LoopThread:
    """An asyncio loop on a daemon thread, for servers the test talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[object], timeout: float = 10) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close_server(self, server: asyncio.base_events.Server) -> None:
        """Close a server from its own loop: asyncio servers are not thread-safe."""

        async def close() -> None:
            server.close()

        self.run(close())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


#: how long a gated response waits for the test before it sends the rest anyway
GATE_TIMEOUT = 10.0
#: what a gated response sends last when nobody opened its gate in time
GATE_TIMED_OUT = b"gate timed out"


@dataclass
class EchoBackend:
    address: str
    peers: set[tuple[str, int]] = field(default_factory=set)
    stop: Callable[[], None] = lambda: None
    #: `/gated?key=K` sends its first chunk, then waits for ``gates[K]`` before the last
    gates: dict[str, threading.Event] = field(default_factory=dict)

    def gate(self, key: str) -> threading.Event:
        return self.gates.setdefault(key, threading.Event())

    @property
    def connections(self) -> int:
        """Distinct client connections seen (the proxy's pool size, in effect)."""
        return len(self.peers)


def start_echo_backend() -> EchoBackend:
    loop = LoopThread()
    backend = EchoBackend(address="")

    @web.middleware
    async def track(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.transport is not None:
            backend.peers.add(request.transport.get_extra_info("peername")[:2])
        return await handler(request)

    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({
            "method": request.method,
            "path": request.path_qs,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_size": size,
            "body_sha256": digest.hexdigest(),
            "chunked": request.headers.get("transfer-encoding", "").lower() == "chunked",
        })

    async def stream(request: web.Request) -> web.StreamResponse:
        chunks = int(request.query.get("chunks", "5"))
        size = int(request.query.get("size", "1024"))
        delay = float(request.query.get("delay_ms", "0")) / 1000
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(chunks):
            await response.write(bytes([65 + i % 26]) * size)
            if delay:
                await asyncio.sleep(delay)
        await response.write_eof()
        return response

    async def gated(request: web.Request) -> web.StreamResponse:
        """One chunk, then the last only once the test has seen the first (or after
        GATE_TIMEOUT, marked): a proxy that buffers the body cannot pass this."""
        gate = backend.gate(request.query["key"])
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first chunk;")
        deadline = asyncio.get_running_loop().time() + GATE_TIMEOUT
        while not gate.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await response.write(b"last chunk" if gate.is_set() else GATE_TIMED_OUT)
        await response.write_eof()
        return response

    async def sized(request: web.Request) -> web.Response:
        size = int(request.query.get("size", "1024"))
        return web.Response(body=b"x" * size, content_type="application/octet-stream")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("ms", "500")) / 1000)
        return web.Response(text="slow done")

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application(middlewares=[track], client_max_size=1024**3)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/gated", gated)
    app.router.add_get("/bytes", sized)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", websocket)

    runner = web.AppRunner(app, access_log=None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    loop.run(start())
    backend.address = f"127.0.0.1:{sock.getsockname()[1]}"

    def stop() -> None:
        loop.run(runner.cleanup())
        loop.close()

    backend.stop = stop
    return backend


class TcpEchoServer:
    """Echoes bytes; when the client half-closes, it answers with a byte count and closes."""

    def __init__(self) -> None:
        self.loop = LoopThread()
        self.server: asyncio.base_events.Server | None = None

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0
            while data := await reader.read(65536):
                total += len(data)
                writer.write(data)
                await writer.drain()
            # The client finished sending (half-close): say how much arrived, then close.
            writer.write(f"\nreceived {total} bytes\n".encode())
            await writer.drain()
            writer.close()

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(handle, "127.0.0.1", 0)

        self.server = self.loop.run(start())  # type: ignore[assignment]
        assert self.server is not None
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.loop.close_server(self.server)
        self.loop.close()


class BannerServer:
    """A server-speaks-first protocol (like SMTP or MySQL): greets, then echoes a line."""

    def __init__(self) -> None:
        self.loop = LoopThread()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 banner ready\r\n")
            await writer.drain()
            line = await reader.readline()
            writer.write(b"you said " + line)
            await writer.drain()
            writer.close()

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(handle, "127.0.0.1", 0)

        self.server: asyncio.base_events.Server = self.loop.run(start())  # type: ignore[assignment]
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.loop.close_server(self.server)
        self.loop.close()
