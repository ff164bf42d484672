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
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import proxy_binary
from .test_init import PROXY_UID, Netns, require_tools, run, snapshot
from .test_mesh import loadgen
from .test_mtls import pymesh

SUBNET = "10.251.0"
CP, CLIENT, SERVER1, SERVER2, OUTSIDE = (f"{SUBNET}.{n}" for n in (10, 2, 3, 4, 5))
SUBNET6 = "fd00:251:"
CLIENT6, SERVER1_6, SERVER2_6, OUTSIDE6 = (f"{SUBNET6}:{n}" for n in (2, 3, 4, 5))
ADDRESSES = {"cp": (CP, f"{SUBNET6}:10"), "client": (CLIENT, CLIENT6), "server1": (SERVER1, SERVER1_6),
             "server2": (SERVER2, SERVER2_6), "outside": (OUTSIDE, OUTSIDE6)}
SERVICE_RANGE, SERVICE_RANGE6 = "10.240.0.0/16", "fd00:240::/64"
HELLO_VIP, GREETER_VIP, REDIS_VIP, HELLO6_VIP = "10.240.0.10", "10.240.0.11", "10.240.0.12", "fd00:240::10"
HTTP_PORT, GRPC_PORT, REDIS_PORT = 8080, 50051, 6379
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

# Unmodified clients: `count` calls of one kind to one address; prints each answer (or error).
CALLS = r"""
import json, sys, urllib.request
kind, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
answers = []
channel = None
for _ in range(count):
    try:
        if kind == "http":
            with urllib.request.urlopen(f"http://{target}/", timeout=10) as response:
                answers.append(json.loads(response.read()))
        elif kind == "grpc":
            import grpc
            channel = channel or grpc.insecure_channel(target)
            answers.append({"pod": channel.unary_unary("/demo.Greeter/Hello")(b"", timeout=10).decode()})
    except Exception as e:
        answers.append({"error": repr(e)})
print(json.dumps(answers))
"""


