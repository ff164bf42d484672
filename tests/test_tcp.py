"""Opaque TCP: what is not HTTP is copied both ways, half-close included."""

from __future__ import annotations

import os
import socket

from pymesh.metrics import total

from .backends import BannerServer, TcpEchoServer
from .conftest import ProxyFactory, make_config


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_opaque_bytes_and_half_close(start_proxy: ProxyFactory) -> None:
    server = TcpEchoServer()
    try:
        proxy = start_proxy(make_config({"db": [server.address]}, default_service="db"))
        payload = b"\x00\x01binary protocol\xff" + os.urandom(300_000)
        with connect(proxy.address()) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # half-close: the server must see EOF and still answer
            data = recv_all(sock)
        assert data == payload + f"\nreceived {len(payload)} bytes\n".encode()
        text = proxy.metrics()
        assert total(text, "tcp_close_total", protocol="opaque") == 1
        assert total(text, "tcp_read_bytes_total") == len(payload)
        assert total(text, "tcp_write_bytes_total") == len(data)
    finally:
        server.stop()


def test_server_speaks_first_protocol(start_proxy: ProxyFactory) -> None:
    """The client sends nothing until greeted: detection times out and falls back to TCP."""
    server = BannerServer()
    try:
        config = make_config({"mail": [server.address]}, default_service="mail",
                             timeouts={"detect": "0.3s"})
        proxy = start_proxy(config)
        with connect(proxy.address()) as sock:
            greeting = sock.recv(1024)
            assert greeting == b"220 banner ready\r\n"
            sock.sendall(b"HELO test\r\n")
            assert recv_all(sock) == b"you said HELO test\r\n"
    finally:
        server.stop()


def test_opaque_listener_skips_detection(start_proxy: ProxyFactory) -> None:
    server = TcpEchoServer()
    try:
        config = make_config({"db": [server.address]}, default_service="db")
        config["listeners"][0]["protocol"] = "OPAQUE"
        proxy = start_proxy(config)
        with connect(proxy.address()) as sock:
            # Looks like HTTP, but the listener is opaque: echoed verbatim.
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock).startswith(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        server.stop()
