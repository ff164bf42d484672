"""Per-service reliability through the proxy, with numbers: failure accrual (ejection),
PeakEWMA and the other balancers, retries with a budget and body replay, deadlines
(request, per-try, gRPC), load shedding, rate limiting, memory under overload, and active
health checks.

Backends are `ControlBackend`s whose behaviour each test changes while traffic flows.
Tests run against both front doors where the front door could matter (config plumbing,
reloads); the heavier load tests use the native sidecar only.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import hashlib
import math
import os
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

import pymesh
from pymesh.metrics import total

from .conftest import NativeProxy, ProxyFactory, RunningProxy, make_config, wait_until
from .control_backend import (
    REQUEST_ID,
    SERVED_BY,
    ControlBackend,
    ControlBackends,
    ControlGrpcBackend,
    GrpcHeaderRecorder,
    grpc_timeout_seconds,
)

# ---- names the engine exposes for these features: adjust here, in one place -------------

# Counter of endpoints taken out of rotation by failure accrual; labels: dst_service.
EJECTIONS = "endpoint_ejections_total"
# Counter of retries; labels: dst_service, and RETRY_RESULT = attempted | budget_exhausted.
RETRIES = "retry_total"
RETRY_RESULT = "result"
RETRY_ATTEMPTED = "attempted"
RETRY_BUDGET_EXHAUSTED = "budget_exhausted"
# The header on answers the proxy makes itself, and its values.
REASON = "pymesh-reason"
SHED = "shed"
RATE_LIMITED = "rate-limited"
TIMEOUT = "timeout"
CONNECT_FAILED = "connect-failed"

SERVICE = "web"
#: seconds a slow backend holds a request: far longer than the proxy's timeouts under test,
#: so "answered before the backend would have" is ordering, not a latency bound
SLOW = 5


def service_config(addresses: list[str], **service: Any) -> dict[str, Any]:
    """One listener, one service `web` over `addresses`, with `service` settings merged in
    (protobuf JSON names). The schema already knows every setting, so it is checked here."""
    config = make_config({SERVICE: addresses})
    config["services"][0].update(service)
    pymesh.validate(config)
    return config


def with_endpoints(config: dict[str, Any], addresses: list[str]) -> dict[str, Any]:
    changed = copy.deepcopy(config)
    changed["services"][0]["endpoints"] = [{"address": a} for a in addresses]
    return changed


def retries(text: str, result: str) -> float:
    return total(text, RETRIES, dst_service=SERVICE, **{RETRY_RESULT: result})


# ---- load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    index: int
    status: int | None  # None: the client got no response (error says why)
    served_by: str
    reason: str
    latency: float
    error: str = ""


@dataclass
class Load:
    """Client threads sending GETs, each on one keep-alive connection, bounded in count and
    time; paced to `rate` requests per second over all clients if given, else flat out.
    Outcomes are kept in completion order."""

    address: str
    host: str = SERVICE
    path: str = "/work"
    clients: int = 4
    rate: float | None = None
    max_requests: int = 10_000
    max_seconds: float = 30.0
    headers: Callable[[int], dict[str, str]] | None = None
    timeout: float = 10.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _next: int = 0
    _started: float = 0.0
    elapsed: float = 0.0

    def __enter__(self) -> Load:
        self._started = time.monotonic()
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self) -> None:
        """Waits for the clients to reach their bounds (or to be stopped)."""
        for thread in self._threads:
            thread.join(timeout=self.max_seconds + self.timeout + 5)
        if not self.elapsed:
            self.elapsed = time.monotonic() - self._started

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self.outcomes)

    @property
    def statuses(self) -> Counter[int | None]:
        with self._lock:
            return Counter(o.status for o in self.outcomes)

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return [o.error for o in self.outcomes if o.status is None]

    @property
    def served_by(self) -> Counter[str]:
        with self._lock:
            return Counter(o.served_by for o in self.outcomes)

    def wait_for(self, requests: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.sent >= requests, f"load stalled at {self.sent} of {requests} requests"

    def _take(self) -> int | None:
        with self._lock:
            index = self._next
            if index >= self.max_requests:
                return None
            self._next += 1
            return index

    def _run(self) -> None:
        deadline = self._started + self.max_seconds
        with httpx.Client(base_url=f"http://{self.address}", headers={"host": self.host},
                          timeout=self.timeout) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                index = self._take()
                if index is None:
                    return
                if self.rate:
                    slot = self._started + index / self.rate
                    if self._stop.wait(max(0.0, slot - time.monotonic())):
                        return
                headers = self.headers(index) if self.headers else None
                started = time.monotonic()
                try:
                    response = client.get(self.path, headers=headers)
                    outcome = Outcome(index, response.status_code, response.headers.get(SERVED_BY, ""),
                                      response.headers.get(REASON, ""), time.monotonic() - started)
                except httpx.HTTPError as e:
                    outcome = Outcome(index, None, "", "", time.monotonic() - started,
                                      f"{type(e).__name__}: {e}")
                with self._lock:
                    self.outcomes.append(outcome)


def sequential(address: str, count: int, *, host: str = SERVICE, path: str = "/work") -> list[Outcome]:
    """`count` GETs one after another on one connection, with the collector paused."""
    outcomes = []
    gc.collect()
    gc.disable()
    try:
        with httpx.Client(base_url=f"http://{address}", headers={"host": host}, timeout=10) as client:
            for i in range(count):
                started = time.monotonic()
                response = client.get(path)
                outcomes.append(Outcome(i, response.status_code, response.headers.get(SERVED_BY, ""),
                                        response.headers.get(REASON, ""), time.monotonic() - started))
    finally:
        gc.enable()
    return outcomes


@dataclass
class Burst:
    """Clients whose connections to the proxy are opened beforehand (through an unlimited
    `warm` service), released at once by a barrier, each sending `per_client` GETs."""

    proxy: RunningProxy
    clients: int
    per_client: int = 1
    outcomes: list[Outcome] = field(default_factory=list)
    duration: float = 0.0

    connections: list[httpx.Client] = field(default_factory=list)

    def open(self) -> Burst:
        """Opens every client's connection, one request at a time (nothing may hit a limit)."""
        for _ in range(self.clients):
            client = httpx.Client(base_url=f"http://{self.proxy.address()}", timeout=10)
            self.connections.append(client)
            assert client.get("/warm-up", headers={"host": "warm"}).status_code == 200
        return self

    def run(self) -> list[Outcome]:
        lock = threading.Lock()
        barrier = threading.Barrier(self.clients + 1)
        connections = self.connections
        assert len(connections) == self.clients, "open() first"
        try:

            def send(i: int) -> None:
                barrier.wait(timeout=10)
                for j in range(self.per_client):
                    started = time.monotonic()
                    try:
                        response = connections[i].get("/work", headers={"host": SERVICE})
                        outcome = Outcome(i * self.per_client + j, response.status_code,
                                          response.headers.get(SERVED_BY, ""), response.headers.get(REASON, ""),
                                          time.monotonic() - started)
                    except httpx.HTTPError as e:
                        outcome = Outcome(i, None, "", "", time.monotonic() - started, f"{type(e).__name__}: {e}")
                    with lock:
                        self.outcomes.append(outcome)

            threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(self.clients)]
            for thread in threads:
                thread.start()
            barrier.wait(timeout=10)
            started = time.monotonic()
            for thread in threads:
                thread.join(timeout=30)
            self.duration = time.monotonic() - started
            assert not any(t.is_alive() for t in threads), "burst clients did not finish"
        finally:
            for client in connections:
                client.close()
        return self.outcomes