@dataclass
class Cluster:
    """The namespaces, the control plane and what runs in each pod."""

    net: Netns
    work: Path
    cp_address: str = ""
    state_dir: Path = field(default_factory=Path)
    sidecars: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    apps: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    tables_before: dict[str, str] = field(default_factory=dict)

    def ns(self, pod: str) -> str:
        return f"{self.net.prefix}-{pod}"

    def exec(self, pod: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.net.exec(self.ns(pod), *argv, check=check)

    def calls(self, pod: str, kind: str, target: str, count: int) -> list[dict[str, Any]]:
        out = self.exec(pod, sys.executable, "-c", CALLS, kind, target, str(count)).stdout
        return json.loads(out)

    def redis(self, *command: str) -> str:
        return self.exec("client", "redis-cli", "-h", REDIS_VIP, "-p", str(REDIS_PORT), *command).stdout.strip()

    def admin(self, pod: str, path: str) -> str:
        fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return self.exec(pod, sys.executable, "-c", fetch, f"http://127.0.0.1:4191{path}").stdout

    def metrics(self, pod: str, name: str) -> list[str]:
        return [line for line in self.admin(pod, "/metrics").splitlines() if line.startswith(name)]

    def start_app(self, pod: str, with_grpc: bool) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(pod), sys.executable, "-c", APP, pod,
                                 "grpc" if with_grpc else "http"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.net.procs.append(proc)
        self.apps[pod] = proc
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", f"the application in {pod} did not start"

    def start_sidecar(self, pod: str, service_account: str) -> None:
        """The native sidecar as the proxy user, configured as a pod's would be: its ports, its
        control plane and its identity; everything else it learns from the control plane."""
        token = self.work / f"{pod}.token"
        token.write_text(pymesh("control", "token", "--namespace", "demo", "--service-account",
                                service_account, "--state-dir", str(self.state_dir)).strip())
        opaque = {"opaquePorts": [REDIS_PORT]}
        config = {
            "admin": {"address": "127.0.0.1:4191"},
            "listeners": [
                # netfilter redirects IPv4 to 127.0.0.1 and IPv6 to ::1; inbound, one dual-stack socket
                # takes both (IPv4 arrives IPv4-mapped).
                {"name": "outbound", "address": "127.0.0.1:4140", "transparent": True, **opaque},
                {"name": "outbound6", "address": "[::1]:4140", "transparent": True, **opaque},
                {"name": "inbound", "address": "[::]:4143", "direction": "INBOUND", "transparent": True,
                 "tls": "STRICT", **opaque},
            ],
            "controlPlane": {"addresses": [self.cp_address], "namespace": "demo",
                             "serviceAccount": service_account},
            "identity": {"trustAnchorsFile": str(self.work / "anchors.pem"), "tokenFile": str(token)},
        }
        config_path = self.work / f"{pod}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        for path in (token, config_path):
            path.chmod(0o644)
        log = (self.work / f"{pod}.log").open("w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(pod), "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
             "--clear-groups", "--", str(self.work / "pymesh-proxy"), "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        self.sidecars[pod] = proc
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("admin "):
                break
        else:
            raise AssertionError(f"the sidecar in {pod} did not start: {self.log(pod)}")

    def log(self, pod: str) -> str:
        return (self.work / f"{pod}.log").read_text()[-4000:]

    def wait_ready(self, pod: str, timeout: float = 30) -> None:
        """Until the sidecar has its certificate and the control plane's services."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                config = json.loads(self.admin(pod, "/config"))
                names = {s["name"] for s in config.get("services", [])}
                if {"hello", "hello6", "greeter", "redis"} <= names and self.exec(
                        pod, sys.executable, "-c", "import urllib.request; urllib.request.urlopen("
                        "'http://127.0.0.1:4191/ready', timeout=5)", check=False).returncode == 0:
                    return
            except (AssertionError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"the sidecar in {pod} did not become ready: {self.log(pod)}")

    def init(self, pod: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return self.exec(pod, str(self.work / "pymesh-proxy"), "init", *flags)

    def close(self) -> None:
        for proc in [*self.apps.values(), *self.sidecars.values()]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stdout:
                proc.stdout.close()
        self.net.close()
        shutil.rmtree(self.work, ignore_errors=True)


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
    net = Netns(prefix=prefix)
    # The proxy user must read its binary, config and token: a directory it can enter.
    work = Path(tempfile.mkdtemp(prefix="pymesh-pods-"))
    work.chmod(0o755)
    shutil.copy2(proxy_binary(), work / "pymesh-proxy")
    (work / "pymesh-proxy").chmod(0o755)
    cluster = Cluster(net, work, state_dir=tmp_path / "ca")
    try:
        hub = net.add("hub")
        run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", hub, "link", "set", "br0", "up")
        for pod, (address, address6) in ADDRESSES.items():
            ns = net.add(pod)
            run("ip", "-n", hub, "link", "add", f"v{pod}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", hub, "link", "set", f"v{pod}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", ns, "addr", "add", f"{address6}/64", "dev", "eth0", "nodad")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "route", "add", SERVICE_RANGE, "dev", "eth0")
            run("ip", "-n", ns, "-6", "route", "add", SERVICE_RANGE6, "dev", "eth0")
        start_control_plane(cluster, tmp_path)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with cluster_up(tmp_path, f"pmt{os.getpid() % 10000}-{abs(hash(request.node.nodeid)) % 1000}") as made:
        yield made


def start_control_plane(cluster: Cluster, tmp_path: Path) -> None:
    source = tmp_path / "services"
    source.mkdir()
    (source / "services.yaml").write_text(yaml.safe_dump(services()))
    log = (tmp_path / "control.log").open("w")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", cluster.ns("cp"), sys.executable, "-c", "from pymesh.cli import main; main()",
         "control", "run", "--source", f"file:{source}", "--listen", f"{CP}:0", "--admin", "127.0.0.1:0",
         "--state-dir", str(cluster.state_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    cluster.net.procs.append(proc)
    assert proc.stdout is not None
    for line in proc.stdout:
        kind, _, rest = line.strip().partition(" ")
        if kind == "listening":
            cluster.cp_address = rest
            break
    assert cluster.cp_address, f"the control plane did not start: {(tmp_path / 'control.log').read_text()}"
    anchors = cluster.work / "anchors.pem"
    anchors.write_text(pymesh("control", "ca-bundle", "--state-dir", str(cluster.state_dir)))
    anchors.chmod(0o644)


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
    answers = cluster.calls("client", "http", f"{HELLO_VIP}:80", 40)
    assert all("error" not in a for a in answers), answers
    assert {a["pod"] for a in answers} == {"server1", "server2"}, answers
    assert {a["client_id"] for a in answers} == {CLIENT_ID}, answers

    # The same over IPv6, both sides (IP6T_SO_ORIGINAL_DST).
    answers = cluster.calls("client", "http", f"[{HELLO6_VIP}]:80", 20)
    assert all("error" not in a for a in answers), answers
    assert {a["pod"] for a in answers} == {"server1", "server2"}, answers
    assert {a["client_id"] for a in answers} == {CLIENT_ID}, answers

    # gRPC over one HTTP/2 connection from the client: each call balanced by the sidecar.
    answers = cluster.calls("client", "grpc", f"{GREETER_VIP}:{GRPC_PORT}", 40)
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
        for proc in (cluster.sidecars["server2"], cluster.apps["server2"]):
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
