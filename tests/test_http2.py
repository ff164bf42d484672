"""HTTP/2 with prior knowledge (h2c) through the proxy, against a real HTTP/2 server
(hypercorn): multiplexing, :authority preservation, streamed bodies both ways,
response trailers, and an h2load smoke run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from .deps import missing

try:
    import h2.config
    import h2.connection
    import h2.events
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
except ImportError as e:
    missing(e)

from pymesh.metrics import total

from .backends import GATE_TIMED_OUT, GATE_TIMEOUT, LoopThread
from .conftest import ProxyFactory, RunningProxy, make_config

SERVICE = "svc"
MIB = 1024 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def pattern(size: int, seed: int) -> Iterator[bytes]:
    """``size`` deterministic pseudo-random bytes, in 64 KiB pieces."""
    rng = random.Random(seed)
    remaining = size
    while remaining:
        n = min(remaining, 64 * 1024)
        yield rng.randbytes(n)
        remaining -= n


def pattern_sha256(size: int, seed: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size, seed):
        digest.update(piece)
    return digest.hexdigest()


@dataclass
class H2Backend:
    """A hypercorn server on its own loop thread; records what it saw."""

    address: str = ""
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    peers: set[tuple[str, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: Callable[[], None] = lambda: None
    #: set by the backend when a request's first body chunk arrives (``?key=K``), or by the
    #: test to release the rest of a `/gated` response
    gates: dict[str, threading.Event] = field(default_factory=dict)

    def gate(self, key: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(key, threading.Event())

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert scope["type"] == "http"
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if scope.get("client"):
                self.peers.add(tuple(scope["client"]))
        try:
            await self.handle(scope, receive, send)
        finally:
            with self.lock:
                self.in_flight -= 1

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]

        # Read the whole request body, hashing it as it streams in.
        digest = hashlib.sha256()
        size = 0
        chunks = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            if body:
                digest.update(body)
                size += len(body)
                chunks += 1
                if chunks == 1 and "key" in query:
                    self.gate(query["key"]).set()  # the client may now send the rest
            if not message.get("more_body", False):
                break

        if path == "/info":
            delay = float(query.get("delay_ms", "0")) / 1000
            if delay:
                await asyncio.sleep(delay)
            info = {
                "http_version": scope["http_version"],
                "method": scope["method"],
                "path": path,
                "headers": headers,
                "body_size": size,
                "body_sha256": digest.hexdigest(),
                "body_chunks": chunks,
                "trailers_supported": "http.response.trailers" in scope.get("extensions", {}),
            }
            await self.respond(send, 200, json.dumps(info).encode(), b"application/json")
        elif path == "/gated":
            # The last piece only once the test has the first (or, marked, after GATE_TIMEOUT).
            gate = self.gate(query["key"])
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream")]})
            await send({"type": "http.response.body", "body": b"first chunk;", "more_body": True})
            deadline = asyncio.get_running_loop().time() + GATE_TIMEOUT
            while not gate.is_set() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"last chunk" if gate.is_set() else GATE_TIMED_OUT,
                        "more_body": False})
        elif path == "/download":
            length = int(query["size"])
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream")]})
            for piece in pattern(length, int(query["seed"])):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/trailers":
            await send({"type": "http.response.start", "status": 200, "trailers": True,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"part one, ", "more_body": True})
            await send({"type": "http.response.body", "body": b"part two", "more_body": False})
            await send({"type": "http.response.trailers", "more_trailers": False,
                        "headers": [(b"x-checksum", digest.hexdigest().encode()),
                                    (b"x-final-status", b"complete")]})
        else:
            await self.respond(send, 200, b"hello from h2\n", b"text/plain")

    @staticmethod
    async def respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def start_h2_backend() -> H2Backend:
    backend = H2Backend()
    loop = LoopThread()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    backend.address = f"127.0.0.1:{sock.getsockname()[1]}"

    config = Config()
    # Hypercorn adopts the bound socket (and listens on it): the port comes from the OS.
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 1

    ready = threading.Event()
    stopping: list[asyncio.Event] = []

    async def run() -> None:
        shutdown = asyncio.Event()
        stopping.append(shutdown)
        ready.set()
        await serve(backend.app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]

    serving = asyncio.run_coroutine_threadsafe(run(), loop.loop)
    assert ready.wait(5), "hypercorn did not start"
    host, port = backend.address.split(":")
    wait_for_port(host, int(port), serving)

    def stop() -> None:
        loop.loop.call_soon_threadsafe(stopping[0].set)
        serving.result(timeout=10)
        loop.close()
        loop.loop.close()

    backend.stop = stop
    return backend


def wait_for_port(host: str, port: int, serving: concurrent.futures.Future[None],
                  timeout: float = 5.0) -> None:
    """Waits until a TCP connect succeeds (the server is accepting), bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving.done():
            serving.result()  # raises what stopped the server
            raise AssertionError("hypercorn exited before accepting connections")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"hypercorn not accepting on {host}:{port} within {timeout}s")


