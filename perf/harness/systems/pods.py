"""The systems measured through pods, as a mesh runs: the application's traffic leaves the
client pod, is redirected into that pod's proxy by the init rules, crosses the bridge (to the
server pod's proxy over mutual TLS) and reaches the application in the server pod.

    direct-pods      the floor in pods: the load generator in the client pod straight to the
                     backend in the server pod; both pods have the redirect rules, which the load
                     skips (it runs as the proxy user, as perf/bench_transparent.py's direct path)
    pymesh-pods      pymesh's native sidecars in both pods (transparent listeners, mutual TLS,
                     the server's inbound STRICT), configured by pymesh's control plane in a
                     third pod, as tests/test_transparent.py runs them
    linkerd2-proxy   Linkerd's proxy in both pods (systems/linkerd2.py)

Every system builds its own pods (perf/harness/pods.py; one hub, bridge and set of namespaces
each, deleted when it stops), with the same addresses: client 10.251.0.2, server 10.251.0.3,
the backend on 10.251.0.3:8080 (started in the server pod with the runner's arguments; the
runner's own backend on loopback is not used). The load generator runs in the client pod
(`ip netns exec`) and dials 10.251.0.3:8080, the address an application would; the redirect
rules are `pymesh-proxy init`'s (nftables: outbound to 4140, inbound to 4143, the proxy user
2102 and the admin port 4191 skipped), which are linkerd-init's. So the latency through the
veth, the bridge and netfilter is in every pods figure, and "added" is measured against
direct-pods in the same run, never against loopback `direct`.

A pair's CPU and RSS are both proxies' (`Running.companions`); control planes are not measured.
Each proxy runs one worker thread. The idle-connection scenario's client (the harness's own,
asyncio) opens its connections from a thread that has entered the client pod's namespace
(`Running.netns`), as root, so they are redirected to the client sidecar like the load is;
direct-pods, with no proxy to measure, skips it.
Needs root, iproute2, nftables and setpriv (else skipped with the reason).
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

from .. import loadgen, pods
from ..mesh import NAMESPACE, spiffe_id
from ..procs import StartError
from ..scenarios import Scenario
from ..tools import version_of
from .base import THREADS, Running, System, Unavailable
from .pymesh_native import sidecar_binary

CLIENT, SERVER, CP = "client", "server", "cp"
ADDRESSES = {CLIENT: pods.address(2), SERVER: pods.address(3)}
CP_ADDRESS = pods.address(10)
APP_PORT = 8080
TARGET = f"{ADDRESSES[SERVER][0]}:{APP_PORT}"  # what the load generator dials
SERVICE = "bench"  # the backend's service in pymesh's control plane
PYMESH_READY_S = 30.0


class PodsSystem(System):
    """A system in its own client and server pods; subclasses put their proxies in them."""

    baseline = "direct-pods"
    binaries = ("pymesh-proxy",)  # the init step
    short: ClassVar[str]  # in the namespaces' names
    control_pod: ClassVar[bool] = False  # pymesh's control plane in a pod of its own

    def check(self) -> None:
        reason = pods.unavailable()
        if reason:
            raise Unavailable(reason)
        sidecar_binary(self.context)

    def pods_settings(self) -> dict[str, Any]:
        return {"pods": f"client {ADDRESSES[CLIENT][0]} and server {ADDRESSES[SERVER][0]} network namespaces on a "
                        "bridge; redirect rules: pymesh-proxy init (nftables; outbound → 4140, inbound → 4143, "
                        f"uid {pods.PROXY_UID} and port 4191 skipped)",
                "load": f"pymesh-loadgen in the client pod → {TARGET} (the backend, in the server pod)",
                "pinning": "proxies pinned to the proxy CPU with --pin, like the loopback systems"}

    def services(self) -> dict[str, Any] | None:
        """The control plane's file source (for `control_pod`)."""
        return None

    @abstractmethod
    def mesh(self, cluster: pods.Cluster, scenario: Scenario, workdir: Path) -> AbstractContextManager[Running]:
        """Set up the pods' proxies (the backend already runs) and yield where the load goes."""

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        proxy = sidecar_binary(self.context)
        addresses = {name: list(ips) for name, ips in ADDRESSES.items()}
        if self.control_pod:
            addresses[CP] = list(CP_ADDRESS)
        prefix = f"pmb{os.getpid() % 100000}-{self.short}"
        try:
            with pods.cluster_up(workdir / "pods", prefix, proxy, addresses, services=self.services()) as cluster:
                backend_bin = self.context.snapshot.path("pymesh-backend")
                if backend_bin is None:
                    raise Unavailable("pymesh-backend is missing from the run's snapshot")
                backend = cluster.start(SERVER, "backend", loadgen.backend_command(backend_bin, scenario,
                                                                                   f"0.0.0.0:{APP_PORT}"))
                backend.wait_for_line(r"listening on (\S+)")
                with self.mesh(cluster, scenario, workdir) as running:
                    yield running
        except pods.PodsError as e:
            raise StartError(f"{self.name}: {e}") from e

    def load_prefix(self, cluster: pods.Cluster, *, proxy_user: bool = False) -> list[str]:
        """The load generator in the client pod (as the proxy user: past the redirect rules)."""
        return ["ip", "netns", "exec", cluster.ns(CLIENT), *(pods.as_proxy_user([]) if proxy_user else [])]


