"""What one pymesh hop costs: direct client→server against client→proxy→server.

Runs, in one session on loopback and interleaved round by round (so drift on a shared
machine hits every system alike), the constant-rate load generator (coordinated
omission corrected) against:

  direct     the test backend itself (the floor)
  native     the backend behind the `pymesh-proxy` sidecar
  embedded   the backend behind `pymesh.Proxy` running inside this Python process
  pair       client sidecar → server sidecar (two hops, plaintext)
  mtls-pair  the same hop pair over mutual TLS 1.3, certified by a real control plane
             (connections are pooled, so handshakes are off the per-request path)

and reports median p50/p99/p99.9 added latency over direct, the proxy's CPU seconds per
10k requests, and the native sidecar's RSS after at least 100k requests.

    python3 perf/bench_engine.py                     # 1,000 rps, 1 KiB, 5 rounds of 10 s
    python3 perf/bench_engine.py --rounds 3 --duration 5 --json out.json
    python3 perf/bench_engine.py --baseline-proxy /path/to/older/pymesh-proxy   # A/B two builds
    python3 perf/bench_engine.py --protocol grpc     # the same systems under gRPC unary calls (or http2)
    PYMESH_BENCH_PROXY=target/pgo/release/pymesh-proxy python3 perf/bench_engine.py   # the PGO build

With --baseline-proxy the older build runs as a native proxy (`baseline`) and, with the pairs,
as a mutual-TLS pair (`baseline-mtls-pair`). For every pair the report gives the connections the
server sidecar accepted from the client sidecar, and both sidecars' RSS at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The harness's mesh CA (perf/harness/mesh.py): this script runs with perf/ on sys.path.
from harness.mesh import MeshCA, mesh_ca, spiffe_id
from harness.tools import ToolMissing, rust_tool

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tool(name: str) -> str:
    """A binary the harness would measure (`harness.tools.rust_tool`): this checkout's release
    build, built on first use; the sidecar from `PYMESH_BENCH_PROXY` when that is set."""
    try:
        return str(rust_tool(name))
    except ToolMissing as e:
        sys.exit(str(e))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0])
    return values


@contextmanager
def backend_process(response_size: int) -> Iterator[tuple[str, int]]:
    """The test backend: its address and pid."""
    process = subprocess.Popen([tool("pymesh-backend"), "--listen", "127.0.0.1:0",
                                "--response-size", str(response_size)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        yield line.strip().rsplit(" ", 1)[1], process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def backend(response_size: int) -> Iterator[str]:
    with backend_process(response_size) as (address, _):
        yield address


def proxy_config(upstream: str) -> dict:
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0"}],
        "services": [{"name": "bench", "endpoints": [{"address": upstream}]}],
    }


@contextmanager
def native_proxy(upstream: str, workdir: Path, cpu: int | None, binary: str | None = None,
                 threads: int | None = None) -> Iterator[tuple[str, int]]:
    process, addresses = start_sidecar(proxy_config(upstream), workdir, cpu, binary, threads)
    try:
        yield addresses["main"], process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def start_sidecar(config: dict, workdir: Path, cpu: int | None, binary: str | None = None,
                  threads: int | None = None) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """A `pymesh-proxy` on ``config``; returns it and its listeners' addresses (and `admin`)."""
    path = workdir / f"proxy-{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(config))
    command = [binary or tool("pymesh-proxy"), "--config", str(path), "--log", "warn"]
    if threads is not None:
        command += ["--threads", str(threads)]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    addresses: dict[str, str] = {}
    assert process.stdout is not None
    for line in process.stdout:
        kind, *rest = line.split()
        if kind == "listening":
            addresses[rest[0]] = rest[1]
        if kind == "admin":
            addresses["admin"] = rest[0]
            break
    return process, addresses