@pytest.fixture
def h2_backend() -> Iterator[H2Backend]:
    backend = start_h2_backend()
    yield backend
    backend.stop()


def h2_client(proxy: RunningProxy, authority: str = SERVICE, **kwargs: Any) -> httpx.Client:
    """An HTTP/2-only (prior knowledge) client whose requests carry ``authority``."""
    return httpx.Client(
        base_url=f"http://{proxy.address()}", http1=False, http2=True, trust_env=False,
        headers={"host": authority}, timeout=30, **kwargs,
    )


def header_map(pairs: list[list[str]]) -> dict[str, str]:
    return {k: v for k, v in pairs}


def test_backend_speaks_h2c_directly(h2_backend: H2Backend) -> None:
    """The fixture itself: hypercorn answers HTTP/2 prior knowledge (no proxy involved)."""
    with httpx.Client(http1=False, http2=True, trust_env=False, timeout=10) as client:
        response = client.get(f"http://{h2_backend.address}/info")
    assert response.http_version == "HTTP/2"
    assert response.json()["http_version"] == "2"


def test_multiplexed_requests_on_one_connection(start_proxy: ProxyFactory, h2_backend: H2Backend) -> None:
    proxy = start_proxy(make_config({SERVICE: [h2_backend.address]}))
    count = 150  # over hypercorn's 100 concurrent streams: the proxy must queue, not fail

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=f"http://{proxy.address()}", http1=False, http2=True, trust_env=False,
            headers={"host": SERVICE}, timeout=30,
        ) as client:
            return await asyncio.gather(*(
                client.get("/info", params={"delay_ms": "100", "i": str(i)}) for i in range(count)
            ))

    responses = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert [r.status_code for r in responses] == [200] * count
    assert all(r.http_version == "HTTP/2" for r in responses)
    assert all(r.json()["http_version"] == "2" for r in responses)
    assert h2_backend.requests == count
    # The requests overlapped at the backend, so they really were multiplexed...
    assert h2_backend.max_in_flight > 1
    # ...over one client connection and one upstream HTTP/2 connection.
    assert len(h2_backend.peers) == 1
    text = proxy.metrics()
    assert total(text, "tcp_open_total") == 1
    assert total(text, "request_total", dst_service=SERVICE) == count
    assert total(text, "response_total", dst_service=SERVICE, status_code="200") == count


def test_authority_is_preserved(start_proxy: ProxyFactory, h2_backend: H2Backend) -> None:
    proxy = start_proxy(make_config({SERVICE: [h2_backend.address]}))
    with h2_client(proxy) as client:
        response = client.get("/info")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    seen = response.json()
    assert seen["http_version"] == "2"
    headers = header_map(seen["headers"])
    # The backend sees the service name the client sent, not the endpoint's address
    # (hypercorn hands an HTTP/2 request's :authority to the app as its `host`).
    assert headers["host"] == SERVICE, headers
    assert h2_backend.address not in json.dumps(headers)


