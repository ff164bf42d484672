"""Backends whose behaviour a test changes while traffic flows: failing a share of requests,
adding latency, resetting connections, going down and coming back on the same port, and a
switchable health check. Each runs on its own thread and event loop (like tests/backends.py);
every control method is a plain, thread-safe call from the test.

- `ControlBackend`: HTTP/1.1 (aiohttp). Every response carries `x-served-by: <name>`.
- `ControlGrpcBackend`: grpcio with a generic handler for any method; fails a share of calls
  with a status (UNAVAILABLE by default), adds latency, records the deadline each call saw.
- `GrpcHeaderRecorder`: a bare HTTP/2 server (h2) that records every request's headers as
  sent on the wire (grpcio hides `grpc-timeout`) and answers each with gRPC status OK.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

from .deps import missing

try:
    import grpc
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    from aiohttp import web
except ImportError as e:
    missing(e)

from .backends import LoopThread  # noqa: E402 (after the dependency check)

SERVED_BY = "x-served-by"
REQUEST_ID = "x-request-id"
HEALTH_PATH = "/healthz"


def _reset_transport(transport: asyncio.BaseTransport | None) -> None:
    """Closes a connection with a TCP RST (SO_LINGER 0) rather than a FIN."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


class _Share:
    """Decides which requests get a behaviour: an exact, evenly spread share by default
    (0.5 → every second request), or independently at random."""

    def __init__(self) -> None:
        self.share = 0.0
        self.randomly = False
        self._seen = 0

    def set(self, share: float, randomly: bool = False) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, not {share}")
        self.share, self.randomly, self._seen = share, randomly, 0

    def pick(self) -> bool:
        if self.share <= 0:
            return False
        if self.randomly:
            return random.random() < self.share
        n = self._seen
        self._seen += 1
        return math.floor((n + 1) * self.share) > math.floor(n * self.share)


@dataclass(frozen=True)
class Received:
    """One request as the backend saw it (health checks excluded)."""

    method: str
    path: str
    request_id: str
    body_size: int
    body_sha256: str
    # What the backend did with it: an HTTP status, "reset", or "cancelled" (the client
    # went away, or the backend stopped, before the answer).
    outcome: int | str


