"""Scenarios: what load the harness offers, as small dataclasses, and the named sets of them.

A scenario is one kind of traffic (protocol, request rate, response and request body size,
connections, whether every request opens a new connection, duration). `rate == 0` asks for
a closed-loop run (the maximum throughput); `idle_connections > 0` is the memory scenario that
holds that many idle connections open through the proxy instead of sending load.

Protocols: `http1`, `http2` (h2c), `grpc` (unary calls over h2c, one message each) and
`grpc-stream` (one long-lived bidirectional call per connection; a "request" is one message
and its echo). The backend echoes gRPC messages, so a gRPC response is as large as its request
(`body_size`).

`--scenarios` takes a comma-separated list of set names (`smoke`, `full`, `http1`, …) and
scenario names; see `pymesh bench list`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

KIB = 1024
GRPC_PROTOCOLS = ("grpc", "grpc-stream")
HTTP2_PROTOCOLS = ("http2", *GRPC_PROTOCOLS)
# The backend echoes gRPC on any path; these make the calls look like gRPC to a proxy's routes.
GRPC_PATHS = {"grpc": "/pymesh.bench.Echo/Unary", "grpc-stream": "/pymesh.bench.Echo/Stream"}


@dataclass(frozen=True)
class Scenario:
    """One kind of traffic, offered to every system alike."""

    name: str
    description: str
    protocol: str  # "http1" | "http2" | "grpc" | "grpc-stream"
    rate: float  # requests per second over all connections; 0 = closed loop (max throughput)
    response_size: int = KIB  # bytes in every response body
    body_size: int = 0  # bytes in every request body (POST when > 0)
    connections: int = 8
    new_connection_per_request: bool = False
    duration: float = 5.0  # measured seconds
    warmup: float = 1.0  # seconds of load before measuring
    inflight: int | None = None  # HTTP/2 closed loop: requests kept in flight per connection
    idle_connections: int = 0  # > 0: hold this many idle connections and read the proxy's RSS
    # Seconds to hold them before reading memory: the steady state, once a proxy has settled
    # (pymesh parks an idle connection after 1 s and trims the allocator every 2 s).
    idle_hold: float = 5.0

    @property
    def kind(self) -> str:
        """`idle` (memory), `max` (closed loop) or `rate` (open loop at `rate`)."""
        if self.idle_connections:
            return "idle"
        return "max" if self.rate == 0 else "rate"

    @property
    def method(self) -> str:
        return "POST" if self.body_size or self.grpc else "GET"

    @property
    def grpc(self) -> bool:
        """gRPC (unary or streaming): HTTP/2 with trailers end to end."""
        return self.protocol in GRPC_PROTOCOLS

    @property
    def http2(self) -> bool:
        """Whether the client speaks HTTP/2 (h2c, prior knowledge): HTTP/2 and gRPC."""
        return self.protocol in HTTP2_PROTOCOLS

    @property
    def path(self) -> str:
        """The request path: a gRPC method for gRPC, else `/`."""
        return GRPC_PATHS.get(self.protocol, "/")

    @property
    def family(self) -> str:
        """Scenarios that differ only by rate share a family (one line in the rate plots)."""
        size = _size(self.response_size) + (f"-body{_size(self.body_size)}" if self.body_size else "")
        conn = "-newconn" if self.new_connection_per_request else ""
        return f"{self.protocol}-{size}{conn}"

    def with_timing(self, duration: float | None, warmup: float | None) -> Scenario:
        """The same scenario with a different measured duration and/or warm-up (load kinds only)."""
        if self.kind == "idle":
            return self
        changes: dict[str, Any] = asdict(self)
        if duration is not None:
            changes["duration"] = duration
        if warmup is not None:
            changes["warmup"] = warmup
        return Scenario(**changes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind, "method": self.method, "family": self.family}


def _size(n: int) -> str:
    return f"{n // KIB}k" if n >= KIB and n % KIB == 0 else f"{n}b"


def _rates(protocol: str, label: str, connections: int) -> list[Scenario]:
    return [
        Scenario(f"{protocol}-1k-{rate}rps", f"{label}, 1 KiB responses, {rate:,} rps", protocol, rate,
                 connections=connections)
        for rate in (1000, 5000, 10000)
    ]


SMOKE = Scenario("smoke", "HTTP/1.1 keep-alive, 1 KiB responses, 200 rps for 2 s", "http1", 200,
                 connections=4, duration=2.0, warmup=0.5)

SCENARIOS: list[Scenario] = [
    SMOKE,
    *_rates("http1", "HTTP/1.1 keep-alive", 8),
    Scenario("http1-1k-max", "HTTP/1.1 keep-alive, 1 KiB responses, closed loop (max throughput)", "http1", 0,
             connections=8, duration=3.0),
    *_rates("http2", "HTTP/2 (h2c, prior knowledge), multiplexed", 2),
    Scenario("http2-1k-max", "HTTP/2 (h2c), 1 KiB responses, closed loop, 2 connections × 8 streams",
             "http2", 0, connections=2, inflight=8, duration=3.0),
    *[
        Scenario(f"grpc-unary-{rate}rps", f"gRPC unary echo, {rate:,} rps", "grpc", rate, response_size=KIB,
                 body_size=KIB, connections=2)
        for rate in (1000, 5000, 10000)
    ],
    *[
        Scenario(f"grpc-stream-{rate}rps", f"gRPC bidirectional streaming echo, one stream per connection, "
                 f"{rate:,} messages/s", "grpc-stream", rate, response_size=KIB, body_size=KIB, connections=2)
        for rate in (1000, 5000, 10000)
    ],
    Scenario("http1-100k-1000rps", "HTTP/1.1 keep-alive, POST 100 KiB body, 100 KiB response, 1,000 rps", "http1",
             1000, response_size=100 * KIB, body_size=100 * KIB, connections=8),
    Scenario("http1-newconn-1000rps", "HTTP/1.1, a new connection for every request, 1 KiB, 1,000 rps", "http1",
             1000, connections=8, new_connection_per_request=True),
    Scenario("idle-1000", "1,000 idle keep-alive connections held open (one request each), proxy RSS", "http1",
             0, idle_connections=1000),
    Scenario("idle-h2-1000", "1,000 idle HTTP/2 (h2c) connections held open (one request each), proxy RSS",
             "http2", 0, idle_connections=1000),
]

BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIOS}

SETS: dict[str, list[str]] = {
    "smoke": ["smoke"],
    "http1": [s.name for s in SCENARIOS if s.family == "http1-1k" and s.kind != "idle" and s.name != "smoke"],
    "http2": [s.name for s in SCENARIOS if s.family == "http2-1k" and s.kind != "idle"],
    "grpc": [s.name for s in SCENARIOS if s.grpc],
    "grpc-unary": [s.name for s in SCENARIOS if s.protocol == "grpc"],
    "grpc-stream": [s.name for s in SCENARIOS if s.protocol == "grpc-stream"],
    "large": ["http1-100k-1000rps"],
    "newconn": ["http1-newconn-1000rps"],
    "idle": [s.name for s in SCENARIOS if s.kind == "idle"],
    "max": [s.name for s in SCENARIOS if s.kind == "max"],
}
SETS["full"] = [s.name for s in SCENARIOS if s.name != "smoke"]


def select_scenarios(spec: str) -> list[Scenario]:
    """Scenarios named by `spec`: comma-separated set names and scenario names, in order, once each."""
    chosen: list[Scenario] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        names = SETS.get(word) or ([word] if word in BY_NAME else None)
        if names is None:
            valid = ", ".join([*SETS, *BY_NAME])
            raise ValueError(f"unknown scenario or set {word!r}; valid: {valid}")
        chosen.extend(BY_NAME[n] for n in names if BY_NAME[n] not in chosen)
    if not chosen:
        raise ValueError("no scenarios selected")
    return chosen
