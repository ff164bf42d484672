"""The transparent sidecar: pods on one machine whose applications do not know the mesh is there.

Topology, all of it made here and deleted after the test: a hub namespace holding a bridge, and
five namespaces on it, each with a veth and an address in 10.251.0.0/24 and fd00:251::/64:

- `cp` (.10): the control plane (file source), the mesh's CA, reached over TLS;
- `client` (.2): unmodified clients (urllib, a grpcio client, redis-cli, the Rust load generator),
  the init rules and the native sidecar;
- `server1` (.3), `server2` (.4): an unmodified HTTP and gRPC server, Redis (server1), the init
  rules and the native sidecar;
- `outside` (.5): a plain HTTP server that is not in the mesh.

The services have virtual IPs in 10.240.0.0/16 (one in fd00:240::/64), which every pod routes to
its eth0 as a cluster routes its service range: nothing answers there unless a sidecar takes the connection. The
clients are configured only with those addresses. Sidecars run as the proxy user (2102), which
the init rules skip. Nothing reaches any other host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from perf.harness import pods

from .conftest import proxy_binary
from .test_init import require_tools, snapshot
from .test_mesh import loadgen

ADDRESSES = {pod: pods.address(n) for pod, n in (("cp", 10), ("client", 2), ("server1", 3), ("server2", 4),
                                                 ("outside", 5))}
(CP, _), (CLIENT, CLIENT6), (SERVER1, SERVER1_6), (SERVER2, SERVER2_6), (OUTSIDE, OUTSIDE6) = ADDRESSES.values()
SERVICE_RANGE, SERVICE_RANGE6 = "10.240.0.0/16", "fd00:240::/64"
HELLO_VIP, GREETER_VIP, REDIS_VIP, HELLO6_VIP = "10.240.0.10", "10.240.0.11", "10.240.0.12", "fd00:240::10"
HTTP_PORT, GRPC_PORT, REDIS_PORT = 8080, 50051, 6379
SERVICES = ("hello", "hello6", "greeter", "redis")  # what a sidecar has before it is ready
TRUST_DOMAIN = "cluster.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/hello"

# An unmodified application: HTTP on 8080 (and gRPC on 50051) saying which pod answered and
# what the proxy told it of its client; runs until stdin closes or ten minutes pass.
APP = r"""
import json, select, socket, sys, threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, with_grpc = sys.argv[1], sys.argv[2] == "grpc"

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"pod": name, "client_id": self.headers.get("pymesh-client-id")}).encode()
        # One write, so a pod killed mid-answer has sent all of it or nothing.
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
    def log_message(self, *args):
        pass

class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

http = DualStack(("::", 8080), Handler)
threading.Thread(target=http.serve_forever, daemon=True).start()
if with_grpc:
    import grpc
    hello = grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Greeter", {"Hello": hello}),))
    server.add_insecure_port("0.0.0.0:50051")
    server.start()
print("ready", flush=True)
select.select([sys.stdin], [], [], 600)
"""

# Unmodified clients: `count` calls of one kind to one address, four at a time; prints each
# answer (or error).
CALLS = r"""
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
kind, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
channel = None
if kind == "grpc":
    import grpc
    channel = grpc.insecure_channel(target)

def call(_):
    try:
        if kind == "http":
            with urllib.request.urlopen(f"http://{target}/", timeout=10) as response:
                return json.loads(response.read())
        return {"pod": channel.unary_unary("/demo.Greeter/Hello")(b"", timeout=10).decode()}
    except Exception as e:
        return {"error": repr(e)}

with ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(call, range(count)))
print(json.dumps(answers))
"""


@dataclass
class Cluster(pods.Cluster):
    """The pods (perf/harness/pods.py), with this test's applications and clients."""

    tables_before: dict[str, str] = field(default_factory=dict)

    def calls(self, pod: str, kind: str, target: str, count: int) -> list[dict[str, Any]]:
        out = self.exec(pod, sys.executable, "-c", CALLS, kind, target, str(count)).stdout
        return json.loads(out)

    def balanced_calls(self, pod: str, kind: str, target: str, count: int, batches: int = 5
                       ) -> list[dict[str, Any]]:
        """Batches of `count` calls until both server pods have answered (at most `batches`).
        The sidecar balances on load (P2C over PeakEWMA), not in turn: while one pod answers
        faster than the other is thought to, it can take a whole batch."""
        answers: list[dict[str, Any]] = []
        for _ in range(batches):
            answers += self.calls(pod, kind, target, count)
            if {a.get("pod") for a in answers} >= {"server1", "server2"}:
                break
        return answers

    def redis(self, *command: str) -> str:
        return self.exec("client", "redis-cli", "-h", REDIS_VIP, "-p", str(REDIS_PORT), *command).stdout.strip()

    def start_app(self, pod: str, with_grpc: bool) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(pod), sys.executable, "-c", APP, pod,
                                 "grpc" if with_grpc else "http"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.net.procs.append(proc)
        self.apps[pod] = proc
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", f"the application in {pod} did not start"

    def start_sidecar(self, pod: str, service_account: str, *, namespace: str = "demo",
                      opaque_ports: Sequence[int] = (REDIS_PORT,), cpu: int | None = None) -> None:
        super().start_sidecar(pod, service_account, namespace=namespace, opaque_ports=opaque_ports, cpu=cpu)

    def wait_ready(self, pod: str, services: Sequence[str] = SERVICES, timeout: float = 30) -> None:
        super().wait_ready(pod, services, timeout)