@dataclass
class Pair:
    """A running sidecar pair: where load goes, whose CPU is read, and what a pair report reads."""

    address: str
    client_pid: int
    server_pid: int
    server_admin: str

    def report(self) -> dict:
        """Connections the server sidecar accepted from the client sidecar, and both RSS."""
        text = urllib.request.urlopen(f"http://{self.server_admin}/metrics", timeout=5).read().decode()
        accepted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("tcp_open_total{") and 'direction="inbound"' in line)
        return {"connections_between_proxies": int(accepted),
                "rss_kib": {"client": memory_kib(self.client_pid)["VmRSS"],
                            "server": memory_kib(self.server_pid)["VmRSS"]}}


@contextmanager
def proxy_pair(upstream: str, workdir: Path, cpu: int | None, ca: MeshCA | None, binary: str | None = None
               ) -> Iterator[Pair]:
    """A client sidecar → server sidecar hop (both ``binary``), over mutual TLS when ``ca`` is
    given. CPU is read for the pair's client side."""
    identities = ca.identities("client", "server") if ca else {}
    server_config: dict = {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "direction": "INBOUND",
                       "defaultService": "app", "tls": "STRICT" if ca else "DISABLED"}],
        "services": [{"name": "app", "endpoints": [{"address": upstream}]}],
    }
    if ca:
        server_config["identity"] = identities["server"]
    server, server_addresses = start_sidecar(server_config, workdir, cpu, binary)
    endpoint = {"address": server_addresses["inbound"]}
    client_config: dict = proxy_config(upstream)
    client_config["services"][0]["endpoints"] = [endpoint]
    if ca:
        endpoint["identity"] = spiffe_id("server")
        client_config["identity"] = identities["client"]
    client, client_addresses = start_sidecar(client_config, workdir, cpu, binary)
    try:
        for admin in (server_addresses["admin"], client_addresses["admin"]):
            for _ in range(100):  # bounded: ready once certified
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(f"http://{admin}/ready", timeout=2).status == 200:
                        break
                time.sleep(0.1)
        yield Pair(client_addresses["main"], client.pid, server.pid, server_addresses["admin"])
    finally:
        for process in (client, server):
            process.terminate()
            process.wait(timeout=30)


@contextmanager
def embedded_proxy(upstream: str) -> Iterator[tuple[str, int]]:
    import pymesh

    with pymesh.Proxy(proxy_config(upstream)) as proxy:
        yield proxy.address("main"), os.getpid()


@dataclass
class Run:
    system: str
    round: int
    latency_us: dict[str, float]
    requested_rps: float
    achieved_rps: float
    requests: int
    errors: int
    proxy_cpu_s_per_10k: float | None = None


# What each --protocol sends: HTTP/1.1 and HTTP/2 GET the response; gRPC calls the backend's
# unary echo with a message of --response-size bytes.
PROTOCOL_LABELS = {"http1": "HTTP/1.1 keep-alive", "http2": "HTTP/2 (h2c)", "grpc": "gRPC unary (h2c)"}


def load(address: str, rate: float, duration: float, warmup: float, args: argparse.Namespace,
         host: str | None) -> dict:
    path = "/pymesh.bench.Echo/Unary" if args.protocol == "grpc" else "/"
    command = [tool("pymesh-loadgen"), "--url", f"http://{address}{path}", "--rate", str(rate),
               "--duration", str(duration), "--warmup", str(warmup), "--connections", str(args.connections),
               "--protocol", args.protocol, "--json"]
    if args.protocol == "grpc":
        command += ["--body-size", str(args.response_size)]
    if host:
        command += ["--header", f"host: {host}"]
    if args.load_cpu is not None:
        command = ["taskset", "-c", str(args.load_cpu), *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration + warmup + 60, check=True)
    return json.loads(result.stdout)


def measure(system: str, round_: int, address: str, pid: int | None, args: argparse.Namespace) -> Run:
    before = cpu_seconds(pid) if pid else 0.0
    report = load(address, args.rate, args.duration, args.warmup, args, None if system == "direct" else "bench")
    used = cpu_seconds(pid) - before if pid else None
    sent = report["requests"] + round(args.rate * args.warmup)
    run = Run(system, round_, {k: float(v) for k, v in report["latency_us"].items()},
              report["requested_rps"], report["achieved_rps"], report["requests"], report["errors"])
    if used is not None and sent:
        run.proxy_cpu_s_per_10k = used / sent * 10_000
    return run


