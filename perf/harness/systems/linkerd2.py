"""`linkerd2-proxy`: Linkerd's Rust proxy, only when the user passes `--linkerd2-proxy PATH`
(the harness never builds it).

linkerd2-proxy has no static-config mode: it starts only with its control-plane APIs
(identity, destination, policy) named in `LINKERD2_PROXY_*` environment variables, and it
routes outbound traffic by the connection's original destination (an iptables redirect, as
`linkerd-init` sets up). The harness passes every `LINKERD2_PROXY_*` variable of its own
environment through, sets the listen addresses (ports from the OS), one worker core and a
quiet log, waits (bounded) for the admin `/ready`, and sends the load to the outbound
listener. If the proxy does not come up, the system is reported as failed with its log;
without the flag it is reported as skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..procs import Child, free_port, http_ok, pinned
from ..scenarios import Scenario
from ..tools import version_of
from .base import THREADS, Running, System, Unavailable, supervised

READY_TIMEOUT_S = 30.0


class Linkerd2Proxy(System):
    name = "linkerd2-proxy"
    label = "linkerd2-proxy"
    description = "Linkerd's proxy (needs its control plane; only with --linkerd2-proxy PATH)"

    def binary(self) -> Path:
        path = self.context.linkerd2_proxy
        if path is None:
            raise Unavailable("linkerd2-proxy needs its control-plane APIs (identity, destination, policy) and "
                              "has no static config; pass --linkerd2-proxy PATH (with LINKERD2_PROXY_* set) "
                              "to include it")
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise Unavailable(f"--linkerd2-proxy {path}: not an executable file")
        return path

    def check(self) -> None:
        self.binary()

    def version(self) -> str | None:
        return version_of([str(self.binary()), "--version"])

    def settings(self) -> dict[str, Any]:
        passed = sorted(k for k in os.environ if k.startswith("LINKERD2_PROXY_"))
        return {"threads": THREADS, "cores": THREADS, "environment_passed_through": passed}

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        ports = {k: f"127.0.0.1:{free_port()}" for k in ("OUTBOUND", "INBOUND", "ADMIN", "CONTROL")}
        env = dict(os.environ)  # the user's LINKERD2_PROXY_* (control plane, identity) pass through
        env.update({f"LINKERD2_PROXY_{k}_LISTEN_ADDR": v for k, v in ports.items()})
        env.update({"LINKERD2_PROXY_CORES": str(THREADS), "LINKERD2_PROXY_LOG": "warn"})
        config = "\n".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("LINKERD2_PROXY_"))
        (workdir / "linkerd2-proxy.env").write_text(config + "\n")
        command = pinned([str(self.binary())], self.context.proxy_cpu)
        with supervised(Child(self.name, command, workdir / "linkerd2-proxy.log", env=env)) as child:
            child.wait_for(lambda: http_ok(f"http://{ports['ADMIN']}/ready"), "report /ready", READY_TIMEOUT_S)
            yield Running(address=ports["OUTBOUND"], child=child, config_name="linkerd2-proxy.env",
                          config_text=config + "\n",
                          notes=[f"load sent to the outbound listener; routing follows the original destination "
                                 f"(backend {upstream})"])