def services() -> dict[str, Any]:
    def endpoints(port: int, *hosts: str) -> list[dict[str, Any]]:
        return [{"address": f"{host}:{port}", "identity": SERVER_ID} for host in hosts]

    return {"services": [
        {"name": "hello", "virtualIp": HELLO_VIP, "endpoints": endpoints(HTTP_PORT, SERVER1, SERVER2)},
        {"name": "hello6", "virtualIp": HELLO6_VIP,
         "endpoints": endpoints(HTTP_PORT, f"[{SERVER1_6}]", f"[{SERVER2_6}]")},
        {"name": "greeter", "virtualIp": GREETER_VIP, "endpoints": endpoints(GRPC_PORT, SERVER1, SERVER2)},
        {"name": "redis", "virtualIp": REDIS_VIP, "endpoints": endpoints(REDIS_PORT, SERVER1)},
    ]}


@contextlib.contextmanager
def cluster_up(tmp_path: Path, prefix: str) -> Iterator[Cluster]:
    """The namespaces on their bridge and the control plane; pods are started by the caller.
    Everything is stopped and deleted on exit. (perf/bench_transparent.py uses it too.)"""
    require_tools()
    if not shutil.which("redis-server") or not shutil.which("setpriv"):
        pytest.fail("redis-server and setpriv are missing (Debian's redis-server, util-linux): "
                    "run scripts/install --test")
    # The proxy user must read its binary, config and token: a directory it can enter.
    work = Path(tempfile.mkdtemp(prefix="pymesh-pods-"))
    try:
        shutil.copy2(proxy_binary(), work / "pymesh-proxy")
        (work / "pymesh-proxy").chmod(0o755)
        with pods.cluster_up(work, prefix, work / "pymesh-proxy", ADDRESSES, services=services(),
                             routes=(SERVICE_RANGE, SERVICE_RANGE6), cluster_type=Cluster) as cluster:
            yield cluster
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with cluster_up(tmp_path, f"pmt{os.getpid() % 10000}-{abs(hash(request.node.nodeid)) % 1000}") as made:
        yield made


