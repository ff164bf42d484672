"""Lifecycle: the admin endpoint, draining on SIGTERM (or stop()), and structured logs."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from .backends import GATE_TIMED_OUT, GATE_TIMEOUT, EchoBackend
from .conftest import NativeProxy, ProxyFactory, make_config, wait_until


def test_admin_endpoint(start_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    config = make_config({"web": [echo_backend.address]})
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
    rejected = httpx.put(f"{admin}/config", content="listeners: [{address: 1.2.3}]")
    assert rejected.status_code == 400
    assert rejected.json()["error"]["path"] == "listeners[0].address"
    # Latency buckets start at 50 µs, as CONVENTIONS.md asks.
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
    # While draining, new connections are refused. (/ready cannot be asked yet: a new admin
    # connection is closed unanswered once the drain starts.)
    assert wait_until(lambda: _refused(proxy.address()), timeout=10)
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
