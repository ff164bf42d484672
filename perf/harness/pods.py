"""Pods on one machine: network namespaces on a bridge, the init step's redirect rules in them,
and processes started inside them (sidecars as the proxy user, which those rules skip).

A topology is a hub namespace holding a bridge and one namespace per pod, each with a veth
(`eth0`) on the bridge and addresses in 10.251.0.0/24 and fd00:251::/64. Every topology has
its own hub, so two of them may use the same addresses. `Cluster` adds what a meshed pod needs:
`pymesh-proxy init` (nftables: outbound to 4140, inbound to 4143, the proxy user 2102 and the
admin port 4191 skipped), pymesh's control plane in a pod of its own (the mesh CA and
Discovery, reached over TLS), the native sidecar with transparent listeners, and any other
process run in a pod (as root or as the proxy user), each stopped however things end.

Shared by the harness's pods systems (systems/pods.py), tests/test_init.py,
tests/test_transparent.py and perf/bench_transparent.py. Needs root, iproute2, util-linux's
`setpriv` and, for the redirect rules, nftables.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .mesh import mesh_ca, pymesh_cli
from .procs import Child, pinned

PROXY_UID = 2102  # the proxy user of pymesh and Linkerd; `pymesh-proxy init` skips its connections
OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT = 4140, 4143, 4191
SUBNET, SUBNET6 = "10.251.0", "fd00:251:"
COMMAND_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 30.0


class PodsError(Exception):
    """A command that builds or runs the pods failed; the message has its stderr."""


def address(host: int) -> tuple[str, str]:
    """A pod's IPv4 and IPv6 address: `10.251.0.N`, `fd00:251::N`."""
    return f"{SUBNET}.{host}", f"{SUBNET6}:{host}"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PodsError(f"{' '.join(argv)}: {e}") from e
    if check and result.returncode != 0:
        raise PodsError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result


def as_proxy_user(argv: Sequence[str]) -> list[str]:
    """`argv` as the proxy user, with a parent-death signal (changing user clears an inherited one)."""
    return ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "--pdeathsig", "TERM",
            "--", *argv]


def unavailable(*, rules: bool = True) -> str | None:
    """Why pods cannot be made here (root, iproute2, setpriv, nftables for the rules), or None."""
    if os.geteuid() != 0:
        return "pods are network namespaces: run as root"
    tools = [("ip", "iproute2"), ("setpriv", "util-linux")] + ([("nft", "nftables")] if rules else [])
    missing = [f"{tool} (Debian's {package})" for tool, package in tools if not shutil.which(tool)]
    if missing:
        return f"{', '.join(missing)} missing: run scripts/install --test"
    return None