def with_warm_service(config: dict[str, Any], address: str) -> dict[str, Any]:
    """Adds a service `warm` without limits, for opening client connections beforehand."""
    config = copy.deepcopy(config)
    config["services"].append({"name": "warm", "endpoints": [{"address": address}]})
    return config


@pytest.fixture
def backends3() -> Iterator[ControlBackends]:
    with ControlBackends(3) as backends:
        yield backends


# ---- failure accrual ----------------------------------------------------------------------


def test_failing_endpoint_is_ejected(start_proxy: ProxyFactory, backends3: ControlBackends) -> None:
    """One of three endpoints answers every request 503: once failure accrual has ejected it,
    clients see ≥ 99.9% success, and the failing endpoint sees almost no traffic."""
    bad = backends3[2]
    bad.fail(1.0, 503)
    proxy = start_proxy(service_config(backends3.addresses,
                                       failureAccrual={"consecutiveFailures": 5, "baseEjection": "1s"}))
    with Load(proxy.address(), clients=4, max_requests=2000, max_seconds=60) as load:
        load.join()
    assert load.errors == [], load.errors[:5]
    assert load.sent == 2000
    after = load.outcomes[100:]
    succeeded = sum(1 for o in after if o.status == 200)
    assert succeeded / len(after) >= 0.999, Counter((o.status, o.reason) for o in after)
    # Ejected, not merely retried around: only the first failures and the re-admission
    # probes reach it (5 + one per ejection period).
    assert bad.traffic <= 40, f"the failing endpoint still got {bad.traffic} of 2000 requests"
    assert total(proxy.metrics(), EJECTIONS, dst_service=SERVICE) >= 1


