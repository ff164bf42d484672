"""Bad input gets a clear answer, fast, and never a hang."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from .backends import EchoBackend
from .conftest import ProxyFactory, make_config


def raw_exchange(address: str, request: bytes, timeout: float = 5) -> tuple[bytes, bool]:
    """Sends raw bytes; returns the reply and whether the proxy closed the connection."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:  # closed with our request unread: a reset
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
        return data, closed


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: web\r\nBad Header Line\r\n\r\n",
    b"GET /a b c HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web\r\nContent-Length: nope\r\n\r\n",
])
def test_malformed_request_gets_400_and_close(
    start_proxy: ProxyFactory, echo_backend: EchoBackend, request_bytes: bytes
) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}))
    reply, closed = raw_exchange(proxy.address(), request_bytes)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert closed
    assert echo_backend.connections == 0


def test_header_limits_get_431(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]},
                                    limits={"maxHeaderBytes": 16384, "maxHeaders": 20}))
    big = b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    reply, closed = raw_exchange(proxy.address(), big)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    many = b"GET / HTTP/1.1\r\nHost: web\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(30)) + b"\r\n"
    reply, closed = raw_exchange(proxy.address(), many)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    assert closed
    # Within the limits, all is well.
    ok = httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web", "x-fine": "a" * 1000})
    assert ok.status_code == 200


def test_unknown_service_is_named(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}))
    response = httpx.get(f"http://{proxy.address()}/", headers={"host": "nowhere.example"})
    assert response.status_code == 404
    assert response.headers["pymesh-reason"] == "unknown-service"
    assert "nowhere.example" in response.text


def test_unreachable_upstream_fails_fast(start_proxy: ProxyFactory) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens here now
    proxy = start_proxy(make_config({"gone": [f"127.0.0.1:{port}"], "empty": []}))
    started = time.monotonic()
    response = httpx.get(f"http://{proxy.address()}/", headers={"host": "gone"}, timeout=10)
    assert time.monotonic() - started < 2
    assert response.status_code == 502
    assert response.headers["pymesh-reason"] == "connect-failed"
    assert f"127.0.0.1:{port}" in response.text

    response = httpx.get(f"http://{proxy.address()}/", headers={"host": "empty"}, timeout=10)
    assert response.status_code == 503
    assert response.headers["pymesh-reason"] == "no-endpoints"


def test_slow_upstream_gets_504_at_the_request_timeout(
    start_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}, timeouts={"request": "0.3s"}))
    started = time.monotonic()
    response = httpx.get(f"http://{proxy.address()}/slow?ms=5000", headers={"host": "web"}, timeout=15)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.headers["pymesh-reason"] == "timeout"
    # Not before the timeout (timers never fire early), and before the backend would answer.
    assert 0.3 <= elapsed < 5, elapsed
    # The proxy is still fine afterwards.
    assert httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web"}).status_code == 200


def test_connection_limit_refuses_extra_clients(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = start_proxy(make_config({"web": [echo_backend.address]}, limits={"maxConnections": 2}))
    host, port = proxy.address().rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        reply, closed = raw_exchange(proxy.address(), b"GET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
        assert reply == b"" and closed
    finally:
        for sock in held:
            sock.close()