class ControlBackend:
    """An HTTP backend on 127.0.0.1 whose behaviour the test changes at runtime.

    Any path except `/healthz` is "traffic": it reads the whole body, waits the configured
    latency (plus `?delay_ms=` if given), then resets the connection, fails with the
    configured status, or answers 200 with JSON describing what arrived. `/healthz` answers
    the switchable health status at once and is counted apart from traffic.
    """

    def __init__(self, name: str = "backend") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop = LoopThread()
        # Behaviour.
        self._fail = _Share()
        self._fail_status = 503
        self._reset = _Share()
        self._latency = 0.0
        self._health_status = 200
        # Observations.
        self._by_path: Counter[str] = Counter()
        self._outcomes: Counter[int | str] = Counter()
        self._received: list[Received] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._starts = 0
        # Serving state.
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._start(bind_port=0)

    # ---- behaviour -------------------------------------------------------------------

    def fail(self, share: float = 1.0, status: int = 503, *, randomly: bool = False) -> None:
        """Answer `share` of traffic requests with `status` (evenly spread unless `randomly`)."""
        with self._lock:
            self._fail.set(share, randomly)
            self._fail_status = status

    def set_latency(self, seconds: float) -> None:
        """Wait this long before answering each traffic request (health checks excepted)."""
        with self._lock:
            self._latency = seconds

    def reset_connections(self, share: float = 1.0, *, randomly: bool = False) -> None:
        """For `share` of traffic requests, read the request then reset the connection (RST)
        without answering: a crash mid-request, as the proxy sees it."""
        with self._lock:
            self._reset.set(share, randomly)

    def set_health(self, status: int) -> None:
        """The status `/healthz` answers with (200 by default)."""
        with self._lock:
            self._health_status = status

    def heal(self) -> None:
        """Back to normal: no failures, no latency, no resets, healthy."""
        with self._lock:
            self._fail.set(0.0)
            self._reset.set(0.0)
            self._latency = 0.0
            self._health_status = 200

    # ---- observations ----------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        """Every request received, health checks included."""
        with self._lock:
            return sum(self._by_path.values())

    @property
    def traffic(self) -> int:
        """Requests received other than health checks."""
        with self._lock:
            return sum(n for path, n in self._by_path.items() if path != HEALTH_PATH)

    @property
    def health_checks(self) -> int:
        return self.count(HEALTH_PATH)

    def count(self, path: str) -> int:
        with self._lock:
            return self._by_path[path]

    @property
    def by_path(self) -> Counter[str]:
        with self._lock:
            return Counter(self._by_path)

    @property
    def outcomes(self) -> Counter[int | str]:
        """What traffic requests got: status codes, "reset" and "cancelled"."""
        with self._lock:
            return Counter(self._outcomes)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most traffic requests this backend held at once since the last `reset_counts`."""
        with self._lock:
            return self._max_in_flight

    @property
    def running(self) -> bool:
        return self._runner is not None

    def reset_counts(self) -> None:
        with self._lock:
            self._by_path.clear()
            self._outcomes.clear()
            self._received.clear()
            self._max_in_flight = self._in_flight

    # ---- lifecycle -------------------------------------------------------------------

    def stop(self, *, graceful: bool = True, grace: float = 5.0) -> None:
        """Closes the listening socket, then the connections.

        Graceful: requests in flight finish (for up to `grace` seconds), idle keep-alive
        connections are closed. Abrupt: every connection is reset at once, handlers cancelled.
        """
        if self._runner is None:
            return
        runner, self._runner = self._runner, None

        async def stop() -> None:
            if graceful:
                await runner.cleanup()
                return
            for site in list(runner.sites):
                await site.stop()
            server = runner.server
            if server is not None:
                for handler in server.connections:
                    _reset_transport(handler.transport)
            await asyncio.sleep(0)  # let connection_lost cancel the handlers
            await runner.cleanup()

        self._loop.run(stop(), timeout=grace + 10)

    def start(self) -> None:
        """Listens again on the same port (after `stop`)."""
        if self._runner is None:
            self._start(bind_port=self.port)

    def restart(self, down_for: float = 0.0, *, graceful: bool = True) -> None:
        self.stop(graceful=graceful)
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Final stop (abrupt: a test's teardown waits for no slow handler)."""
        self.stop(graceful=False)
        self._loop.close()

    def __enter__(self) -> ControlBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ControlBackend({self.name!r}, {self.address}, running={self.running})"

    # ---- the server ------------------------------------------------------------------

    def _start(self, bind_port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                sock.bind(("127.0.0.1", bind_port))
                break
            except OSError:
                # Rebinding a port just released: a lingering socket may hold it briefly.
                if bind_port == 0 or time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.02)
        self.port = sock.getsockname()[1]
        # handler_cancellation: a reset or a client that gives up cancels the handler,
        # as it would kill work in a real server's request context.
        runner = web.AppRunner(self._app(), access_log=None, handler_cancellation=True,
                               shutdown_timeout=5.0)

        async def start() -> None:
            await runner.setup()
            await web.SockSite(runner, sock, backlog=1024).start()

        self._loop.run(start())
        self._runner = runner
        with self._lock:
            self._starts += 1

    def _app(self) -> web.Application:
        @web.middleware
        async def tag(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            response = await handler(request)
            response.headers[SERVED_BY] = self.name
            return response

        app = web.Application(middlewares=[tag], client_max_size=1024**3)
        app.router.add_get(HEALTH_PATH, self._health)
        app.router.add_route("*", "/{tail:.*}", self._traffic)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        with self._lock:
            self._by_path[HEALTH_PATH] += 1
            status = self._health_status
        return web.Response(status=status, text="ok\n" if status < 400 else "unhealthy\n")

    async def _traffic(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._by_path[request.path] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        digest, size = hashlib.sha256(), 0
        recorded = False
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            with self._lock:
                latency = self._latency
            latency += float(request.query.get("delay_ms", "0")) / 1000
            if latency > 0:
                await asyncio.sleep(latency)
            with self._lock:
                reset = self._reset.pick()
                failed = not reset and self._fail.pick()
                fail_status = self._fail_status
            recorded = True
            if reset:
                self._record(request, size, digest, "reset")
                _reset_transport(request.transport)
                await asyncio.sleep(3600)  # cancelled when the connection is lost
                raise ConnectionResetError("reset on purpose")
            if failed:
                self._record(request, size, digest, fail_status)
                return web.Response(status=fail_status, text=f"{self.name} failing on purpose\n")
            self._record(request, size, digest, 200)
            body = {
                "served_by": self.name,
                "method": request.method,
                "path": request.path_qs,
                "request_id": request.headers.get(REQUEST_ID, ""),
                "body_size": size,
                "body_sha256": digest.hexdigest(),
            }
            return web.Response(text=json.dumps(body), content_type="application/json")
        finally:
            if not recorded:  # the client went away (or the backend stopped) first
                self._record(request, size, digest, "cancelled")
            with self._lock:
                self._in_flight -= 1

    def _record(self, request: web.Request, size: int, digest: hashlib._Hash, outcome: int | str) -> None:
        entry = Received(request.method, request.path, request.headers.get(REQUEST_ID, ""), size,
                         digest.hexdigest(), outcome)
        with self._lock:
            self._received.append(entry)
            self._outcomes[outcome] += 1


class ControlBackends:
    """A few `ControlBackend`s named a, b, c, … that close together."""

    def __init__(self, count: int, prefix: str = "") -> None:
        self.all: list[ControlBackend] = []
        try:
            for i in range(count):
                self.all.append(ControlBackend(f"{prefix}{chr(ord('a') + i)}"))
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[ControlBackend]:
        return iter(self.all)

    def __getitem__(self, index: int) -> ControlBackend:
        return self.all[index]

    def __len__(self) -> int:
        return len(self.all)

    @property
    def addresses(self) -> list[str]:
        return [b.address for b in self.all]

    @property
    def traffic(self) -> int:
        return sum(b.traffic for b in self.all)

    def by_name(self, name: str) -> ControlBackend:
        return next(b for b in self.all if b.name == name)

    def close(self) -> None:
        for backend in self.all:
            backend.close()

    def __enter__(self) -> ControlBackends:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- gRPC ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcCall:
    method: str
    # Seconds left of the call's deadline when the handler began (None: no deadline).
    deadline: float | None
    # Seconds from the handler's start until it saw the call cancelled (None: it was not).
    cancelled_after: float | None
    code: grpc.StatusCode


class ControlGrpcBackend:
    """A grpcio server answering any method `/<service>/<method>` with `<name>:<request>`.

    `fail(share, code)` answers a share of calls with `code` (UNAVAILABLE by default);
    `set_latency` delays answers (a delayed handler notices cancellation within 10 ms).
    Responses carry `x-served-by` in their initial metadata.
    """

    def __init__(self, name: str = "grpc") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._fail = _Share()
        self._fail_code = grpc.StatusCode.UNAVAILABLE
        self._latency = 0.0
        self._calls: list[GrpcCall] = []
        backend = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                method = details.method  # type: ignore[attr-defined]
                return grpc.unary_unary_rpc_method_handler(
                    lambda request, context: backend._handle(method, request, context))

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), handlers=[Handler()])
        port = self.server.add_insecure_port("127.0.0.1:0")
        if not port:
            raise RuntimeError("gRPC backend could not bind 127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def fail(self, share: float = 1.0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, *,
             randomly: bool = False) -> None:
        with self._lock:
            self._fail.set(share, randomly)
            self._fail_code = code

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = seconds

    def heal(self) -> None:
        with self._lock:
            self._fail.set(0.0)
            self._latency = 0.0

    @property
    def calls(self) -> list[GrpcCall]:
        with self._lock:
            return list(self._calls)

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._calls)

    def outcomes(self) -> Counter[grpc.StatusCode]:
        with self._lock:
            return Counter(call.code for call in self._calls)

    def reset_counts(self) -> None:
        with self._lock:
            self._calls.clear()

    def close(self) -> None:
        self.server.stop(grace=None).wait(timeout=5)

    def __enter__(self) -> ControlGrpcBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        started = time.monotonic()
        remaining = context.time_remaining()
        # grpcio reports "no deadline" as a huge number.
        deadline = remaining if remaining is not None and remaining < 1e6 else None
        context.send_initial_metadata(((SERVED_BY, self.name),))
        with self._lock:
            latency = self._latency
            failed = self._fail.pick()
            code = self._fail_code
        cancelled_after = None
        until = started + latency
        while time.monotonic() < until:
            if not context.is_active():
                cancelled_after = time.monotonic() - started
                break
            time.sleep(min(0.01, max(0.0, until - time.monotonic())))
        outcome = grpc.StatusCode.CANCELLED if cancelled_after is not None else (
            code if failed else grpc.StatusCode.OK)
        with self._lock:
            self._calls.append(GrpcCall(method, deadline, cancelled_after, outcome))
        if cancelled_after is not None:
            return b""
        if failed:
            context.abort(code, f"{self.name} failing on purpose")
        return self.name.encode() + b":" + request