def test_streamed_request_body(start_proxy: ProxyFactory, h2_backend: H2Backend) -> None:
    proxy = start_proxy(make_config({SERVICE: [h2_backend.address]}))
    size = 5 * MIB
    arrived = h2_backend.gate("upload")
    early: list[bool] = []

    def body() -> Iterator[bytes]:
        # The last piece goes only once the backend has the first: a proxy that buffered
        # the request body whole would leave the backend waiting, and ``early`` False.
        pieces = list(pattern(size, seed=7))
        yield from pieces[:-1]
        early.append(arrived.wait(GATE_TIMEOUT))
        yield pieces[-1]

    with h2_client(proxy) as client:
        response = client.post("/info", params={"key": "upload"}, content=body())
    assert response.status_code == 200
    seen = response.json()
    assert seen["body_size"] == size
    assert seen["body_sha256"] == pattern_sha256(size, seed=7)
    assert early == [True], "the backend saw no body before the client sent its last piece"


def test_streamed_response_body(start_proxy: ProxyFactory, h2_backend: H2Backend) -> None:
    proxy = start_proxy(make_config({SERVICE: [h2_backend.address]}))
    size = 5 * MIB + 123
    digest = hashlib.sha256()
    received = 0
    with h2_client(proxy) as client:
        with client.stream("GET", "/download", params={"size": str(size), "seed": "11"}) as response:
            assert response.status_code == 200
            assert response.http_version == "HTTP/2"
            for piece in response.iter_bytes():
                digest.update(piece)
                received += len(piece)
        assert received == size
        assert digest.hexdigest() == pattern_sha256(size, seed=11)

        # Streamed, not buffered whole: the first piece arrives while the backend still
        # holds back the last (it sends it once this test has the first).
        with client.stream("GET", "/gated", params={"key": "download"}) as response:
            pieces = response.iter_raw()
            first = next(pieces)
            assert first.startswith(b"first chunk;") and GATE_TIMED_OUT not in first, first
            h2_backend.gate("download").set()
            whole = first + b"".join(pieces)
    assert whole == b"first chunk;last chunk", whole