@dataclass
class Netns:
    """Network namespaces made here, with the processes started in them."""

    prefix: str
    names: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def add(self, short: str) -> str:
        name = self.ns(short)
        run("ip", "netns", "add", name)
        self.names.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def exec(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", ns, *argv, check=check)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for name in reversed(self.names):
            run("ip", "netns", "del", name, check=False)


def bridge(net: Netns, pods: Mapping[str, Sequence[str]], routes: Sequence[str] = ()) -> None:
    """A hub namespace with a bridge, and a namespace per pod whose `eth0` is on it with the
    pod's addresses (IPv4 as /24, IPv6 as /64) and a route to each of `routes` through it."""
    hub = net.add("hub")
    run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", hub, "link", "set", "br0", "up")
    for pod, addresses in pods.items():
        ns = net.add(pod)
        run("ip", "-n", hub, "link", "add", f"v{pod}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", hub, "link", "set", f"v{pod}", "master", "br0", "up")
        for ip in addresses:
            v6 = ":" in ip
            run("ip", "-n", ns, "addr", "add", f"{ip}/{64 if v6 else 24}", "dev", "eth0", *(["nodad"] if v6 else []))
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        for route in routes:
            run("ip", "-n", ns, *(["-6"] if ":" in route else []), "route", "add", route, "dev", "eth0")


@dataclass
class Cluster:
    """Pods on their bridge, the control plane (when it has one) and what runs in each pod."""

    net: Netns
    work: Path  # readable by the proxy user: configs, tokens, logs
    proxy: Path  # the pymesh-proxy binary the pods run (init step and sidecar)
    cp_address: str = ""
    state_dir: Path = field(default_factory=Path)
    anchors: Path | None = None
    sidecars: dict[str, Child] = field(default_factory=dict)
    apps: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def ns(self, pod: str) -> str:
        return self.net.ns(pod)

    def exec(self, pod: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.net.exec(self.ns(pod), *argv, check=check)

    def start(self, pod: str, name: str, argv: Sequence[str], *, proxy_user: bool = False,
              env: Mapping[str, str] | None = None) -> Child:
        """`argv` in `pod` (as the proxy user if asked), its output in `work/NAME.log`; stopped on close."""
        command = ["ip", "netns", "exec", self.ns(pod), *(as_proxy_user(argv) if proxy_user else argv)]
        child = Child(f"{name} ({pod})", command, self.work / f"{name}.log", env=env)
        self.children.append(child)
        return child

    def admin(self, pod: str, path: str, port: int = ADMIN_PORT) -> str:
        fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return self.exec(pod, sys.executable, "-c", fetch, f"http://127.0.0.1:{port}{path}").stdout

    def ready(self, pod: str, port: int = ADMIN_PORT) -> bool:
        """Whether the pod's proxy answers 200 on its admin `/ready`."""
        probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)"
        return self.exec(pod, sys.executable, "-c", probe, f"http://127.0.0.1:{port}/ready",
                         check=False).returncode == 0

    def metrics(self, pod: str, name: str) -> list[str]:
        return [line for line in self.admin(pod, "/metrics").splitlines() if line.startswith(name)]

    def init(self, pod: str, *flags: str) -> subprocess.CompletedProcess[str]:
        """The init step's redirect rules in `pod` (`pymesh-proxy init FLAGS`)."""
        return self.exec(pod, str(self.proxy), "init", *flags)

    def start_sidecar(self, pod: str, service_account: str, *, namespace: str = "demo",
                      opaque_ports: Sequence[int] = (), cpu: int | None = None) -> None:
        """The native sidecar as the proxy user (pinned to `cpu` if given), configured as a pod's
        would be: its ports, its control plane and its identity; everything else it learns from
        the control plane."""
        token = self.work / f"{pod}.token"
        token.write_text(pymesh_cli("control", "token", "--namespace", namespace, "--service-account",
                                    service_account, "--state-dir", str(self.state_dir)).strip())
        opaque = {"opaquePorts": list(opaque_ports)} if opaque_ports else {}
        config = {
            "admin": {"address": f"127.0.0.1:{ADMIN_PORT}"},
            "listeners": [
                # netfilter redirects IPv4 to 127.0.0.1 and IPv6 to ::1; inbound, one dual-stack socket
                # takes both (IPv4 arrives IPv4-mapped).
                {"name": "outbound", "address": f"127.0.0.1:{OUTBOUND_PORT}", "transparent": True, **opaque},
                {"name": "outbound6", "address": f"[::1]:{OUTBOUND_PORT}", "transparent": True, **opaque},
                {"name": "inbound", "address": f"[::]:{INBOUND_PORT}", "direction": "INBOUND", "transparent": True,
                 "tls": "STRICT", **opaque},
            ],
            "controlPlane": {"addresses": [self.cp_address], "namespace": namespace,
                             "serviceAccount": service_account},
            "identity": {"trustAnchorsFile": str(self.anchors), "tokenFile": str(token)},
        }
        config_path = self.work / f"{pod}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        for path in (token, config_path):
            path.chmod(0o644)
        child = self.start(pod, f"sidecar-{pod}", pinned([str(self.proxy), "--config", str(config_path)], cpu),
                           proxy_user=True)
        child.wait_for_line(r"^admin (\S+)$")  # printed after every listener's address
        self.sidecars[pod] = child

    def log(self, pod: str) -> str:
        return self.sidecars[pod].tail(40) if pod in self.sidecars else ""

    def wait_ready(self, pod: str, services: Sequence[str] = (), timeout: float = READY_TIMEOUT_S) -> None:
        """Until the pod's sidecar has its certificate and the control plane's `services`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                config = json.loads(self.admin(pod, "/config"))
                names = {s["name"] for s in config.get("services", [])}
                if set(services) <= names and self.ready(pod):
                    return
            except (PodsError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        raise PodsError(f"the sidecar in {pod} did not become ready within {timeout:.0f} s: {self.log(pod)}")

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        for proc in self.apps.values():
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


C = TypeVar("C", bound=Cluster)


@contextmanager
def cluster_up(work: Path, prefix: str, proxy: Path, pods: Mapping[str, Sequence[str]], *,
               services: Mapping[str, Any] | None = None, routes: Sequence[str] = (),
               cluster_type: type[C] = Cluster) -> Iterator[C]:  # type: ignore[assignment]  # (a default for a TypeVar)
    """The pods on their bridge and, with `services` (the file source's content), pymesh's
    control plane in the pod `cp` (which `pods` must name), listening on its first address.
    Pods' processes are started by the caller; everything is stopped and deleted on exit."""
    net = Netns(prefix=prefix)
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # the proxy user reads its config and token here
    cluster = cluster_type(net, work, proxy)
    with ExitStack() as stack:
        stack.callback(cluster.close)
        bridge(net, pods, routes)
        if services is not None:
            listen = pods["cp"][0]
            ca = stack.enter_context(mesh_ca(work / "cp", services=services, listen=f"{listen}:0",
                                             netns=cluster.ns("cp")))
            cluster.cp_address, cluster.state_dir, cluster.anchors = ca.address, ca.state_dir, ca.anchors
            ca.anchors.chmod(0o644)
        yield cluster