class GrpcHeaderRecorder:
    """A bare HTTP/2 (prior knowledge) server that records each request's headers exactly
    as they arrived and answers every request with a trailers-only gRPC OK."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._headers: list[dict[str, str]] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = LoopThread()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                        header_encoding="utf-8"))
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            try:
                while data := await reader.read(65536):
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            with self._lock:
                                self._headers.append({str(k): str(v) for k, v in event.headers})
                        elif isinstance(event, h2.events.DataReceived):
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamEnded):
                            conn.send_headers(event.stream_id, [
                                (":status", "200"), ("content-type", "application/grpc"),
                                ("grpc-status", "0"), (SERVED_BY, "recorder"),
                            ], end_stream=True)
                    writer.write(conn.data_to_send())
                    await writer.drain()
            except (ConnectionError, h2.exceptions.ProtocolError):
                pass
            finally:
                self._writers.discard(writer)
                writer.close()

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(handle, "127.0.0.1", 0)

        self.server: asyncio.base_events.Server = self._loop.run(start())  # type: ignore[assignment]
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def headers(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._headers)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for writer in list(self._writers):
                writer.close()
            for _ in range(100):  # the handlers see the connections end, and return
                if not self._writers:
                    break
                await asyncio.sleep(0.01)

        self._loop.run(stop())
        self._loop.close()

    def __enter__(self) -> GrpcHeaderRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def grpc_timeout_seconds(value: str) -> float:
    """Parses a `grpc-timeout` header value (at most 8 digits and a unit: H M S m u n)."""
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    digits, unit = value[:-1], value[-1:]
    if not (digits.isdigit() and len(digits) <= 8 and unit in units):
        raise ValueError(f"not a grpc-timeout value: {value!r}")
    return int(digits) * units[unit]