@dataclass
class Summary:
    system: str
    p50_us: float
    p99_us: float
    p999_us: float
    added_p50_us: float
    added_p99_us: float
    added_p999_us: float
    achieved_rps: float
    errors: int
    cpu_s_per_10k: float | None


@dataclass
class Result:
    environment: dict
    load: dict
    runs: list[Run] = field(default_factory=list)
    summary: list[Summary] = field(default_factory=list)
    native_memory_kib: dict = field(default_factory=dict)
    native_requests_before_memory: int = 0
    pairs: dict = field(default_factory=dict)  # per pair: connections between the proxies, RSS


def summarise(runs: list[Run]) -> list[Summary]:
    by_system: dict[str, list[Run]] = {}
    for run in runs:
        by_system.setdefault(run.system, []).append(run)

    def median(system: str, key: str) -> float:
        return statistics.median(r.latency_us[key] for r in by_system[system])

    direct = {k: median("direct", k) for k in ("p50", "p99", "p999")}
    out = []
    for system, group in by_system.items():
        p = {k: median(system, k) for k in ("p50", "p99", "p999")}
        cpu = [r.proxy_cpu_s_per_10k for r in group if r.proxy_cpu_s_per_10k is not None]
        out.append(Summary(
            system, p["p50"], p["p99"], p["p999"],
            p["p50"] - direct["p50"], p["p99"] - direct["p99"], p["p999"] - direct["p999"],
            statistics.median(r.achieved_rps for r in group), sum(r.errors for r in group),
            statistics.median(cpu) if cpu else None,
        ))
    return out


