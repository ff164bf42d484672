"""Lifecycle: the admin endpoint, draining on SIGTERM (or stop()), structured logs, and TCP
keepalive on every proxied socket (how a peer that vanished without closing is found)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from pymesh.metrics import total

from .backends import GATE_TIMED_OUT, GATE_TIMEOUT, EchoBackend
from .conftest import NativeProxy, ProxyFactory, make_config, proxy_binary, wait_until


def test_admin_endpoint(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    config = make_config({"web": [echo_backend.address]}, admin={"address": "127.0.0.1:0", "enableMutations": True})
    proxy = start_proxy(config)
    admin = f"http://{proxy.admin}"
    assert httpx.get(f"{admin}/live").status_code == 200
    assert httpx.get(f"{admin}/ready").status_code == 200
    running = httpx.get(f"{admin}/config").json()
    assert running["services"][0]["name"] == "web"
    assert running["services"][0]["endpoints"][0]["address"] == echo_backend.address
    httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web"})
    metrics = httpx.get(f"{admin}/metrics")
    assert metrics.headers["content-type"].startswith("application/openmetrics-text")
    for name in ("request", "response", "response_latency_seconds", "tcp_open", "tcp_open_connections",
                 "process_resident_memory_bytes"):
        assert f"# TYPE {name} " in metrics.text
    assert httpx.get(f"{admin}/nope").status_code == 404
    assert httpx.delete(f"{admin}/config").status_code == 405
    rejected = httpx.put(f"{admin}/config", content="listeners: [{address: 1.2.3}]",
                         headers={"content-type": "application/yaml"})
    assert rejected.status_code == 400
    assert rejected.json()["error"]["path"] == "listeners[0].address"
    # Latency buckets start at 50 µs (sub-millisecond hops need resolution below 1 ms).
    assert 'response_latency_seconds_bucket{le="0.00005",direction="outbound",dst_service="web"' in proxy.metrics()


def test_sigterm_drains_in_flight_requests_then_exits_0(native_proxy, echo_backend: EchoBackend) -> None:  # noqa: ANN001
    # A grace period far longer than the test waits: exiting proves it drained, not timed out.
    proxy: NativeProxy = native_proxy(make_config({"web": [echo_backend.address]}), "--shutdown-grace", "120s")
    results: list[httpx.Response | Exception] = []

    def held_request() -> None:
        # In flight until the test opens its gate (the backend holds back the last chunk).
        try:
            results.append(httpx.get(f"http://{proxy.address()}/gated?key=drain", headers={"host": "web"},
                                     timeout=GATE_TIMEOUT + 10))
        except httpx.HTTPError as e:
            results.append(e)

    thread = threading.Thread(target=held_request)
    thread.start()
    assert wait_until(lambda: "drain" in echo_backend.gates, timeout=10)
    proxy.process.send_signal(signal.SIGTERM)
    # While draining, new connections are refused and the admin endpoint says so.
    assert wait_until(lambda: _refused(proxy.address()), timeout=10)
    ready = httpx.get(f"http://{proxy.admin}/ready", timeout=5)
    assert (ready.status_code, ready.text) == (503, "draining\n")
    assert proxy.process.poll() is None, "exited with a request in flight"
    echo_backend.gate("drain").set()
    code = proxy.process.wait(timeout=30)
    thread.join(timeout=10)
    assert code == 0
    assert len(results) == 1 and isinstance(results[0], httpx.Response), results
    assert results[0].status_code == 200 and results[0].content == b"first chunk;last chunk"
    assert "draining" in proxy.logs and "proxy stopped" in proxy.logs


def _refused(address: str) -> bool:
    try:
        httpx.get(f"http://{address}/echo", headers={"host": "web"}, timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def _keep_alive_exchange(sock: socket.socket) -> bytes:
    """One keep-alive request on `sock`; its response's head, once the whole response is read."""
    sock.sendall(b"GET /echo/held HTTP/1.1\r\nHost: web\r\n\r\n")
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head


