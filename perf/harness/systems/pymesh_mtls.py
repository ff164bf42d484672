"""`pymesh-mtls`: a pair of pymesh sidecars speaking mutual TLS to each other, as a mesh deploys
them: load → client sidecar → mTLS 1.3 → server sidecar → backend.

- client sidecar (`pymesh-proxy`, identity `spiffe://cluster.local/ns/bench/sa/client`): an
  OUTBOUND listener `main` (where the load goes) whose default service has one endpoint, the
  server sidecar's inbound address, with the endpoint identity
  `spiffe://cluster.local/ns/bench/sa/server` (so the hop is mutual TLS, the peer verified).
- server sidecar (identity `…/sa/server`): an INBOUND listener `inbound` with `tls: STRICT`
  (plaintext is refused) whose default service is the backend.
- the mesh CA (perf/harness/mesh.py): `pymesh control run`, started first; both sidecars name
  it, their token and the trust anchors in their `identity` section, and the load starts only
  once each one's admin `/ready` answers 200 (it holds a certificate; bounded wait).

Both listeners detect the protocol, as the native system's does, so every scenario runs as it
does through `pymesh`: HTTP/1.1, HTTP/2 and gRPC (unary and streaming) on the same configs;
the sidecar-to-sidecar hop uses pooled connections, so TLS handshakes are off the per-request
path (except in the new-connection scenario's first requests).

Measured: the two sidecars together, as one system. CPU is the sum of both processes' CPU
time; RSS (and peak RSS, and the idle scenario's per-connection figure) is the sum of both
processes' resident memory, just as nginx's master and worker are summed. Each sidecar runs
one engine thread; with `--pin` both are on the proxy CPU (the pair gets the one CPU a single
proxy gets). The CA is neither pinned nor measured. Each sidecar's config goes to the report
as `pymesh-mtls-client.json` and `pymesh-mtls-server.json`; every generated file (CA state,
tokens, trust anchors, configs, logs) lives in the run's scratch directory and the CA is
stopped with the sidecars.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ..mesh import mesh_ca, spiffe_id
from ..procs import http_ok
from ..scenarios import Scenario
from ..tools import version_of
from .base import THREADS, Running, System, Unavailable
from .pymesh_native import proxy_config, sidecar, sidecar_binary

READY_TIMEOUT_S = 20.0
CLIENT_SA, SERVER_SA = "client", "server"


def server_config(upstream: str, identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "direction": "INBOUND",
                       "defaultService": "app", "tls": "STRICT"}],
        "services": [{"name": "app", "endpoints": [{"address": upstream}]}],
        "identity": identity,
    }


def client_config(server: str, identity: dict[str, Any]) -> dict[str, Any]:
    config = proxy_config(server)  # the native system's listener `main` (OUTBOUND) and service `bench`
    config["services"][0]["endpoints"][0]["identity"] = spiffe_id(SERVER_SA)
    config["identity"] = identity
    return config


class PymeshMtlsPair(System):
    name = "pymesh-mtls"
    label = "pymesh sidecar pair, mTLS"
    description = "client sidecar → mTLS 1.3 → server sidecar → backend (CPU and RSS of both, summed)"
    binaries = ("pymesh-proxy",)

    def binary(self) -> Path:
        return sidecar_binary(self.context)

    def check(self) -> None:
        self.binary()
        # The CA is `pymesh control run`: found without importing it (the harness process stays
        # free of the engine extension).
        spec = importlib.util.find_spec("pymesh")
        locations = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
        if not any((p / "control").is_dir() for p in locations):
            raise Unavailable("the pymesh Python package (its control plane is the mesh CA) is not installed "
                              "(scripts/install)")

    def version(self) -> str | None:
        return version_of([str(self.binary()), "--version"])

    def settings(self) -> dict[str, Any]:
        build = self.context.snapshot.builds.get("pymesh-proxy")
        return {"threads": THREADS, "threads_note": "per sidecar; both on the proxy CPU when pinned",
                "build": build.describe() if build else str(self.binary()),
                "upstream": "client sidecar → pooled mutual TLS 1.3 connections → server sidecar (tls STRICT) → "
                            "backend, pooled as pymesh's",
                "identities": f"{spiffe_id(CLIENT_SA)} → {spiffe_id(SERVER_SA)}",
                "ca": "pymesh control run (file source, no services), not measured",
                "measured": "CPU and RSS summed over both sidecars"}

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        binary, cpu = self.binary(), self.context.proxy_cpu
        with ExitStack() as stack:  # unwinds sidecars first, then the CA
            ca = stack.enter_context(mesh_ca(workdir / "ca"))
            identities = ca.identities(CLIENT_SA, SERVER_SA)
            server_path, client_path = workdir / "server.json", workdir / "client.json"
            server, server_at = stack.enter_context(sidecar(
                "server sidecar", binary, server_config(upstream, identities[SERVER_SA]), server_path, cpu))
            client, client_at = stack.enter_context(sidecar(
                "client sidecar", binary, client_config(server_at["inbound"], identities[CLIENT_SA]), client_path,
                cpu))
            for child, at in ((server, server_at), (client, client_at)):
                child.wait_for(lambda at=at: http_ok(f"http://{at['admin']}/ready"),
                               "report /ready (hold a certificate from the mesh CA)", READY_TIMEOUT_S)
            yield Running(address=client_at["main"], child=client, companions=[server],
                          config_name="pymesh-mtls-client.json", config_text=client_path.read_text(),
                          more_configs={"pymesh-mtls-server.json": server_path.read_text()})