# ---- balancers ----------------------------------------------------------------------------


def test_peak_ewma_steers_away_from_a_slow_endpoint(native_proxy: Callable[..., NativeProxy],
                                                    backends3: ControlBackends) -> None:
    """One endpoint 50 ms slower, default balancer: nearly all traffic goes to the fast
    endpoints (counted; what that does to the client's latency is perf/'s to measure)."""
    slow = backends3[0]
    slow.set_latency(0.050)
    proxy = native_proxy(service_config(backends3.addresses))  # PEAK_EWMA is the default

    sequential(proxy.address(), 200)  # warm-up: the balancer learns the latencies
    measured = sequential(proxy.address(), 2000)

    assert {o.status for o in measured} == {200}
    served = Counter(o.served_by for o in measured)
    fast_share = (len(measured) - served[slow.name]) / len(measured)
    assert fast_share >= 0.95, dict(served)
    assert served[backends3[1].name] > 0 and served[backends3[2].name] > 0, dict(served)


def test_round_robin_spreads_evenly(start_proxy: ProxyFactory, backends3: ControlBackends) -> None:
    proxy = start_proxy(service_config(backends3.addresses, balancer={"kind": "ROUND_ROBIN"}))
    outcomes = sequential(proxy.address(), 300)
    assert {o.status for o in outcomes} == {200}
    served = Counter(o.served_by for o in outcomes)
    assert set(served) == {b.name for b in backends3}
    assert max(served.values()) - min(served.values()) <= 2, dict(served)
    assert [b.traffic for b in backends3] == [served[b.name] for b in backends3]


def test_least_request_prefers_the_idle_endpoint(native_proxy: Callable[..., NativeProxy]) -> None:
    """Two endpoints, one holding every request 300 ms: with LEAST_REQUEST nearly all
    requests go to the one with nothing in flight (round-robin would split them evenly)."""
    with ControlBackends(2) as backends:
        busy, idle = backends[0], backends[1]
        busy.set_latency(0.3)
        proxy = native_proxy(service_config(backends.addresses, balancer={"kind": "LEAST_REQUEST"}))
        with Load(proxy.address(), clients=8, max_requests=400, max_seconds=120) as load:
            load.join()
        assert load.sent == 400, f"only {load.sent} of 400 requests were sent"
        assert load.errors == [] and set(load.statuses) == {200}, (load.statuses, load.errors[:3])
        served = load.served_by
        assert served[idle.name] / load.sent >= 0.9, dict(served)


def test_ring_hash_is_sticky_and_reloads_fail_nothing(start_proxy: ProxyFactory) -> None:
    """RING_HASH on `x-user`: a user always reaches the same endpoint; adding an endpoint moves
    users only onto it, removing one moves only its users; and neither reload fails a
    request in flight."""
    users = [f"user-{i}" for i in range(40)]
    with ControlBackends(4) as backends:
        a, b, c, d = backends
        for backend in backends:
            backend.set_latency(0.010)  # so that requests are in flight at each reload
        config = service_config([a.address, b.address, c.address],
                                balancer={"kind": "RING_HASH", "hashHeader": "x-user"})
        proxy = start_proxy(config)

        def placement() -> dict[str, str]:
            placed: dict[str, str] = {}
            with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": SERVICE},
                              timeout=10) as client:
                for user in users:
                    seen = set()
                    for _ in range(3):
                        response = client.get("/who", headers={"x-user": user})
                        assert response.status_code == 200, response.text
                        seen.add(response.headers[SERVED_BY])
                    assert len(seen) == 1, f"{user} was spread over {seen}"
                    placed[user] = seen.pop()
            return placed

        before = placement()
        assert len(set(before.values())) >= 2, f"40 users all hashed to one endpoint: {before}"

        with Load(proxy.address(), clients=4, max_requests=20_000, max_seconds=40,
                  headers=lambda i: {"x-user": users[i % len(users)]}) as load:
            load.wait_for(100)
            proxy.reload(with_endpoints(config, [a.address, b.address, c.address, d.address]))
            load.wait_for(load.sent + 100)
            grown = placement()
            proxy.reload(with_endpoints(config, [b.address, c.address, d.address]))
            load.wait_for(load.sent + 100)
            shrunk = placement()
            load.wait_for(load.sent + 50)
        assert load.errors == [], load.errors[:5]
        assert set(load.statuses) == {200}, load.statuses

        assert d.name in grown.values(), "the added endpoint got no users"
        moved = {u: (before[u], grown[u]) for u in users if grown[u] not in (before[u], d.name)}
        assert moved == {}, f"adding an endpoint moved users between old endpoints: {moved}"
        assert a.name not in shrunk.values()
        moved = {u: (grown[u], shrunk[u]) for u in users if grown[u] != a.name and shrunk[u] != grown[u]}
        assert moved == {}, f"removing an endpoint moved users of other endpoints: {moved}"


