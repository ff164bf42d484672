"""HTTP/1.1 through the proxy: keep-alive, pooling, chunked streaming, large bodies,
Host preservation, hop-by-hop headers and WebSocket upgrades."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import httpx

from .deps import missing

try:
    import websockets
except ImportError as e:
    missing(e)

from pymesh.metrics import total

from .backends import GATE_TIMED_OUT, GATE_TIMEOUT, EchoBackend
from .conftest import ProxyFactory, make_config


def test_keep_alive_and_pooling(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}))
    with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": "web"}) as client:
        for i in range(50):
            response = client.get(f"/echo/{i}")
            assert response.status_code == 200
            assert response.json()["path"] == f"/echo/{i}"
    # Sequential requests reuse one pooled upstream connection.
    assert echo_backend.connections == 1
    text = proxy.metrics()
    assert total(text, "request_total", dst_service="web", direction="outbound") == 50
    assert total(text, "response_total", dst_service="web", status_code="200") == 50
    assert total(text, "tcp_open_total") == 1
    assert total(text, "response_latency_seconds_count", dst_service="web") == 50


def test_host_is_preserved_and_hop_by_hop_headers_removed(
    start_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    config = make_config({"web": [echo_backend.address]})
    config["services"][0]["authorities"] = ["web.example.com:8080"]
    proxy = start_proxy(config)
    response = httpx.get(
        f"http://{proxy.address()}/echo",
        headers={
            "host": "web.example.com:8080",
            "connection": "keep-alive, x-secret-hop",
            "x-secret-hop": "must not pass",
            "keep-alive": "timeout=5",
            "proxy-connection": "keep-alive",
            "x-end-to-end": "passes",
        },
    )
    assert response.status_code == 200
    seen = response.json()["headers"]
    assert seen["host"] == "web.example.com:8080"
    assert seen["x-end-to-end"] == "passes"
    for hop in ("x-secret-hop", "keep-alive", "proxy-connection"):
        assert hop not in seen


def test_chunked_request_and_response_stream(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}))
    chunks = [os.urandom(10_000) for _ in range(20)]

    def body():  # noqa: ANN202 (a generator makes httpx send chunked)
        yield from chunks

    with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": "web"}) as client:
        response = client.post("/echo", content=body())
        assert response.status_code == 200
        echoed = response.json()
        assert echoed["chunked"] is True
        assert echoed["body_size"] == 200_000
        assert echoed["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()

        # A chunked response is streamed, not buffered whole: the first chunk arrives while
        # the backend still holds back the last (it sends it once this test has the first).
        with client.stream("GET", "/stream?chunks=5&size=100") as streamed:
            assert streamed.headers["transfer-encoding"] == "chunked"
            assert len(streamed.read()) == 500
        with client.stream("GET", "/gated?key=http1", timeout=GATE_TIMEOUT + 5) as streamed:
            raw = streamed.iter_raw()
            first = next(raw)
            assert first.startswith(b"first chunk;") and GATE_TIMED_OUT not in first, first
            echo_backend.gate("http1").set()
            body = first + b"".join(raw)
        assert body == b"first chunk;last chunk", body


def test_large_bodies(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}))
    upload = os.urandom(20 * 1024 * 1024)
    with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": "web"}, timeout=30) as client:
        response = client.put("/echo", content=upload)
        assert response.json()["body_size"] == len(upload)
        assert response.json()["body_sha256"] == hashlib.sha256(upload).hexdigest()
        download = client.get(f"/bytes?size={32 * 1024 * 1024}")
        assert download.status_code == 200
        assert len(download.content) == 32 * 1024 * 1024


def test_http10_client_is_answered(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}, default_service="web"))
    host, port = proxy.address().rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200")
    assert b'"path": "/echo"' in data


def test_websocket_upgrade(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    # The client's Host is the proxy's address, so the listener's default service takes it.
    proxy = start_proxy(make_config({"web": [echo_backend.address]}, default_service="web"))

    async def talk() -> list[str | bytes]:
        received: list[str | bytes] = []
        async with websockets.connect(
            f"ws://{proxy.address()}/ws", open_timeout=5
        ) as ws:
            for i in range(20):
                await ws.send(f"message {i}")
                received.append(await asyncio.wait_for(ws.recv(), 5))
            blob = os.urandom(200_000)
            await ws.send(blob)
            received.append(await asyncio.wait_for(ws.recv(), 5))
            assert received[-1] == blob
        return received

    received = asyncio.run(talk())
    assert received[:20] == [f"echo: message {i}" for i in range(20)]
    assert total(proxy.metrics(), "response_total", dst_service="web", status_code="101") == 1


def test_requests_balance_across_endpoints(start_proxy: ProxyFactory) -> None:
    from .backends import start_echo_backend

    backends = [start_echo_backend() for _ in range(3)]
    try:
        config = make_config({"web": [b.address for b in backends]})
        config["services"][0]["balancer"] = {"kind": "ROUND_ROBIN"}
        proxy = start_proxy(config)
        with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": "web"}) as client:
            for _ in range(30):
                assert client.get("/echo").status_code == 200
        # Round-robin: every endpoint took part.
        assert all(b.connections >= 1 for b in backends)
    finally:
        for b in backends:
            b.stop()
