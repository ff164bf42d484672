"""`pymesh`: the native sidecar `pymesh-proxy` from this checkout's release build, configured
by a generated ProxyConfig file (one listener on port 0 whose default service is the backend).

`sidecar_binary` and `sidecar` start any pymesh-proxy the same way; `pymesh-mtls` runs two."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..procs import Child, pinned
from ..scenarios import Scenario
from ..tools import ToolMissing, rust_tool, version_of
from .base import THREADS, Context, Running, System, Unavailable, supervised

LISTENING = r"^listening main (\S+)$"
ADMIN = r"^admin (\S+)$"


def proxy_config(upstream: str) -> dict[str, Any]:
    """The ProxyConfig both pymesh systems run: ports from the OS, every request to the backend."""
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "defaultService": "bench"}],
        "services": [{"name": "bench", "endpoints": [{"address": upstream}]}],
    }


def sidecar_binary(context: Context) -> Path:
    """The run's snapshot of target/release/pymesh-proxy (built if missing and allowed)."""
    snapped = context.snapshot.path("pymesh-proxy")
    if snapped:
        return snapped
    try:
        return rust_tool("pymesh-proxy", build=context.build)
    except ToolMissing as e:
        raise Unavailable(str(e)) from e


@contextmanager
def sidecar(name: str, binary: Path, config: dict[str, Any], path: Path, cpu: int | None
            ) -> Iterator[tuple[Child, dict[str, str]]]:
    """`pymesh-proxy` on `config` (written to `path`, its log beside it), one engine thread,
    optionally pinned; yields it once it has printed every address, as {listener name: address,
    "admin": address}. Stopped however the block ends."""
    path.write_text(json.dumps(config, indent=2))
    command = pinned([str(binary), "--config", str(path), "--log", "warn", "--threads", str(THREADS),
                      "--shutdown-grace", "1s", "--watch-interval", "0s"], cpu)
    with supervised(Child(name, command, path.with_suffix(".log"))) as child:
        admin = child.wait_for_line(ADMIN).group(1)  # printed after every listener's line
        text = child.log.read_text(errors="replace")
        addresses = dict(re.findall(r"^listening (\S+) (\S+)$", text, re.MULTILINE))
        addresses["admin"] = admin
        yield child, addresses


class PymeshNative(System):
    name = "pymesh"
    label = "pymesh (native sidecar)"
    description = "pymesh-proxy, the native sidecar binary (target/release)"
    binaries = ("pymesh-proxy",)

    def binary(self) -> Path:
        return sidecar_binary(self.context)

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
        path = self.scratch(scenario) / "proxy.json"
        with sidecar(self.name, self.binary(), proxy_config(upstream), path, self.context.proxy_cpu) as (child, at):
            yield Running(address=at["main"], child=child, config_name="pymesh.json", config_text=path.read_text())
