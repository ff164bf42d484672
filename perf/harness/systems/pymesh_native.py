"""`pymesh`: the native sidecar `pymesh-proxy` from this checkout's release build, configured
by a generated ProxyConfig file (one listener on port 0 whose default service is the backend)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..procs import Child, pinned
from ..scenarios import Scenario
from ..tools import ToolMissing, rust_tool, version_of
from .base import THREADS, Running, System, Unavailable, supervised

LISTENING = r"^listening main (\S+)$"
ADMIN = r"^admin (\S+)$"


def proxy_config(upstream: str) -> dict[str, Any]:
    """The ProxyConfig both pymesh systems run: ports from the OS, every request to the backend."""
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "defaultService": "bench"}],
        "services": [{"name": "bench", "endpoints": [{"address": upstream}]}],
    }


class PymeshNative(System):
    name = "pymesh"
    label = "pymesh (native sidecar)"
    description = "pymesh-proxy, the native sidecar binary (target/release)"

    def binary(self) -> Path:
        """The run's snapshot of target/release/pymesh-proxy (built if missing)."""
        snapped = self.context.snapshot.path("pymesh-proxy")
        if snapped:
            return snapped
        try:
            return rust_tool("pymesh-proxy", build=self.context.build)
        except ToolMissing as e:
            raise Unavailable(str(e)) from e

    def check(self) -> None:
        self.binary()

    def version(self) -> str | None:
        return version_of([str(self.binary()), "--version"])

    def settings(self) -> dict[str, Any]:
        build = self.context.snapshot.builds.get("pymesh-proxy")
        return {"threads": THREADS, "build": build.describe() if build else str(self.binary()),
                "upstream": "pooled HTTP/1.1 keep-alive; one multiplexed HTTP/2 connection for HTTP/2 clients",
                "metrics": "on (always)"}

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        config = proxy_config(upstream)
        path = workdir / "proxy.json"
        path.write_text(json.dumps(config, indent=2))
        command = pinned([str(self.binary()), "--config", str(path), "--log", "warn", "--threads", str(THREADS),
                          "--shutdown-grace", "1s", "--watch-interval", "0s"], self.context.proxy_cpu)
        with supervised(Child(self.name, command, workdir / "proxy.log")) as child:
            address = child.wait_for_line(LISTENING).group(1)
            child.wait_for_line(ADMIN)
            yield Running(address=address, child=child, config_name="pymesh.json", config_text=path.read_text())
