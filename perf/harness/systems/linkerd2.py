"""`linkerd2-proxy`: Linkerd's Rust proxy as a sidecar pair in the harness's pods, only when the
user passes `--linkerd2-proxy PATH` (the harness never builds it, and nothing of Linkerd's is in
this repository).

linkerd2-proxy has no static config and routes by the original destination of a redirected
connection, so it runs as it does in a Linkerd mesh (systems/pods.py): in the client and the
server pod, as the proxy user (2102) behind the same redirect rules as pymesh's sidecars
(`pymesh-proxy init`, whose defaults are linkerd-init's: outbound 4140, inbound 4143, admin 4191
skipped), with linkerd2-proxy's default listeners on those ports, one worker thread
(`LINKERD2_PROXY_CORES=1`), and a stand-in control plane per pod on the pod's loopback
(perf/harness/linkerd2_control.py: identity, inbound and outbound policy, destination). The
path of a request:

    load generator (client pod) → redirect → client proxy (outbound: policy for 10.251.0.3:8080,
    P2C balancer over the endpoint from Destination.Get) → mutual TLS, HTTP/2 (the endpoint's
    `h2` hint: linkerd's HTTP/1 → HTTP/2 upgrade between proxies) → redirect → server proxy
    (inbound: detect, all clients allowed) → backend

Identities are Linkerd's DNS-like names (`client.bench.serviceaccount.identity.linkerd.cluster.local`
and `server.…`), certified by the stand-in's test CA; the start fails unless each proxy reports
/ready (it holds a certificate) and, after a few requests, the client proxy's metrics show its
outbound traffic to the server as `tls="true"` with the server's identity (so the pair is never
measured in plaintext). Every `LINKERD2_PROXY_*` variable of the harness's environment is passed
through over these settings (recorded in the report); CPU and RSS are both proxies'.

Skipped with the reason when the flag is missing, the binary is not executable, the pods cannot
be made (root, nftables), or linkerd2-proxy-api's protos are not in the cargo registry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import linkerd2_control as control
from .. import pods
from ..mesh import NAMESPACE
from ..procs import Child, StartError, pinned
from ..scenarios import Scenario
from .base import THREADS, Running, Unavailable
from .pods import ADDRESSES, APP_PORT, CLIENT, SERVER, TARGET, PodsSystem

READY_TIMEOUT_S = 30.0
CONTROL_START_S = 30.0
VERIFY_REQUESTS = 20  # through the pair before measuring, to read its TLS metrics
SERVICE = control.Service(authority=f"bench.{NAMESPACE}.svc.cluster.local:{APP_PORT}", address=TARGET,
                          identity=control.identity_name(SERVER, NAMESPACE), namespace=NAMESPACE)


def proxy_env(pod: str, control_address: str, anchors: str, identity_dir: Path) -> dict[str, str]:
    """One pod's proxy configuration: its control plane (loopback: plaintext, no names), its
    identity, linkerd2-proxy's default listeners (the redirect rules' ports), one core."""
    env = {
        "LINKERD2_PROXY_DESTINATION_SVC_ADDR": control_address,
        "LINKERD2_PROXY_POLICY_SVC_ADDR": control_address,
        "LINKERD2_PROXY_IDENTITY_SVC_ADDR": control_address,
        "LINKERD2_PROXY_POLICY_WORKLOAD": json.dumps({"ns": NAMESPACE, "pod": pod}),
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": anchors,
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": control.identity_name(pod, NAMESPACE),
        "LINKERD2_PROXY_IDENTITY_DIR": str(identity_dir),
        "LINKERD2_PROXY_IDENTITY_TOKEN_FILE": str(identity_dir / "token"),
        "LINKERD2_PROXY_INBOUND_LISTEN_ADDR": f"0.0.0.0:{pods.INBOUND_PORT}",
        "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR": f"127.0.0.1:{pods.OUTBOUND_PORT}",
        "LINKERD2_PROXY_ADMIN_LISTEN_ADDR": f"127.0.0.1:{pods.ADMIN_PORT}",
        # As Linkerd's injector sets them: the default policy, the cluster's networks, the pod's IP.
        "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY": "all-unauthenticated",
        "LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS": f"{pods.SUBNET}.0/24",
        "LINKERD2_PROXY_INBOUND_IPS": ADDRESSES[pod][0],
        "LINKERD2_PROXY_CORES": str(THREADS),
        "LINKERD2_PROXY_LOG": "warn,linkerd=info",
        "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD": "1s",
    }
    if pod == SERVER:
        env["LINKERD2_PROXY_INBOUND_PORTS"] = str(APP_PORT)  # watched eagerly, as linkerd's injector sets it
    return env


def tls_to_server(metrics: str) -> list[str]:
    """The client proxy's metric lines for outbound traffic over mutual TLS to the server's identity."""
    return [line for line in metrics.splitlines()
            if not line.startswith("#") and 'direction="outbound"' in line and 'tls="true"' in line
            and f'server_id="{SERVICE.identity}"' in line]


class Linkerd2Proxy(PodsSystem):
    name = "linkerd2-proxy"
    label = "linkerd2-proxy pair in pods, mTLS"
    description = ("Linkerd's proxy as client and server sidecars in pods, mutual TLS, with a stand-in control "
                   "plane (only with --linkerd2-proxy PATH)")
    short = "l5"

    def binary(self) -> Path:
        path = self.context.linkerd2_proxy
        if path is None:
            raise Unavailable("linkerd2-proxy is not built by the harness: pass --linkerd2-proxy PATH (a "
                              "linkerd2-proxy binary) to include it; the harness runs it in pods with a stand-in "
                              "control plane")
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise Unavailable(f"--linkerd2-proxy {path}: not an executable file")
        return path

    def check(self) -> None:
        self.binary()
        super().check()
        if control.find_protos() is None:
            raise Unavailable(control.protos_missing())

    def version(self) -> str | None:
        """Its release line: with no environment it logs it and exits 64 (it has no --version)."""
        try:
            result = subprocess.run([str(self.binary())], capture_output=True, text=True, timeout=20, env={})
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = re.search(r"release (\S+) \(([0-9a-f]+)\)", result.stdout + result.stderr)
        return f"linkerd2-proxy {found.group(1)} ({found.group(2)})" if found else None

    def settings(self) -> dict[str, Any]:
        passed = sorted(k for k in os.environ if k.startswith("LINKERD2_PROXY_"))
        return {"threads": THREADS, "cores": THREADS, "threads_note": "LINKERD2_PROXY_CORES=1 per proxy",
                **self.pods_settings(),
                "upstream": "client proxy (outbound policy → P2C balancer, endpoint from Destination.Get with its "
                            "identity and the h2 hint) → mutual TLS, HTTP/2 between the proxies → server proxy "
                            "(inbound: detect, all-unauthenticated) → backend",
                "identities": f"{control.identity_name(CLIENT, NAMESPACE)} → {SERVICE.identity}",
                "control_plane": "perf/harness/linkerd2_control.py on each pod's loopback (plaintext gRPC), "
                                 f"stubs generated from {control.PROTO_CRATE}; not measured",
                "measured": "CPU and RSS summed over both proxies",
                "environment_passed_through": passed}

    def _runnable_binary(self) -> Path:
        """The binary where the proxy user can run it: where it is if every directory above it
        lets others through, else a copy in the run's scratch directory (made once per run)."""
        path = self.binary().resolve()
        if all(os.stat(d).st_mode & stat.S_IXOTH for d in path.parents) and os.stat(path).st_mode & stat.S_IXOTH:
            return path
        copy = self.context.workdir / "bin" / "linkerd2-proxy"
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
            copy.chmod(0o755)
        return copy

    def _control(self, cluster: pods.Cluster, pod: str, stubs: Path, ca_dir: Path) -> str:
        """The stand-in control plane on the pod's loopback; returns its address."""
        config = cluster.work / f"l5d-control-{pod}.json"
        control.write_config(config, stubs=stubs, ca=ca_dir, listen="127.0.0.1:0", services=[SERVICE])
        child = cluster.start(pod, f"l5d-control-{pod}", [sys.executable, control.__file__, str(config)])
        return child.wait_for_line(r"^listening (\S+)$", CONTROL_START_S).group(1)

    @contextmanager
    def mesh(self, cluster: pods.Cluster, scenario: Scenario, workdir: Path) -> Iterator[Running]:
        binary = self._runnable_binary()
        try:
            stubs = control.prepare(self.context.workdir / "linkerd2-api")
        except control.StubError as e:
            raise Unavailable(str(e)) from e
        ca_dir = cluster.work / "l5d-ca"
        ca = control.make_ca(ca_dir)
        proxies: dict[str, Child] = {}
        envs: dict[str, dict[str, str]] = {}
        for pod in (SERVER, CLIENT):
            identity_dir = cluster.work / f"l5d-identity-{pod}"
            control.identity_files(identity_dir, control.identity_name(pod, NAMESPACE))
            address = self._control(cluster, pod, stubs, ca_dir)
            cluster.init(pod)
            envs[pod] = proxy_env(pod, address, ca.anchors_pem, identity_dir) | {
                k: v for k, v in os.environ.items() if k.startswith("LINKERD2_PROXY_")}
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **envs[pod]}
            proxies[pod] = cluster.start(pod, f"linkerd2-proxy-{pod}", pinned([str(binary)], self.context.proxy_cpu),
                                         proxy_user=True, env=env)
        for pod, child in proxies.items():
            child.wait_for(lambda pod=pod: cluster.ready(pod), "report /ready (hold a certificate from the stand-in "
                           "identity service)", READY_TIMEOUT_S)
        tls = self._verify_tls(cluster)

        def env_file(env: dict[str, str]) -> str:
            return "".join(f"{k}={json.dumps(v) if chr(10) in v else v}\n" for k, v in sorted(env.items()))

        yield Running(address=TARGET, child=proxies[CLIENT], companions=[proxies[SERVER]],
                      load_prefix=self.load_prefix(cluster), netns=cluster.ns(CLIENT),
                      config_name="linkerd2-proxy-client.env", config_text=env_file(envs[CLIENT]),
                      more_configs={"linkerd2-proxy-server.env": env_file(envs[SERVER]),
                                    "linkerd2-control.json": (cluster.work / f"l5d-control-{CLIENT}.json").read_text()},
                      notes=[f"client proxy → server proxy over mutual TLS: {tls}"])

    def _verify_tls(self, cluster: pods.Cluster) -> str:
        """A few requests through the pair, then the client proxy's outbound metrics must show
        mutual TLS to the server's identity; returns one such metric line."""
        loadgen_bin = self.context.snapshot.path("pymesh-loadgen")
        if loadgen_bin is None:
            raise Unavailable("pymesh-loadgen is missing from the run's snapshot")
        cluster.exec(CLIENT, str(loadgen_bin), "--url", f"http://{TARGET}/", "--rate", "100", "--duration",
                     f"{VERIFY_REQUESTS / 100:g}", "--warmup", "0", "--connections", "1", "--json", check=False)
        lines = tls_to_server(cluster.admin(CLIENT, "/metrics"))
        if not lines:
            outbound = [line for line in cluster.admin(CLIENT, "/metrics").splitlines()
                        if 'direction="outbound"' in line and not line.startswith("#")][:5]
            raise StartError("the client linkerd2-proxy's outbound traffic to the server is not mutual TLS with "
                             f"identity {SERVICE.identity}; its outbound metrics: {outbound}")
        return lines[0]
