"""The mesh end to end: a real control plane streaming to real proxies under traffic.

Endpoints change while requests flow; the control plane goes away for a minute and
comes back; nothing fails, and the proxies resynchronise as soon as it returns."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .backends import EchoBackend, start_echo_backend
from .conftest import NativeProxy
from .control_plane import ControlPlane, free_port, write_services
from .traffic import Traffic


@pytest.fixture
def echo_backends() -> Iterator[list[EchoBackend]]:
    backends = [start_echo_backend() for _ in range(3)]
    yield backends
    for backend in backends:
        backend.stop()


def loadgen() -> str:
    """The Rust load generator (scripts/install --test builds it)."""
    built = Path(__file__).resolve().parent.parent / "target" / "release" / "pymesh-loadgen"
    if not built.exists():
        pytest.fail("pymesh-loadgen is not built: run scripts/install --test")
    return str(built)


def meshed_proxy_config(*control_planes: str) -> dict:
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0"}],
        # No identity here: these tests are about discovery, so the control plane is a
        # development one (test_mtls and test_control_tls run it over TLS).
        "controlPlane": {"addresses": list(control_planes), "namespace": "default",
                         "serviceAccount": "client", "plaintext": True},
    }


def running_endpoints(proxy: NativeProxy, service: str = "web") -> set[str]:
    config = httpx.get(f"http://{proxy.admin}/config", timeout=5).json()
    for s in config.get("services", []):
        if s["name"] == service:
            return {e["address"] for e in s.get("endpoints", [])}
    return set()


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check`` held; fails the test after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def set_web(source: Path, backends: list[EchoBackend]) -> None:
    write_services(source / "web.yaml", [{"name": "web", "endpoints": [{"address": b.address} for b in backends]}])


def test_endpoints_change_under_traffic_without_failures(
    tmp_path: Path, native_proxy: Callable[..., NativeProxy], echo_backends: list[EchoBackend]
) -> None:
    source = tmp_path / "mesh"
    source.mkdir()
    set_web(source, echo_backends[:1])
    control = ControlPlane(f"file:{source}", tmp_path / "control.log")
    try:
        proxies = [native_proxy(meshed_proxy_config(control.address)) for _ in range(2)]
        for proxy in proxies:
            wait_for(lambda p=proxy: running_endpoints(p) == {echo_backends[0].address}, 10)

        a, b, c = echo_backends
        steps = [[a, b], [b, c], [c], [a, b, c], [a]]
        # The Rust load generator at a constant 250 rps through each proxy (500 in all).
        loads = [subprocess.Popen(
            [loadgen(), "--url", f"http://{proxy.address()}/echo", "--rate", "250", "--duration", "8",
             "--warmup", "0", "--connections", "4", "--header", "host: web", "--json"],
            stdout=subprocess.PIPE, text=True) for proxy in proxies]
        time.sleep(0.5)
        for step in steps:
            set_web(source, step)
            wanted = {e.address for e in step}
            for proxy in proxies:
                wait_for(lambda p=proxy, w=wanted: running_endpoints(p) == w, 5)
            time.sleep(0.5)  # let traffic flow on this set
        reports = [json.loads(load.communicate(timeout=30)[0]) for load in loads]
        # Counts, not rates: the rate a shared machine reaches is perf/'s business.
        for report, proxy in zip(reports, proxies, strict=True):
            seen = {k: report.get(k) for k in ("requests", "errors", "status_counts", "error_counts")}
            assert report["errors"] == 0, (seen, proxy.logs[-3000:])
            assert report["requests"] > 0 and report["status_counts"] == {"200": report["requests"]}, seen
        assert all(backend.connections > 0 for backend in echo_backends)
    finally:
        control.stop()


def test_control_plane_away_for_a_minute_then_resync(
    tmp_path: Path, native_proxy: Callable[..., NativeProxy], echo_backends: list[EchoBackend]
) -> None:
    source = tmp_path / "mesh"
    source.mkdir()
    a, b, _ = echo_backends
    set_web(source, [a])
    port = free_port()
    control = ControlPlane(f"file:{source}", tmp_path / "control.log", "--listen", f"127.0.0.1:{port}")
    proxies = [native_proxy(meshed_proxy_config(control.address)) for _ in range(2)]
    try:
        for proxy in proxies:
            wait_for(lambda p=proxy: running_endpoints(p) == {a.address}, 10)
        # Bounded well past the outage and resync; a client stopping on its bounds fails the test.
        bounds = {"clients": 2, "max_requests": 2_000_000, "max_seconds": 180}
        with Traffic(proxies[0].address(), "web", **bounds) as first, \
                Traffic(proxies[1].address(), "web", **bounds) as second:
            loads = (first, second)
            for load in loads:
                load.wait_for(200)
            control.kill()
            # Fail static: a minute without the control plane, and requests keep succeeding
            # through all of it (checked every few seconds, not only at the end).
            back = time.monotonic() + 60
            while (left := back - time.monotonic()) > 0:
                marks = [load.sent for load in loads]
                time.sleep(min(5, left))
                for load, mark in zip(loads, marks, strict=True):
                    load.wait_for(mark + 20)
                assert first.errors == [] and second.errors == [], (first.errors[:3], second.errors[:3])
            set_web(source, [b])  # changed while the control plane was away
            assert all(running_endpoints(p) == {a.address} for p in proxies)
            control = ControlPlane(f"file:{source}", tmp_path / "control2.log", "--listen", f"127.0.0.1:{port}")
            for proxy in proxies:
                wait_for(lambda p=proxy: running_endpoints(p) == {b.address}, 30)
            # And on through the resync: the new endpoint serves both proxies' traffic.
            for load in loads:
                load.wait_for(load.sent + 200)
            assert b.connections > 0
            assert first.exhausted == 0 and second.exhausted == 0, "traffic stopped before the resync ended"
        assert first.errors == [] and second.errors == [], (first.errors[:3], second.errors[:3])
        assert set(first.statuses) | set(second.statuses) == {200}, (first.statuses, second.statuses)
    finally:
        control.stop()


def test_two_replicas_on_etcd_and_proxies_fail_over(
    tmp_path: Path, native_proxy: Callable[..., NativeProxy], echo_backends: list[EchoBackend]
) -> None:
    """Two control-plane replicas on one etcd; the one the proxies use is killed; they
    move to the other and keep following changes, with no failed request."""
    from .control_plane import Etcd

    etcd = Etcd(tmp_path / "etcd")
    a, b, c = echo_backends
    etcd.put("/pymesh/services/web", {})
    etcd.put(f"/pymesh/endpoints/web/{a.address}", {})
    replicas = [ControlPlane(f"etcd:{etcd.endpoint}", tmp_path / f"control{i}.log") for i in range(2)]
    try:
        # Both proxies list the replicas in the same order, so both start on the first.
        proxies = [native_proxy(meshed_proxy_config(*(r.address for r in replicas))) for _ in range(2)]
        for proxy in proxies:
            wait_for(lambda p=proxy: running_endpoints(p) == {a.address}, 10)
        with Traffic(proxies[0].address(), "web", clients=2) as first, \
                Traffic(proxies[1].address(), "web", clients=2) as second:
            first.wait_for(100)
            replicas[0].kill()
            # A change written while the first replica is gone reaches the proxies
            # through the second.
            etcd.put(f"/pymesh/endpoints/web/{b.address}", {})
            etcd.delete(f"/pymesh/endpoints/web/{a.address}")
            for proxy in proxies:
                wait_for(lambda p=proxy: running_endpoints(p) == {b.address}, 10)
            replicas[1].register("web", c.address)
            for proxy in proxies:
                wait_for(lambda p=proxy: running_endpoints(p) == {b.address, c.address}, 5)
            second.wait_for(second.sent + 100)
        assert first.errors == [] and second.errors == [], (first.errors[:3], second.errors[:3])
        assert set(first.statuses) | set(second.statuses) == {200}
        connected = {p.identity.proxy_id for p in replicas[1].status().proxies}
        assert len(connected) == 2, replicas[1].status()
    finally:
        for replica in replicas:
            replica.stop()
        etcd.stop()