def test_a_served_connection_keeps_its_place_under_the_listener_limit(
    start_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    """An HTTP connection is served from a task of its own once detected: its slot under the
    listener's connection limit, and its close in the metrics, go with it."""
    proxy = start_proxy(make_config({"web": [echo_backend.address]}, limits={"maxConnections": 2}))
    host, port = proxy.address().rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        for sock in held:
            assert _keep_alive_exchange(sock).startswith(b"HTTP/1.1 200")
        # Both idle keep-alive connections still count: a third is closed unanswered.
        with socket.create_connection((host, int(port)), timeout=5) as third:
            third.sendall(b"GET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
            try:
                assert third.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert total(proxy.metrics(), "tcp_open_connections") == 2
        held.pop().close()
        assert wait_until(lambda: total(proxy.metrics(), "tcp_open_connections") == 1, timeout=5)
        assert total(proxy.metrics(), "tcp_close_total", protocol="http1") == 1
        # Its slot is free again; the first connection is still served.
        assert httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web"}).status_code == 200
        assert _keep_alive_exchange(held[0]).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()


def test_grace_period_bounds_the_drain(native_proxy, echo_backend: EchoBackend) -> None:  # noqa: ANN001
    proxy: NativeProxy = native_proxy(make_config({"web": [echo_backend.address]}), "--shutdown-grace", "300ms")
    results: list[httpx.Response | Exception] = []

    def held_request() -> None:
        # Never released: only the backend's own timeout (GATE_TIMEOUT) would finish it.
        try:
            results.append(httpx.get(f"http://{proxy.address()}/gated?key=grace", headers={"host": "web"},
                                     timeout=GATE_TIMEOUT + 10))
        except httpx.HTTPError as e:
            results.append(e)

    thread = threading.Thread(target=held_request)
    thread.start()
    assert wait_until(lambda: "grace" in echo_backend.gates, timeout=10)
    assert proxy.terminate(timeout=30) == 0
    thread.join(timeout=GATE_TIMEOUT + 15)
    # The proxy closed the request at the end of its grace period instead of waiting for it.
    assert len(results) == 1
    assert isinstance(results[0], httpx.HTTPError) or GATE_TIMED_OUT not in results[0].content, results
    assert not echo_backend.gate("grace").is_set()


def _ignore(call) -> None:  # noqa: ANN001
    try:
        call()
    except httpx.HTTPError:
        pass


def test_embedded_stop_drains(echo_backend: EchoBackend) -> None:
    import pymesh

    proxy = pymesh.Proxy(make_config({"web": [echo_backend.address]})).start()
    address = proxy.address()
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(
        httpx.get(f"http://{address}/slow?ms=800", headers={"host": "web"}, timeout=10).status_code))
    thread.start()
    assert wait_until(lambda: echo_backend.connections == 1)
    assert proxy.stop(grace=5) is True
    thread.join(timeout=10)
    assert results == [200]
    assert not proxy.running
    with pytest.raises(pymesh.ProxyNotRunning):
        proxy.metrics()


def test_admin_shutdown_and_json_logs(native_proxy, echo_backend: EchoBackend) -> None:  # noqa: ANN001
    proxy: NativeProxy = native_proxy(make_config({"web": [echo_backend.address]}),
                                      "--log-format", "json", "--log", "debug")
    httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web"})
    assert httpx.post(f"http://{proxy.admin}/shutdown").status_code == 200
    assert proxy.process.wait(timeout=10) == 0
    lines = [json.loads(line) for line in proxy.logs.splitlines() if line.strip()]
    assert lines and all("level" in line and "fields" in line for line in lines)
    assert any(line["fields"].get("message") == "proxy started" for line in lines)



def test_the_sidecar_takes_every_flag_from_the_environment(tmp_path: Path, echo_backend: EchoBackend) -> None:
    """No arguments at all, as in a container: PYMESH_CONFIG, PYMESH_LOG, PYMESH_LOG_FORMAT,
    PYMESH_THREADS, PYMESH_WATCH_INTERVAL and PYMESH_SHUTDOWN_GRACE each take effect."""
    config_path = tmp_path / "env.yaml"
    config = make_config({"web": [echo_backend.address]})
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYMESH_CONFIG": str(config_path), "PYMESH_LOG": "debug", "PYMESH_LOG_FORMAT": "json",
           "PYMESH_THREADS": "3", "PYMESH_WATCH_INTERVAL": "0s", "PYMESH_SHUTDOWN_GRACE": "300ms"}
    log_path = tmp_path / "env.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([proxy_binary()], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    results: list[httpx.Response | Exception] = []
    try:
        assert process.stdout is not None
        addresses: dict[str, str] = {}
        for line in process.stdout:  # `listening NAME ADDRESS` lines, then `admin ADDRESS`
            kind, *rest = line.split()
            if kind == "listening":
                addresses[rest[0]] = rest[1]
            elif kind == "admin":
                addresses["admin"] = rest[0]
                break
        assert set(addresses) == {"main", "admin"}, (addresses, log_path.read_text())
        # PYMESH_CONFIG: it serves that file.
        assert httpx.get(f"http://{addresses['main']}/echo", headers={"host": "web"}, timeout=5).status_code == 200
        # PYMESH_THREADS: three engine workers.
        workers = [t for t in Path(f"/proc/{process.pid}/task").iterdir() if (t / "comm").read_text().strip()
                   == "pymesh-worker"]
        assert len(workers) == 3, workers
        # PYMESH_WATCH_INTERVAL=0s: a changed file is not picked up, for several default polls.
        config["services"][0]["endpoints"] = [{"address": "127.0.0.1:1"}]
        config_path.write_text(yaml.safe_dump(config))
        assert not wait_until(lambda: total(httpx.get(f"http://{addresses['admin']}/metrics", timeout=5).text,
                                            "config_reload_total") > 0, timeout=3)

        # PYMESH_SHUTDOWN_GRACE=300ms: a request held past it is cut off (the default 30 s
        # would let the backend's gate time out and the request finish).
        def held_request() -> None:
            try:
                results.append(httpx.get(f"http://{addresses['main']}/gated?key=env", headers={"host": "web"},
                                         timeout=GATE_TIMEOUT + 10))
            except httpx.HTTPError as e:
                results.append(e)

        thread = threading.Thread(target=held_request)
        thread.start()
        assert wait_until(lambda: "env" in echo_backend.gates, timeout=10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        thread.join(timeout=GATE_TIMEOUT + 15)
        assert len(results) == 1
        assert isinstance(results[0], httpx.HTTPError) or GATE_TIMED_OUT not in results[0].content, results
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    # PYMESH_LOG_FORMAT=json and PYMESH_LOG=debug: every line is JSON, and debug lines are there.
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert lines and {line["level"] for line in lines} >= {"DEBUG", "INFO"}, {line["level"] for line in lines}


def _keepalive_timers() -> dict[tuple[str, str], str]:
    """Established TCP sockets on this host as (local, peer) → their `ss` timer, if any."""
    listing = subprocess.run(["ss", "-tnoH", "state", "established"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    timers = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            timers[(fields[2], fields[3])] = " ".join(fields[4:])
    return timers


def test_proxied_sockets_have_tcp_keepalive(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    """An idle keep-alive client and the upstream connection behind it both carry the kernel's
    keepalive timer: a peer gone without a FIN (host down, cable out) is found by its probes,
    where nothing else would ever end an idle HTTP/2 or opaque connection."""
    proxy = start_proxy(make_config({"web": [echo_backend.address]}))
    host, port = proxy.address().rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as client:
        assert b" 200 " in _keep_alive_exchange(client).split(b"\r\n", 1)[0]
        local_host, local_port = client.getsockname()[:2]
        mine = f"{local_host}:{local_port}"

        def both_probed() -> bool:
            timers = _keepalive_timers()
            accepted = timers.get((proxy.address(), mine), "")
            upstream = [t for (_, peer), t in timers.items() if peer == echo_backend.address]
            return "keepalive" in accepted and any("keepalive" in t for t in upstream)

        assert wait_until(both_probed), _keepalive_timers()