class DirectPods(PodsSystem):
    name = "direct-pods"
    label = "direct in pods (no proxy)"
    description = "client pod → bridge → server pod, redirect rules in place but skipped: the floor for pods"
    baseline = None
    short = "dp"

    def unsupported(self, scenario: Scenario) -> str | None:
        if scenario.kind == "idle":
            return ("no proxy to measure, and the idle client runs as root in the client pod, which the redirect "
                    "rules send to a sidecar that is not there")
        return None

    def settings(self) -> dict[str, Any]:
        return {"proxy": None, **self.pods_settings(),
                "upstream": f"none: the load runs as uid {pods.PROXY_UID}, which the client pod's rules skip; the "
                            f"server pod's rules skip port {APP_PORT}"}

    @contextmanager
    def mesh(self, cluster: pods.Cluster, scenario: Scenario, workdir: Path) -> Iterator[Running]:
        cluster.init(CLIENT)
        cluster.init(SERVER, "--skip-inbound-ports", str(APP_PORT))
        yield Running(address=TARGET, load_prefix=self.load_prefix(cluster, proxy_user=True),
                      notes=["the load generator runs as the proxy user, past the redirect rules"])


class PymeshPods(PodsSystem):
    name = "pymesh-pods"
    label = "pymesh sidecars in pods, mTLS"
    description = ("client pod: redirect → pymesh sidecar → mTLS → server pod: redirect → pymesh sidecar → "
                   "backend (CPU and RSS of both)")
    short = "pp"
    control_pod = True
    binaries = ("pymesh-proxy",)

    def version(self) -> str | None:
        return version_of([str(sidecar_binary(self.context)), "--version"])

    def services(self) -> dict[str, Any]:
        return {"services": [{"name": SERVICE, "endpoints": [{"address": TARGET, "identity": spiffe_id(SERVER)}]}]}

    def settings(self) -> dict[str, Any]:
        build = self.context.snapshot.builds.get("pymesh-proxy")
        return {"threads": THREADS, "threads_note": "per sidecar (pymesh's default)", **self.pods_settings(),
                "build": build.describe() if build else str(sidecar_binary(self.context)),
                "upstream": "client sidecar (transparent outbound: the endpoint's service and identity) → pooled "
                            "mutual TLS 1.3 → server sidecar (transparent inbound, tls STRICT) → backend",
                "identities": f"{spiffe_id(CLIENT)} → {spiffe_id(SERVER)}",
                "control_plane": f"pymesh control run in a third pod ({CP_ADDRESS[0]}), over TLS; not measured",
                "measured": "CPU and RSS summed over both sidecars"}

    @contextmanager
    def mesh(self, cluster: pods.Cluster, scenario: Scenario, workdir: Path) -> Iterator[Running]:
        cpu = self.context.proxy_cpu
        for pod in (SERVER, CLIENT):
            cluster.init(pod)
            cluster.start_sidecar(pod, pod, namespace=NAMESPACE, cpu=cpu)
        for pod in (SERVER, CLIENT):
            cluster.wait_ready(pod, [SERVICE], PYMESH_READY_S)
        configs = {f"pymesh-pods-{pod}.yaml": (cluster.work / f"{pod}.yaml").read_text() for pod in (CLIENT, SERVER)}
        yield Running(address=TARGET, child=cluster.sidecars[CLIENT], companions=[cluster.sidecars[SERVER]],
                      load_prefix=self.load_prefix(cluster), netns=cluster.ns(CLIENT), more_configs=configs)