# ---- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("graceful", [True, False], ids=["graceful", "abrupt"])
def test_rolling_restart_loses_no_get(native_proxy: Callable[..., NativeProxy],
                                      backends3: ControlBackends, graceful: bool) -> None:
    """All three endpoints restarted one after another under ~500 requests/s: not one GET is
    lost. Graceful (in-flight requests finish, idle connections close) relies on the default
    retry policy and failure accrual; abrupt (every connection reset) also retries `reset`."""
    for backend in backends3:
        backend.set_latency(0.010)  # ~5 requests in flight at any time
    service: dict[str, Any] = {}
    if not graceful:
        service["retries"] = {"retryOn": ["connect-failure", "reset", "gateway-error"]}
    proxy = native_proxy(service_config(backends3.addresses, **service))
    rate = 500
    with Load(proxy.address(), clients=12, rate=rate, max_requests=rate * 120, max_seconds=120) as load:
        load.wait_for(rate // 2)
        for backend in backends3:
            backend.stop(graceful=graceful)
            load.wait_for(load.sent + 100, timeout=30)  # requests go on while it is down
            backend.start()
            came_back = backend.traffic
            # Taken back into rotation after its restart, before the next one goes down.
            assert wait_until(lambda b=backend, n=came_back: b.traffic > n, timeout=30), backend
            load.wait_for(load.sent + 100, timeout=30)
        load.stop()
    assert load.errors == [], (len(load.errors), load.errors[:5])
    assert set(load.statuses) == {200}, (load.statuses, Counter(o.reason for o in load.outcomes if o.status != 200))


def test_retry_budget_caps_extra_load(native_proxy: Callable[..., NativeProxy],
                                      backends3: ControlBackends) -> None:
    """Every endpoint fails: retries add at most ratio × requests + min_per_second × seconds,
    far below the max_attempts× a budgetless retry policy would send."""
    for backend in backends3:
        backend.fail(1.0, 503)
    ratio, min_per_second, max_attempts = 0.2, 1, 3
    proxy = native_proxy(service_config(
        backends3.addresses,
        retries={"maxAttempts": max_attempts, "budget": {"ratio": ratio, "minPerSecond": min_per_second}},
        failureAccrual={"consecutiveFailures": 0},  # off: only the budget limits retries here
    ))
    requests = 300
    with Load(proxy.address(), clients=4, rate=100, max_requests=requests, max_seconds=30) as load:
        load.join()
    assert load.errors == [] and load.sent == requests, (load.sent, load.errors[:3])
    assert set(load.statuses) == {503}, load.statuses
    received = backends3.traffic
    seconds = math.ceil(load.elapsed)
    bound = requests * (1 + ratio) + min_per_second * seconds + 10
    assert received <= bound, f"backends got {received} requests for {requests} sent (bound {bound:.0f})"
    assert received < 1.5 * requests < requests * max_attempts
    assert received > requests, "no retry was attempted at all"
    text = proxy.metrics()
    attempted, exhausted = retries(text, RETRY_ATTEMPTED), retries(text, RETRY_BUDGET_EXHAUSTED)
    assert attempted == received - requests, (attempted, received)
    assert exhausted >= requests / 2, f"{RETRIES}{{{RETRY_RESULT}={RETRY_BUDGET_EXHAUSTED}}} = {exhausted}"


def closed_port_address() -> str:
    """A loopback address nothing listens on (bound by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_connect_failures_are_retried_even_for_post(start_proxy: ProxyFactory) -> None:
    """A connect failure is always safe to retry (nothing was sent), POST included, with the
    default policy; when every endpoint refuses, the answer is 502 `connect-failed`, fast."""
    with ControlBackend("up") as up:
        down = closed_port_address()
        proxy = start_proxy(service_config([down, up.address], balancer={"kind": "ROUND_ROBIN"},
                                           failureAccrual={"consecutiveFailures": 0}))
        with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": SERVICE}, timeout=10) as client:
            for i in range(10):
                response = client.post(f"/work/{i}", content=b"payload-%d" % i)
                assert response.status_code == 200, (i, response.status_code, response.headers.get(REASON))
                assert response.headers[SERVED_BY] == up.name
        assert up.traffic == 10
        assert retries(proxy.metrics(), RETRY_ATTEMPTED) >= 4  # round-robin: every other first try failed

        nowhere = start_proxy(service_config([closed_port_address(), closed_port_address()]))
        response = httpx.get(f"http://{nowhere.address()}/work", headers={"host": SERVICE}, timeout=10)
        assert response.status_code == 502 and response.headers.get(REASON) == CONNECT_FAILED, response.headers


def _chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_retries_replay_request_bodies(start_proxy: ProxyFactory) -> None:
    """POSTs (retry_non_idempotent) against a backend failing every other request all
    succeed, and every copy of every body the backend received is intact, sized or chunked.
    A body over max_body_bytes is sent once and not retried."""
    with ControlBackend("a") as backend:
        backend.fail(0.5, 503)
        proxy = start_proxy(service_config(
            [backend.address],
            retries={"retryNonIdempotent": True, "maxAttempts": 3, "maxBodyBytes": 16 * 1024,
                     "budget": {"ratio": 1.0, "minPerSecond": 100}},
            failureAccrual={"consecutiveFailures": 0},
        ))
        bodies = {f"small-{i}": os.urandom(10 * 1024) for i in range(40)}
        with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": SERVICE}, timeout=10) as client:
            for i, (request_id, body) in enumerate(bodies.items()):
                content = body if i % 2 == 0 else _chunks(body)  # Content-Length, then chunked
                response = client.post("/upload", content=content, headers={REQUEST_ID: request_id})
                assert response.status_code == 200, (request_id, response.status_code, response.text)
                assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()

            copies: dict[str, list[tuple[int, str]]] = defaultdict(list)
            for seen in backend.received:
                copies[seen.request_id].append((seen.body_size, seen.body_sha256))
            for request_id, body in bodies.items():
                expected = (len(body), hashlib.sha256(body).hexdigest())
                assert copies[request_id] and set(copies[request_id]) == {expected}, request_id
            replayed = [r for r in bodies if len(copies[r]) > 1]
            assert len(replayed) >= len(bodies) // 4, f"only {len(replayed)} requests were retried"

            # Every attempt fails now: a small body is tried max_attempts times, a big one once.
            backend.fail(1.0, 503)
            small, big = os.urandom(10 * 1024), os.urandom(32 * 1024)
            for request_id, body in (("small-failing", small), ("big-failing", big)):
                response = client.post("/upload", content=body, headers={REQUEST_ID: request_id})
                assert response.status_code == 503, response.text
        attempts = Counter(seen.request_id for seen in backend.received)
        assert attempts["small-failing"] == 3
        assert attempts["big-failing"] == 1, "a body over max_body_bytes was retried"
        [big_seen] = [s for s in backend.received if s.request_id == "big-failing"]
        assert (big_seen.body_size, big_seen.body_sha256) == (len(big), hashlib.sha256(big).hexdigest())


def test_grpc_unavailable_is_retried(start_proxy: ProxyFactory) -> None:
    """A gRPC backend answering every other call UNAVAILABLE: with retries (retry_on_grpc
    defaults to UNAVAILABLE) every call succeeds."""
    with ControlGrpcBackend("g") as backend:
        backend.fail(0.5, grpc.StatusCode.UNAVAILABLE)
        proxy = start_proxy(service_config(
            [backend.address],
            retries={"retryNonIdempotent": True, "budget": {"ratio": 1.0, "minPerSecond": 100}},
            failureAccrual={"consecutiveFailures": 0},
        ))
        with grpc_channel(proxy) as channel:
            call = channel.unary_unary("/test.Echo/Unary")
            for i in range(30):
                assert call(b"hello-%d" % i, timeout=5) == b"g:hello-%d" % i
        outcomes = backend.outcomes()
        assert outcomes[grpc.StatusCode.UNAVAILABLE] >= 10, outcomes
        assert outcomes[grpc.StatusCode.OK] == 30, outcomes
        assert retries(proxy.metrics(), RETRY_ATTEMPTED) == outcomes[grpc.StatusCode.UNAVAILABLE]


# ---- deadlines ----------------------------------------------------------------------------


def test_service_request_timeout_answers_504(start_proxy: ProxyFactory) -> None:
    with ControlBackend() as slow:
        slow.set_latency(SLOW)
        proxy = start_proxy(service_config([slow.address], timeouts={"request": "0.3s"}))
        started = time.monotonic()
        response = httpx.get(f"http://{proxy.address()}/work", headers={"host": SERVICE}, timeout=SLOW + 10)
        elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.headers.get(REASON) == TIMEOUT
    # Not before the timeout (timers never fire early), and before the backend would answer.
    assert 0.3 <= elapsed < SLOW, f"answered after {elapsed:.2f} s"


def test_per_try_timeout_retries_on_the_fast_endpoint(start_proxy: ProxyFactory) -> None:
    with ControlBackends(2) as backends:
        slow, fast = backends[0], backends[1]
        slow.set_latency(SLOW)
        proxy = start_proxy(service_config(backends.addresses, balancer={"kind": "ROUND_ROBIN"},
                                           timeouts={"perTry": "0.1s", "request": f"{SLOW * 2}s"}))
        with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": SERVICE},
                          timeout=SLOW * 2) as client:
            for i in range(10):
                started = time.monotonic()
                response = client.get(f"/work/{i}")
                elapsed = time.monotonic() - started
                assert response.status_code == 200, (i, response.status_code, response.headers.get(REASON))
                assert response.headers[SERVED_BY] == fast.name, f"request {i}: {response.headers}"
                # Answered before the slow endpoint could have: its try was cut short.
                assert elapsed < SLOW, f"request {i} took {elapsed:.2f} s"
        assert slow.traffic >= 1, "the slow endpoint was never tried"
        assert retries(proxy.metrics(), RETRY_ATTEMPTED) >= 1


def grpc_channel(proxy: RunningProxy, authority: str = SERVICE) -> grpc.Channel:
    return grpc.insecure_channel(proxy.address(), options=[
        ("grpc.default_authority", authority),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),  # retries, if any, are the proxy's
    ])


def test_grpc_client_deadline_is_propagated(start_proxy: ProxyFactory) -> None:
    """A client deadline of 0.3 s against a slow handler: DEADLINE_EXCEEDED before the handler
    could answer, the server saw the deadline (not none), and its handler was cancelled, not
    left running."""
    with ControlGrpcBackend("g") as backend:
        backend.set_latency(SLOW)
        proxy = start_proxy(service_config([backend.address]))
        with grpc_channel(proxy) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary("/test.Echo/Slow")(b"x", timeout=0.3)
            elapsed = time.monotonic() - started
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert elapsed < SLOW, f"DEADLINE_EXCEEDED after {elapsed:.2f} s"
        assert wait_until(lambda: backend.total == 1, timeout=10)
        [call] = backend.calls
        assert call.deadline is not None, "the server saw no deadline: grpc-timeout was not propagated"
        assert 0 < call.deadline <= 0.31, call  # grpcio rounds 0.3 s up to "301m" on the wire
        assert call.cancelled_after is not None and call.cancelled_after < SLOW, call


def test_grpc_timeout_header_shrinks_through_the_proxy(start_proxy: ProxyFactory) -> None:
    """A gRPC request sent with `grpc-timeout: 300m` reaches the server with less than
    300 ms: the proxy forwards the time left, not the client's header unchanged."""
    with GrpcHeaderRecorder() as recorder:
        proxy = start_proxy(service_config([recorder.address]))
        with httpx.Client(http1=False, http2=True, base_url=f"http://{proxy.address()}", timeout=5) as client:
            response = client.post("/test.Echo/Unary", content=b"\x00\x00\x00\x00\x00", headers={
                "host": SERVICE, "content-type": "application/grpc", "te": "trailers", "grpc-timeout": "300m",
            })
        assert response.status_code == 200 and response.headers.get("grpc-status") == "0", response.headers
        [seen] = recorder.headers
        assert "grpc-timeout" in seen, f"grpc-timeout was dropped: {seen}"
        forwarded = grpc_timeout_seconds(seen["grpc-timeout"])
        assert 0 < forwarded < 0.3, f"the server got grpc-timeout {seen['grpc-timeout']} for a client's 300m"


# ---- limits -------------------------------------------------------------------------------


def test_max_concurrent_sheds_the_excess_at_once(start_proxy: ProxyFactory) -> None:
    with ControlBackend() as backend:
        proxy = start_proxy(with_warm_service(
            service_config([backend.address], limits={"maxConcurrent": 5}), backend.address))
        burst = Burst(proxy, clients=50).open()
        backend.set_latency(SLOW)
        backend.reset_counts()
        outcomes = burst.run()
        statuses = Counter(o.status for o in outcomes)
        assert [o.error for o in outcomes if o.status is None] == []
        assert statuses == {200: 5, 503: 45}, statuses
        shed = [o for o in outcomes if o.status == 503]
        assert {o.reason for o in shed} == {SHED}
        # Outcomes are in completion order: every shed answer came while the admitted five
        # were still held by the backend, so none of them waited in a queue.
        assert [o.status for o in outcomes] == [503] * 45 + [200] * 5, [o.status for o in outcomes]
        assert backend.max_in_flight <= 5 and backend.traffic == 5
        assert total(proxy.metrics(), "requests_shed_total", dst_service=SERVICE, limit="max_concurrent") == 45


def test_max_connections_sheds_what_would_need_another_connection(start_proxy: ProxyFactory) -> None:
    """`limits.maxConnections: 1`: with that one connection busy, a request that would need a
    second is shed at once, counted under its limit."""
    with ControlBackend() as backend:
        proxy = start_proxy(service_config([backend.address], limits={"maxConnections": 1}))
        backend.set_latency(SLOW)
        held: list[int] = []
        thread = threading.Thread(target=lambda: held.append(httpx.get(
            f"http://{proxy.address()}/work", headers={"host": SERVICE}, timeout=SLOW + 10).status_code))
        thread.start()
        assert wait_until(lambda: backend.in_flight == 1, timeout=10)
        response = httpx.get(f"http://{proxy.address()}/work", headers={"host": SERVICE}, timeout=SLOW + 10)
        assert backend.in_flight == 1, "the second request was answered only after the first"
        assert response.status_code == 503 and response.headers.get(REASON) == SHED, response.headers
        thread.join(timeout=SLOW + 15)
        assert held == [200]
        # At least once: each retry attempt of the one request counts (3 here, not 1).
        assert total(proxy.metrics(), "requests_shed_total", dst_service=SERVICE, limit="max_connections") >= 1
        assert backend.traffic == 1


def test_accrual_by_success_rate(start_proxy: ProxyFactory, backends3: ControlBackends) -> None:
    """An endpoint failing every other request never fails 5 in a row, but its success rate
    (50%) is under `minSuccessRate`: it is ejected, and the balancer says so. Without the rate
    setting the same endpoint stays in."""
    flaky = backends3[1]
    flaky.fail(0.5, 503)
    accrual = {"consecutiveFailures": 5, "minSuccessRate": 0.9, "baseEjection": "60s"}
    proxy = start_proxy(service_config(backends3.addresses, balancer={"kind": "ROUND_ROBIN"},
                                       failureAccrual=accrual))
    outcomes = sequential(proxy.address(), 300)
    assert {o.status for o in outcomes} == {200}, Counter(o.status for o in outcomes)  # retried elsewhere
    text = proxy.metrics()
    assert total(text, EJECTIONS, dst_service=SERVICE) == 1, text
    assert total(text, "balancer_endpoints", dst_service=SERVICE, state="ejected") == 1
    assert total(text, "balancer_endpoints", dst_service=SERVICE, state="total") == 3
    served = flaky.traffic
    sequential(proxy.address(), 30)
    assert flaky.traffic == served, "the ejected endpoint still got traffic"

    control = start_proxy(service_config(backends3.addresses, balancer={"kind": "ROUND_ROBIN"},
                                         failureAccrual={**accrual, "minSuccessRate": 0}))
    sequential(control.address(), 300)
    text = control.metrics()
    assert total(text, EJECTIONS, dst_service=SERVICE) == 0, text
    assert total(text, "balancer_endpoints", dst_service=SERVICE, state="ejected") == 0, text


def test_rate_limit_answers_429(start_proxy: ProxyFactory) -> None:
    with ControlBackend() as backend:
        proxy = start_proxy(with_warm_service(
            # A refill too slow to matter within the test: exactly the burst is admitted,
            # however long the clients take (the refill rate is the Rust unit tests' to time).
            service_config([backend.address], rateLimit={"requestsPerSecond": 0.001, "burst": 10}),
            backend.address))
        burst = Burst(proxy, clients=20, per_client=5).open()
        backend.reset_counts()
        outcomes = burst.run()
        statuses = Counter(o.status for o in outcomes)
        assert statuses == {200: 10, 429: 90}, statuses
        assert {o.reason for o in outcomes if o.status == 429} == {RATE_LIMITED}
        assert backend.traffic == statuses[200]
        assert total(proxy.metrics(), "rate_limited_total", dst_service=SERVICE) == 90


def test_overload_is_shed_and_what_is_admitted_succeeds(native_proxy: Callable[..., NativeProxy]) -> None:
    """200 clients against max_concurrent 20 (10× overload): the excess is shed, what is
    admitted succeeds, the proxy survives. (Its memory under this load is measured by
    perf/bench_overload.py, not asserted here.)"""
    with ControlBackend() as backend:
        backend.set_latency(0.1)
        proxy = native_proxy(service_config([backend.address], limits={"maxConcurrent": 20}))
        statuses, reasons, errors = asyncio.run(_overload(proxy.address(), clients=200, requests=10_000,
                                                          max_seconds=120))
        assert proxy.process.poll() is None, "the proxy died under overload"
        assert errors == [], (len(errors), errors[:5])
        assert sum(statuses.values()) == 10_000, f"not every request was answered: {statuses}"
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[503] >= sum(statuses.values()) / 2, statuses
        assert statuses[200] >= 20, statuses
        assert set(reasons) == {SHED}, reasons
        assert backend.max_in_flight <= 20
        assert total(proxy.metrics(), "requests_shed_total", dst_service=SERVICE) == statuses[503]


async def _overload(address: str, *, clients: int, requests: int, max_seconds: float
                    ) -> tuple[Counter[int], Counter[str], list[str]]:
    """`clients` keep-alive connections sending GETs back to back, until `requests` have been
    sent or `max_seconds` have passed. A bare HTTP/1.1 client: httpx cannot offer this load."""
    statuses: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    errors: list[str] = []
    remaining = [requests]
    deadline = time.monotonic() + max_seconds
    host, port = address.rsplit(":", 1)
    request = f"GET /work HTTP/1.1\r\nHost: {SERVICE}\r\n\r\n".encode()

    async def worker() -> None:
        writer = None
        try:
            while remaining[0] > 0 and time.monotonic() < deadline:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                remaining[0] -= 1
                try:
                    writer.write(request)
                    status, headers = await asyncio.wait_for(_read_response(reader), timeout=10)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                        TimeoutError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    writer.close()
                    writer = None
                    continue
                statuses[status] += 1
                if status != 200:
                    reasons[headers.get(REASON, "")] += 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return statuses, reasons, errors


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 response: its status and headers; the body is read and dropped."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head[:-4].split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")  # no trailers expected
    return status, headers


