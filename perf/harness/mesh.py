"""The mesh CA for the systems that speak mutual TLS, set up as a deployment does it.

The CA is this project's control plane: `pymesh control run` with a file source holding no
services (only its Identity service is used; the pods give it theirs, and run it in a pod of
its own: perf/harness/pods.py), its state (generated trust anchor and issuer, token secret) in
the run's scratch directory, run as a harness child and always stopped. For
every workload it certifies, `pymesh control token` writes a proof-of-identity token and
`pymesh control ca-bundle` the trust anchors; a sidecar's `identity` config section names
those files, the CA's address and its namespace and service account. A sidecar is ready
(admin `/ready` answers 200) once it holds a certificate.

The CA is not on the data path once sidecars are certified (certificates live for a day, far
longer than a run), and it is never measured.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .procs import Child, StartError

NAMESPACE = "bench"
TRUST_DOMAIN = "cluster.local"  # pymesh's default trust domain
# `pymesh …` with this interpreter (no reliance on the console script or a pyenv shim).
PYMESH_CLI = [sys.executable, "-c", "import sys; from pymesh.cli import main; sys.argv[0] = 'pymesh'; main()"]
CLI_TIMEOUT_S = 60.0


def spiffe_id(service_account: str, namespace: str = NAMESPACE) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def pymesh_cli(*args: str) -> str:
    """The stdout of `pymesh ARGS…`; StartError with its stderr if it fails."""
    try:
        result = subprocess.run([*PYMESH_CLI, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StartError(f"pymesh {' '.join(args[:2])}: {e}") from e
    if result.returncode != 0:
        raise StartError(f"pymesh {' '.join(args[:2])} exited with status {result.returncode}: "
                         f"{result.stderr.strip()[-1500:]}")
    return result.stdout


@dataclass
class MeshCA:
    """A running mesh CA: its gRPC address, state directory, and trust anchors file."""

    child: Child
    address: str
    state_dir: Path
    workdir: Path
    anchors: Path

    def identities(self, *service_accounts: str) -> dict[str, dict[str, Any]]:
        """The `identity` config section for each service account (in namespace `bench`), with
        its token written to a file (the CLI calls run in parallel: each is a Python start)."""
        with ThreadPoolExecutor(max_workers=len(service_accounts) or 1) as pool:
            tokens = list(pool.map(
                lambda sa: pymesh_cli("control", "token", "--namespace", NAMESPACE, "--service-account", sa,
                                      "--state-dir", str(self.state_dir)).strip(),
                service_accounts))
        sections = {}
        for sa, token in zip(service_accounts, tokens, strict=True):
            path = self.workdir / f"{NAMESPACE}-{sa}.token"
            path.write_text(token)
            sections[sa] = {"trustAnchorsFile": str(self.anchors), "caAddresses": [self.address],
                            "tokenFile": str(path), "namespace": NAMESPACE, "serviceAccount": sa}
        return sections


@contextmanager
def mesh_ca(workdir: Path, *, services: Mapping[str, Any] | None = None, listen: str = "127.0.0.1:0",
            netns: str | None = None) -> Iterator[MeshCA]:
    """Start the CA with its files in `workdir`; it is stopped however the block ends. With
    `services` (the file source's content) it is also the mesh's Discovery; with `netns` it runs
    in that network namespace (a pod's control plane, perf/harness/pods.py)."""
    source = workdir / "services"
    source.mkdir(parents=True, exist_ok=True)
    (source / "services.yaml").write_text(yaml.safe_dump(dict(services or {"services": []})))
    state = workdir / "ca-state"
    command = [*PYMESH_CLI, "control", "run", "--source", f"file:{source}", "--listen", listen,
               "--admin", "127.0.0.1:0", "--state-dir", str(state), "--log-level", "warning"]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    child = Child("mesh CA (pymesh control run)", command, workdir / "ca.log")
    try:
        address = child.wait_for_line(r"^listening (\S+)$").group(1)
        child.wait_for_line(r"^admin (\S+)$")
        anchors = workdir / "trust-anchors.pem"
        anchors.write_text(pymesh_cli("control", "ca-bundle", "--state-dir", str(state)))
        yield MeshCA(child, address, state, workdir, anchors)
    finally:
        child.stop()