def markdown(result: Result) -> str:
    lines = [
        f"Load: {result.load['rate']:.0f} rps, {PROTOCOL_LABELS[result.load['protocol']]}, "
        f"{result.load['response_size']} B responses, "
        f"{result.load['connections']} connections, {result.load['rounds']} rounds × {result.load['duration']} s "
        "(medians over rounds; added = minus direct in the same round set)",
        "",
        "| system | p50 µs | p99 µs | p99.9 µs | added p50 | added p99 | added p99.9 | rps | errors | "
        "proxy CPU s / 10k req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result.summary:
        cpu = f"{s.cpu_s_per_10k:.3f}" if s.cpu_s_per_10k is not None else "–"
        lines.append(f"| {s.system} | {s.p50_us:.0f} | {s.p99_us:.0f} | {s.p999_us:.0f} | {s.added_p50_us:+.0f} | "
                     f"{s.added_p99_us:+.0f} | {s.added_p999_us:+.0f} | {s.achieved_rps:.0f} | {s.errors} | {cpu} |")
    if result.native_memory_kib:
        lines += ["", f"Native sidecar memory after {result.native_requests_before_memory:,} requests: "
                      f"RSS {result.native_memory_kib['VmRSS'] / 1024:.1f} MiB, "
                      f"peak {result.native_memory_kib['VmHWM'] / 1024:.1f} MiB; of the RSS, private (anonymous) "
                      f"{result.native_memory_kib['RssAnon'] / 1024:.1f} MiB, file pages (the binary's code and "
                      f"its libraries', shared) {result.native_memory_kib['RssFile'] / 1024:.1f} MiB"]
    by_system = {s.system: s for s in result.summary}
    native = by_system.get("native")
    for other in ("embedded", "baseline"):
        if native and other in by_system and native.added_p99_us > 0:
            ratio = by_system[other].added_p99_us / native.added_p99_us
            lines.append(f"{other.capitalize()}/native added p99: {ratio:.2f}")
    for name, report in result.pairs.items():
        rss = report["rss_kib"]
        lines.append(f"{name}: {report['connections_between_proxies']} connection(s) between the proxies; "
                     f"RSS client {rss['client'] / 1024:.1f} MiB, server {rss['server'] / 1024:.1f} MiB")
    pair, mtls = by_system.get("pair"), by_system.get("mtls-pair")
    if pair and mtls:
        lines.append(f"Mutual TLS over plaintext, one hop pair: p99 {mtls.p99_us - pair.p99_us:+.0f} µs "
                     f"(mTLS pair added p99 over direct: {mtls.added_p99_us:+.0f} µs)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--response-size", type=int, default=1024)
    parser.add_argument("--protocol", choices=sorted(PROTOCOL_LABELS), default="http1",
                        help="what the clients speak (gRPC: unary echo calls of --response-size bytes)")
    parser.add_argument("--memory-requests", type=int, default=100_000,
                        help="requests through the native sidecar before reading its RSS")
    parser.add_argument("--pin", action="store_true",
                        help="pin the native proxy to CPU 0 and the load generator to CPU 1")
    parser.add_argument("--json", type=Path, help="write the full result here")
    parser.add_argument("--no-pairs", action="store_true",
                        help="skip the two-sidecar hops (plaintext pair and mutual-TLS pair)")
    parser.add_argument("--baseline-proxy", metavar="PATH",
                        help="another pymesh-proxy build, measured alongside as 'baseline' (A/B)")
    args = parser.parse_args()
    args.load_cpu = 1 if args.pin else None
    proxy_cpu = 0 if args.pin else None

    result = Result(
        environment={"machine": platform.machine(), "cpus": os.cpu_count(), "kernel": platform.release(),
                     "python": platform.python_version(), "pinned": args.pin,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        load={"rate": args.rate, "duration": args.duration, "warmup": args.warmup, "rounds": args.rounds,
              "connections": args.connections, "response_size": args.response_size, "protocol": args.protocol},
    )
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        upstream = stack.enter_context(backend(args.response_size))
        native_address, native_pid = stack.enter_context(native_proxy(upstream, Path(tmp), proxy_cpu))
        embedded_address, embedded_pid = stack.enter_context(embedded_proxy(upstream))
        pairs: dict[str, Pair] = {}
        systems: list[tuple[str, str, int | None]] = [
            ("direct", upstream, None), ("native", native_address, native_pid),
            ("embedded", embedded_address, embedded_pid)]
        if not args.no_pairs:
            ca_dir = Path(tmp) / "ca"
            ca_dir.mkdir()
            ca = stack.enter_context(mesh_ca(ca_dir))
            pairs["pair"] = stack.enter_context(proxy_pair(upstream, Path(tmp), proxy_cpu, None))
            pairs["mtls-pair"] = stack.enter_context(proxy_pair(upstream, Path(tmp), proxy_cpu, ca))
            if args.baseline_proxy:
                pairs["baseline-mtls-pair"] = stack.enter_context(
                    proxy_pair(upstream, Path(tmp), proxy_cpu, ca, args.baseline_proxy))
            systems += [(name, pair.address, pair.client_pid) for name, pair in pairs.items()]
        if args.baseline_proxy:
            systems.append(("baseline", *stack.enter_context(
                native_proxy(upstream, Path(tmp), proxy_cpu, args.baseline_proxy))))
        served_by_native = 0
        for round_ in range(args.rounds):
            for system, address, pid in systems:
                run = measure(system, round_, address, pid, args)
                result.runs.append(run)
                if system == "native":
                    served_by_native += run.requests + round(args.rate * args.warmup)
                print(f"round {round_ + 1}/{args.rounds} {system:8} p50 {run.latency_us['p50']:.0f} µs "
                      f"p99 {run.latency_us['p99']:.0f} µs errors {run.errors}", file=sys.stderr)
        # Top the native proxy up to the memory mark with a closed-loop burst.
        for _ in range(10):  # bounded: each burst is a few seconds
            remaining = args.memory_requests - served_by_native
            if remaining <= 0:
                break
            burst = load(native_address, 0, min(10.0, max(1.0, remaining / 10_000)), 0, args, "bench")
            served_by_native += burst["requests"]
        result.native_memory_kib = memory_kib(native_pid)
        result.native_requests_before_memory = served_by_native
        result.pairs = {name: pair.report() for name, pair in pairs.items()}

    result.summary = summarise(result.runs)
    table = markdown(result)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    if shutil.which("taskset") is None and "--pin" in sys.argv:
        sys.exit("--pin needs taskset (util-linux)")
    sys.exit(main())
