"""Memory after a burst: what a burst of connections freed is handed back to the operating
system, not kept resident for good. The native sidecar's allocator (mimalloc) purges freed
pages at once; the embedded engine trims its host's glibc, which would otherwise keep freed
memory in its arenas. How much and how fast is measured in perf/bench_burst.py, never
asserted here."""

from __future__ import annotations

import resource
import socket
import time

from pymesh.metrics import total

from .backends import EchoBackend
from .conftest import ProxyFactory, make_config

SLOW_CLIENTS = 400


def slow_header_clients(address: str, count: int) -> list[socket.socket]:
    """`count` connections that each send 6 KB of a request head and never finish it, so the
    proxy holds a connection, its task and the head so far for each."""
    host, port = address.rsplit(":", 1)
    clients = []
    for _ in range(count):
        client = socket.create_connection((host, int(port)), timeout=5)
        client.sendall(b"GET /echo HTTP/1.1\r\nhost: web\r\nx-slow: " + b"s" * 6000)
        clients.append(client)
    return clients


def test_memory_a_burst_of_connections_freed_is_returned(start_proxy: ProxyFactory,
                                                         echo_backend: EchoBackend) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4 * SLOW_CLIENTS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * SLOW_CLIENTS, hard), hard))
    config = make_config({"web": [echo_backend.address]}, default_service="web", timeouts={"detect": "60s"})
    proxy = start_proxy(config)
    clients = slow_header_clients(proxy.address(), SLOW_CLIENTS)
    try:
        deadline = time.monotonic() + 30
        while total(proxy.metrics(), "tcp_open_connections") < SLOW_CLIENTS:
            assert time.monotonic() < deadline, "the proxy never held every slow client"
            time.sleep(0.1)
        held = total(proxy.metrics(), "process_resident_memory_bytes")
    finally:
        for client in clients:
            client.close()
    # Each held connection is over 6 KiB (its task and the head so far): 4 KiB of each must
    # come back once they are closed. The resident size is the process's: for the embedded
    # proxy, this test's own; what it allocates meanwhile only makes the drop smaller.
    expected = SLOW_CLIENTS * 4 * 1024
    deadline = time.monotonic() + 30
    while (returned := held - total(proxy.metrics(), "process_resident_memory_bytes")) < expected:
        assert time.monotonic() < deadline, f"only {returned:.0f} of the burst's resident bytes returned"
        time.sleep(0.2)