class HeldConnect:
    """A listener whose accept queue is kept full, so a proxy's connect to it waits (its SYNs
    are dropped) until :meth:`release`; then what the proxy sends is relayed to ``target``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        host, port = self.listener.getsockname()
        self.address = f"{host}:{port}"
        # Backlog 0 holds one connection not yet accepted: this one fills it.
        self.filler = socket.create_connection(self.listener.getsockname(), timeout=5)
        self.threads: list[threading.Thread] = []

    def release(self) -> None:
        self.listener.accept()[0].close()  # the filler: the proxy's next SYN gets in
        self.listener.settimeout(15)
        client, _ = self.listener.accept()
        host, port = self.target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=15)
        for a, b in ((client, upstream), (upstream, client)):
            thread = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in (self.filler, self.listener):
            s.close()


def test_max_pending_sheds_requests_past_those_waiting_for_a_connection(
        start_proxy: ProxyFactory, h2_backend: H2Backend) -> None:
    """`limits.maxPending: 2`: while the upstream HTTP/2 connection is still being opened, two
    requests wait for it and a third is shed at once (503 `shed`, counted under
    `max_pending`); once the connection is up the two waiting requests are served."""
    held = HeldConnect(h2_backend.address)
    config = make_config({SERVICE: [held.address]})
    config["services"][0].update(limits={"maxPending": 2}, timeouts={"connect": "20s", "request": "30s"})
    proxy = start_proxy(config)
    try:
        # A client (a connection to the proxy) per request, so that nothing queues client side.
        with h2_client(proxy) as one, h2_client(proxy) as two, h2_client(proxy) as client, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(c.get, "/info") for c in (one, two)]
            deadline = time.monotonic() + 10
            while total(proxy.metrics(), "request_total", dst_service=SERVICE) < 2:
                assert time.monotonic() < deadline, "the two requests never reached the proxy"
                time.sleep(0.05)
            third = client.get("/info", timeout=10)
            assert third.status_code == 503 and third.headers.get("pymesh-reason") == "shed", third.headers
            assert not any(f.done() for f in waiting), "a waiting request was answered before the connection"
            assert total(proxy.metrics(), "requests_shed_total", dst_service=SERVICE, limit="max_pending") >= 1
            held.release()
            assert [f.result(timeout=30).status_code for f in waiting] == [200, 200]
    finally:
        held.close()

@dataclass
class RawH2Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str]


def raw_h2_request(address: str, authority: str, path: str, extra: list[tuple[str, str]],
                   timeout: float = 10.0) -> RawH2Response:
    """One request over a fresh h2c connection with the h2 library, which, unlike httpx,
    reports response trailers."""
    host, port = address.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [
            (":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path),
            *extra,
        ], end_stream=True)
        sock.sendall(conn.data_to_send())

        response = RawH2Response(status=0, headers={}, body=b"", trailers={})
        deadline = time.monotonic() + timeout
        ended = False
        while not ended:
            assert time.monotonic() < deadline, "no complete response in time"
            data = sock.recv(65536)
            assert data, "connection closed before the response ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    response.headers = dict(event.headers)  # type: ignore[arg-type]
                    response.status = int(response.headers[":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    response.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream_id:
                    response.trailers = dict(event.headers)  # type: ignore[arg-type]
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    ended = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    raise AssertionError(f"stream reset: error code {event.error_code}")
            sock.sendall(conn.data_to_send())
        conn.close_connection()
        sock.sendall(conn.data_to_send())
    return response


def test_response_trailers(start_proxy: ProxyFactory, h2_backend: H2Backend) -> None:
    # Hypercorn offers the ASGI trailers extension over HTTP/2, and sends trailers to
    # requests that say `te: trailers`; check it does so directly first.
    direct = raw_h2_request(h2_backend.address, SERVICE, "/trailers", [("te", "trailers")])
    assert direct.trailers.get("x-final-status") == "complete"

    proxy = start_proxy(make_config({SERVICE: [h2_backend.address]}))
    response = raw_h2_request(proxy.address(), SERVICE, "/trailers", [("te", "trailers")])
    assert response.status == 200
    assert response.body == b"part one, part two"
    assert response.trailers.get("x-final-status") == "complete"
    assert response.trailers.get("x-checksum") == hashlib.sha256(b"").hexdigest()
    # Trailers stay trailers: they are not folded into the response headers.
    assert "x-final-status" not in response.headers


def test_h2load_smoke(start_proxy: ProxyFactory, h2_backend: H2Backend) -> None:
    h2load = shutil.which("h2load")
    assert h2load, "h2load is missing: install Debian's nghttp2-client (scripts/install --test)"
    proxy = start_proxy(make_config({SERVICE: [h2_backend.address]}))
    result = subprocess.run(
        [h2load, "-n", "200", "-c", "2", "-m", "10", "-H", f":authority: {SERVICE}",
         f"http://{proxy.address()}/"],
        capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Application protocol: h2c" in output, output
    summary = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                        r"(\d+) failed, (\d+) errored, (\d+) timeout", output)
    assert summary, output
    total_, _, done, succeeded, failed, errored, timed_out = map(int, summary.groups())
    assert (total_, done, succeeded, failed, errored, timed_out) == (200, 200, 200, 0, 0, 0), output
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    assert codes and codes.groups() == ("200", "0", "0", "0"), output
    assert h2_backend.requests == 200
    text = proxy.metrics()
    assert total(text, "tcp_open_total") == 2
    assert total(text, "response_total", dst_service=SERVICE, status_code="200") == 200
