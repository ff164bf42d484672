"""Lifecycle: the admin endpoint, draining on SIGTERM (or stop()), and structured logs."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from .backends import EchoBackend
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
    proxy: NativeProxy = native_proxy(make_config({"web": [echo_backend.address]}))
    results: list[httpx.Response | Exception] = []

    def slow_request() -> None:
        try:
            results.append(httpx.get(f"http://{proxy.address()}/slow?ms=1000", headers={"host": "web"},
                                     timeout=10))
        except httpx.HTTPError as e:
            results.append(e)

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert wait_until(lambda: echo_backend.connections == 1)
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    # While draining, new connections are refused and /ready says so.
    assert wait_until(lambda: _refused(proxy.address()), timeout=2)
    code = proxy.process.wait(timeout=10)
    thread.join(timeout=10)
    assert code == 0
    assert len(results) == 1 and isinstance(results[0], httpx.Response), results
    assert results[0].status_code == 200 and results[0].text == "slow done"
    assert time.monotonic() - started < 5  # it exits when drained, not at the end of the grace period
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
    thread = threading.Thread(
        target=lambda: _ignore(lambda: httpx.get(f"http://{proxy.address()}/slow?ms=5000",
                                                 headers={"host": "web"}, timeout=10)))
    thread.start()
    assert wait_until(lambda: echo_backend.connections == 1)
    started = time.monotonic()
    assert proxy.terminate() == 0
    assert time.monotonic() - started < 3
    thread.join(timeout=10)


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
