"""The control plane at scale: how long a change in the source takes to reach every watcher.

One `pymesh control run` process serves a file source generated with 1,000 services and
10,000 endpoints (100 files of 10 services). 1,000 simulated proxies, spread over several
client processes (grpc.aio on uvloop, one channel each, as real proxies have), each open
WatchConfig and one WatchEndpoints. Then an endpoint of a watched service is changed in its
file N times (one added, one removed, so the total stays 10,000), and for each change the
time from the file's rename to the last watcher having it is measured; the config is
changed a few times too (every proxy gets a new full config). Also reported: the control
plane's RSS and CPU, read from /proc.

    python3 perf/bench_control.py                          # 1,000 proxies, 30 endpoint changes
    python3 perf/bench_control.py --proxies 200 --changes 10 --json out.json
    python3 perf/bench_control.py --watched-services 10    # proxies spread over 10 services

The file source polls every 200 ms (``--poll-interval``), so up to that much of each figure is
the wait for the next poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICES_PER_FILE = 10
MARKER_HOST = "127.0.0.2"
MARKER_BASE_PORT = 10_000


def service_name(i: int) -> str:
    return f"svc-{i:04d}"


# -- /proc --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mib(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the source ---------------------------------------------------------------------------


class Source:
    """The generated directory, and the changes made to it."""

    def __init__(self, directory: Path, services: int, endpoints_per_service: int) -> None:
        self.directory = directory
        self.files: list[list[dict[str, Any]]] = []
        for first in range(0, services, SERVICES_PER_FILE):
            chunk = []
            for i in range(first, min(first + SERVICES_PER_FILE, services)):
                chunk.append({
                    "name": service_name(i),
                    "authorities": [f"{service_name(i)}.default.svc.cluster.local"],
                    "endpoints": [{"address": f"127.1.{i // 250}.{i % 250 + 1}:{8000 + j}"}
                                  for j in range(endpoints_per_service)],
                })
            self.files.append(chunk)
        for index in range(len(self.files)):
            self.write(index)

    def path(self, index: int) -> Path:
        return self.directory / f"services-{index:03d}.yaml"

    def write(self, index: int) -> float:
        """Writes file ``index`` atomically; returns the monotonic time of the rename."""
        path = self.path(index)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.dump({"services": self.files[index]}, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                 sort_keys=False))
        tmp.replace(path)
        return time.monotonic()

    def change_endpoint(self, service: int, n: int) -> float:
        """Adds marker endpoint ``n`` to a service and removes marker ``n - 1``."""
        entry = self.files[service // SERVICES_PER_FILE][service % SERVICES_PER_FILE]
        entry["endpoints"] = [e for e in entry["endpoints"] if not e["address"].startswith(MARKER_HOST)]
        entry["endpoints"].append({"address": f"{MARKER_HOST}:{MARKER_BASE_PORT + n}"})
        return self.write(service // SERVICES_PER_FILE)

    def change_config(self, n: int) -> float:
        """Gives the first service a marker authority (a config change for every proxy)."""
        entry = self.files[0][0]
        entry["authorities"] = [entry["authorities"][0], f"bench-{n}.local"]
        return self.write(0)


# -- the simulated proxies (client processes) ---------------------------------------------


async def run_proxies(address: str, first: int, count: int, watched: int) -> None:
    """``count`` simulated proxies; prints `ready` once all have their first state, then one
    `R kind n time` line per marker seen."""
    import grpc
    import uvloop  # noqa: F401 (the loop is uvloop: see main)

    from pymesh._proto.pymesh.config.v1 import proxy_pb2  # noqa: F401 (registers the types)
    from pymesh._proto.pymesh.mesh.v1 import discovery_pb2 as pb
    from pymesh._proto.pymesh.mesh.v1 import discovery_pb2_grpc as pbg

    out = sys.stdout
    initial = asyncio.Semaphore(0)

    def report(kind: str, n: int) -> None:
        out.write(f"R {kind} {n} {time.monotonic():.6f}\n")

    async def proxy(i: int) -> None:
        # A connection of its own (gRPC would share one between channels to the same address).
        channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = pbg.DiscoveryStub(channel)
        identity = pb.ProxyIdentity(proxy_id=f"bench-{i}", workload="bench", namespace="default")
        service = service_name(i % watched)

        async def config() -> None:
            first = True
            async for update in stub.WatchConfig(pb.WatchConfigRequest(identity=identity)):
                if first:
                    first = False
                    initial.release()
                for authority in update.config.services[0].authorities:
                    if authority.startswith("bench-"):
                        report("config", int(authority[len("bench-"):-len(".local")]))

        async def endpoints() -> None:
            first = True
            async for update in stub.WatchEndpoints(pb.WatchEndpointsRequest(service=service, identity=identity)):
                if first:
                    first = False
                    initial.release()
                for endpoint in update.added:
                    if endpoint.address.startswith(MARKER_HOST):
                        report("endpoint", int(endpoint.address.rsplit(":", 1)[1]) - MARKER_BASE_PORT)

        await asyncio.gather(config(), endpoints())

    tasks = [asyncio.create_task(proxy(first + i)) for i in range(count)]
    for _ in range(2 * count):
        await initial.acquire()
    out.write("ready\n")
    out.flush()

    async def flush() -> None:
        while True:
            await asyncio.sleep(0.02)
            out.flush()

    flusher = asyncio.create_task(flush())
    await asyncio.gather(*tasks, flusher)


def client_main(args: argparse.Namespace) -> None:
    import uvloop

    raise_fd_limit()
    uvloop.run(run_proxies(args.client, args.first, args.count, args.watched_services))


class Client:
    """One client process and the marker receipts it reports."""

    def __init__(self, address: str, first: int, count: int, watched: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--client", address, "--first", str(first), "--count", str(count),
             "--watched-services", str(watched)],
            stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = threading.Event()
        self.receipts: dict[tuple[str, int], list[float]] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("R "):
                _, kind, n, at = line.split()
                with self.lock:
                    self.receipts.setdefault((kind, int(n)), []).append(float(at))
            elif line.strip() == "ready":
                self.ready.set()

    def times(self, kind: str, n: int) -> list[float]:
        with self.lock:
            return list(self.receipts.get((kind, n), []))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the driver ---------------------------------------------------------------------------


@dataclass
class Scenario:
    kind: str
    changes: int = 0
    watchers_per_change: int = 0
    #: per change: from the rename to the last watcher having it, seconds
    to_last: list[float] = field(default_factory=list)
    #: every (change, watcher) delivery, seconds
    deliveries: list[float] = field(default_factory=list)
    missed: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "changes": self.changes, "watchers_per_change": self.watchers_per_change, "missed": self.missed,
            "to_last_watcher_p50_s": quantile(self.to_last, 0.5), "to_last_watcher_p99_s": quantile(self.to_last, 0.99),
            "to_last_watcher_max_s": max(self.to_last, default=float("nan")),
            "per_watcher_p50_s": quantile(self.deliveries, 0.5), "per_watcher_p99_s": quantile(self.deliveries, 0.99),
        }


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(kind: str, count: int, expected: int, change: Any, clients: list[Client], timeout: float) -> Scenario:
    scenario = Scenario(kind, count, expected)
    for n in range(1, count + 1):
        time.sleep(random.uniform(0.1, 0.3))  # do not stay in phase with the poller
        changed_at = change(n)
        deadline = time.monotonic() + timeout
        while True:
            times = [t for c in clients for t in c.times(kind, n)]
            if len(times) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if len(times) < expected:
            scenario.missed += expected - len(times)
        if times:
            scenario.to_last.append(max(times) - changed_at)
            scenario.deliveries.extend(t - changed_at for t in times)
    return scenario


def start_control(directory: Path, poll_interval: float, log_path: Path) -> tuple[subprocess.Popen[str], str, str]:
    settings = directory.parent / "control.yaml"
    settings.write_text(yaml.safe_dump({"pollInterval": poll_interval, "logLevel": "warning", "plaintext": True}))
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from pymesh.cli import main; main()", "control", "run", "--source",
             f"file:{directory}", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--config", str(settings)],
            stdout=subprocess.PIPE, stderr=log, text=True)
    address = admin = ""
    assert process.stdout is not None
    for line in process.stdout:
        kind, _, rest = line.strip().partition(" ")
        if kind == "listening":
            address = rest
        elif kind == "admin":
            admin = rest
            break
    if not admin:
        raise SystemExit(f"the control plane did not start: {log_path.read_text()}")
    return process, address, admin


def wait_ready(admin: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{admin}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the control plane did not become ready")


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="pymesh-bench-control-") as tmp:
        directory = Path(tmp) / "services"
        directory.mkdir()
        started = time.monotonic()
        source = Source(directory, args.services, args.endpoints // args.services)
        print(f"generated {args.services} services, {args.endpoints} endpoints in {len(source.files)} files "
              f"({time.monotonic() - started:.1f} s)", file=sys.stderr)
        process, address, admin = start_control(directory, args.poll_interval, Path(tmp) / "control.log")
        clients: list[Client] = []
        try:
            started = time.monotonic()
            wait_ready(admin)
            load_s = time.monotonic() - started
            per = -(-args.proxies // args.client_processes)
            for first in range(0, args.proxies, per):
                clients.append(Client(address, first, min(per, args.proxies - first), args.watched_services))
            for client in clients:
                if not client.ready.wait(timeout=300):
                    raise SystemExit("the simulated proxies did not all get their first state")
            connect_s = time.monotonic() - started - load_s
            print(f"control plane loaded in {load_s:.1f} s; {args.proxies} proxies connected in {connect_s:.1f} s",
                  file=sys.stderr)
            time.sleep(1)
            idle_memory = memory_mib(process.pid)
            cpu_before, wall_before = cpu_seconds(process.pid), time.monotonic()
            watchers = len(range(0, args.proxies, args.watched_services))  # proxies watching svc-0000
            endpoint = measure("endpoint", args.changes, watchers,
                               lambda n: source.change_endpoint(0, n), clients, args.timeout)
            cpu_endpoint = cpu_seconds(process.pid) - cpu_before
            wall_endpoint = time.monotonic() - wall_before
            cpu_before, wall_before = cpu_seconds(process.pid), time.monotonic()
            config = measure("config", args.config_changes, args.proxies, source.change_config, clients, args.timeout)
            cpu_config = cpu_seconds(process.pid) - cpu_before
            wall_config = time.monotonic() - wall_before
            final_memory = memory_mib(process.pid)
        finally:
            for client in clients:
                client.stop()
            process.terminate()
            process.wait(timeout=10)
    return {
        "proxies": args.proxies, "services": args.services, "endpoints": args.endpoints,
        "client_processes": len(clients), "watched_services": args.watched_services,
        "poll_interval_s": args.poll_interval, "load_s": round(load_s, 2), "connect_s": round(connect_s, 2),
        "endpoint_change": endpoint.summary(), "config_change": config.summary(),
        "control_plane": {
            "rss_mib_idle_with_all_connected": round(idle_memory["VmRSS"], 1),
            "rss_mib_end": round(final_memory["VmRSS"], 1), "rss_mib_peak": round(final_memory["VmHWM"], 1),
            "cpu_s_endpoint_phase": round(cpu_endpoint, 2), "wall_s_endpoint_phase": round(wall_endpoint, 2),
            "cpu_s_config_phase": round(cpu_config, 2), "wall_s_config_phase": round(wall_config, 2),
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def print_report(result: dict[str, Any]) -> None:
    def ms(value: float) -> str:
        return f"{value * 1000:.0f} ms"

    print(f"control plane: {result['services']} services, {result['endpoints']} endpoints; "
          f"{result['proxies']} proxies over {result['client_processes']} processes; "
          f"file polled every {ms(result['poll_interval_s'])}")
    for key, title in (("endpoint_change", "endpoint change"), ("config_change", "config change")):
        s = result[key]
        print(f"  {title} ×{s['changes']} → {s['watchers_per_change']} watchers each: to the last watcher "
              f"p50 {ms(s['to_last_watcher_p50_s'])}, p99 {ms(s['to_last_watcher_p99_s'])} "
              f"(max {ms(s['to_last_watcher_max_s'])}); per watcher p50 {ms(s['per_watcher_p50_s'])}, "
              f"p99 {ms(s['per_watcher_p99_s'])}; missed {s['missed']}")
    c = result["control_plane"]
    print(f"  control plane RSS {c['rss_mib_idle_with_all_connected']} MiB with all connected, "
          f"{c['rss_mib_end']} MiB at the end (peak {c['rss_mib_peak']} MiB); CPU "
          f"{c['cpu_s_endpoint_phase']} s over {c['wall_s_endpoint_phase']} s of endpoint changes, "
          f"{c['cpu_s_config_phase']} s over {c['wall_s_config_phase']} s of config changes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--watched-services", type=int, default=1,
                        help="proxy i watches the endpoints of service i mod this; 1: every proxy watches the "
                             "changed service (the largest fan-out)")
    parser.add_argument("--changes", type=int, default=30, help="endpoint changes to measure")
    parser.add_argument("--config-changes", type=int, default=5, help="config changes to measure")
    parser.add_argument("--poll-interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one change to arrive")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    result = run(args)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