# ---- active health checks -----------------------------------------------------------------


def test_active_health_check_takes_an_endpoint_out_and_back(native_proxy: Callable[..., NativeProxy],
                                                            backends3: ControlBackends) -> None:
    """An endpoint whose /healthz fails (while its real traffic still succeeds) stops
    receiving traffic once its checks have failed, and gets it again once /healthz passes."""
    flaky = backends3[1]
    proxy = native_proxy(service_config(
        backends3.addresses, balancer={"kind": "ROUND_ROBIN"},
        healthCheck={"path": "/healthz", "interval": "0.2s", "unhealthyThreshold": 2},
    ))
    with Load(proxy.address(), clients=2, rate=100, max_requests=6000, max_seconds=60) as load:
        assert wait_until(lambda: all(b.health_checks >= 2 for b in backends3), timeout=10), \
            [b.health_checks for b in backends3]
        load.wait_for(50)
        assert flaky.traffic > 0

        flaky.set_health(500)
        # Two failed checks (the threshold), then one more: by then the verdict is applied and
        # any request sent to it before has been answered.
        failing_from = flaky.health_checks
        assert wait_until(lambda: flaky.health_checks >= failing_from + 3, timeout=10)
        out_at, checks_at = flaky.traffic, flaky.health_checks
        load.wait_for(load.sent + 100)  # traffic goes on, to the others
        assert flaky.traffic == out_at, f"still got {flaky.traffic - out_at} requests after failing /healthz"
        assert wait_until(lambda: flaky.health_checks > checks_at, timeout=10), \
            "an endpoint out of rotation must still be checked"

        flaky.set_health(200)
        assert wait_until(lambda: flaky.traffic > out_at, timeout=10), "it did not come back after passing /healthz"
        load.stop()
    assert load.errors == [] and set(load.statuses) == {200}, (load.statuses, load.errors[:3])
    assert set(flaky.outcomes) == {200}