def pods_up(cluster: Cluster) -> None:
    """Applications first (as a pod's containers start), the init rules, then the sidecars."""
    cluster.start_app("server1", with_grpc=True)
    cluster.start_app("server2", with_grpc=True)
    cluster.start_app("outside", with_grpc=False)
    redis = subprocess.Popen(["ip", "netns", "exec", cluster.ns("server1"), "redis-server", "--port",
                              str(REDIS_PORT), "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
                              "--appendonly", "no"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    cluster.apps["redis"] = redis
    for pod, account in [("server1", "hello"), ("server2", "hello"), ("client", "client")]:
        cluster.tables_before[pod] = snapshot(cluster.net, cluster.ns(pod))
        assert cluster.init(pod).stdout.split() == ["install", "nftables:", "installed"]
        cluster.start_sidecar(pod, account)
    for pod in ("server1", "server2", "client"):
        cluster.wait_ready(pod)


def counter(lines: list[str], *labels: str) -> float:
    """The sum of the samples whose labels include every one given."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(label in line for label in labels))


def test_unmodified_applications_are_meshed(cluster: Cluster) -> None:
    pods_up(cluster)

    # HTTP to the service's virtual IP: balanced over both server pods, over mutual TLS (the
    # application behind the server's sidecar is told the client's verified identity).
    answers = cluster.balanced_calls("client", "http", f"{HELLO_VIP}:80", 40)
    assert all("error" not in a for a in answers), answers
    assert {a["pod"] for a in answers} == {"server1", "server2"}, answers
    assert {a["client_id"] for a in answers} == {CLIENT_ID}, answers

    # The same over IPv6, both sides (IP6T_SO_ORIGINAL_DST).
    answers = cluster.balanced_calls("client", "http", f"[{HELLO6_VIP}]:80", 20)
    assert all("error" not in a for a in answers), answers
    assert {a["pod"] for a in answers} == {"server1", "server2"}, answers
    assert {a["client_id"] for a in answers} == {CLIENT_ID}, answers

    # gRPC over one HTTP/2 connection from the client: each call balanced by the sidecar.
    answers = cluster.balanced_calls("client", "grpc", f"{GREETER_VIP}:{GRPC_PORT}", 40)
    assert all("error" not in a for a in answers), answers
    assert {a["pod"] for a in answers} == {"server1", "server2"}, answers

    # Redis on an opaque port, through both sidecars.
    assert cluster.redis("SET", "meshed", "yes") == "OK"
    assert cluster.redis("GET", "meshed") == "yes"

    # Outside the mesh: forwarded where the application meant, and counted.
    answers = cluster.calls("client", "http", f"{OUTSIDE}:{HTTP_PORT}", 3)
    assert [a.get("pod") for a in answers] == ["outside"] * 3, answers
    answers = cluster.calls("client", "http", f"[{OUTSIDE6}]:{HTTP_PORT}", 2)
    assert [a.get("pod") for a in answers] == ["outside"] * 2, answers
    requests = cluster.metrics("client", "request_total")
    assert counter(requests, f'dst_service="{OUTSIDE}:{HTTP_PORT}"') == 3, requests
    assert counter(requests, f'dst_service="[{OUTSIDE6}]:{HTTP_PORT}"') == 2, requests

    # Both sides name both identities, with tls="true".
    client_side = cluster.metrics("client", "response_total")
    for service in ("hello", "hello6", "greeter"):
        assert counter(client_side, f'dst_service="{service}"', 'tls="true"', f'server_id="{SERVER_ID}"') > 0, \
            client_side
    for pod in ("server1", "server2"):
        server_side = cluster.metrics(pod, "response_total")
        assert counter(server_side, 'direction="inbound"', 'tls="true"', f'client_id="{CLIENT_ID}"') > 0, \
            server_side
    redis_conns = cluster.metrics("server1", "tcp_close_total")
    assert counter(redis_conns, 'direction="inbound"', 'tls="true"', f'client_id="{CLIENT_ID}"') >= 2, \
        redis_conns

    # The sidecars' own connections (to the control plane, to their peers and, on the server
    # side, to their own application) never came back into their outbound listener: the server
    # pods' applications make no calls, so their outbound listeners saw nothing at all.
    for pod in ("server1", "server2"):
        opened = cluster.metrics(pod, "tcp_open_total")
        assert counter(opened, 'direction="outbound"') == 0, opened
    # (The client's shows that what the applications dial is counted there.)
    assert counter(cluster.metrics("client", "tcp_open_total"), 'direction="outbound"') >= 40 + 20 + 5 + 2 + 1
    assert counter(cluster.metrics("client", "request_total"), f'dst_service="{CP}') == 0

    # A killed server pod costs no failed request under a constant load (retries, then
    # failure accrual), from the Rust load generator dialing the virtual IP.
    def served(pod: str) -> float:
        return counter(cluster.metrics(pod, "response_total"), 'direction="inbound"')

    before = served("server2")
    load = subprocess.Popen(["ip", "netns", "exec", cluster.ns("client"), loadgen(), "--url",
                             f"http://{HELLO_VIP}/", "--rate", "100", "--duration", "8", "--warmup", "0",
                             "--connections", "4", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 8
        while served("server2") < before + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served("server2") >= before + 20, "no load reached server2"
        for proc in (cluster.sidecars["server2"].process, cluster.apps["server2"]):
            proc.kill()
        after_kill = served("server1")
        out, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    report = json.loads(out)
    seen = {k: report.get(k) for k in ("requests", "errors", "status_counts", "error_counts")}
    assert report["errors"] == 0 and report["status_counts"] == {"200": report["requests"]}, \
        (seen, cluster.log("client"))
    assert served("server1") > after_kill, "server1 took no traffic after server2 died"

    # Uninstalled, each pod's tables are as they were before the init step.
    for pod in ("server1", "client"):
        assert cluster.init(pod, "--uninstall").stdout.split() == ["uninstall", "nftables:", "removed"]
        assert snapshot(cluster.net, cluster.ns(pod)) == cluster.tables_before[pod]
