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


def proxy_config(upstream: str, protocol: str | None = None) -> dict[str, Any]:
    """The ProxyConfig the pymesh systems run: ports from the OS, every request to the backend;
    the listener detects the protocol unless `protocol` names one (OPAQUE: a byte relay)."""
    listener: dict[str, Any] = {"name": "main", "address": "127.0.0.1:0", "defaultService": "bench"}
    if protocol:
        listener["protocol"] = protocol
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [listener],
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

    #: The listener's protocol (None: detected from the first bytes).
    protocol: str | None = None

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        path = self.scratch(scenario) / "proxy.json"
        config = proxy_config(upstream, self.protocol)
        with sidecar(self.name, self.binary(), config, path, self.context.proxy_cpu) as (child, at):
            yield Running(address=at["main"], child=child, config_name=f"{self.name}.json",
                          config_text=path.read_text())


class PymeshTcp(PymeshNative):
    """The same sidecar with an OPAQUE listener: each client connection gets an upstream
    connection of its own and bytes are copied both ways, nothing parsed. Its added latency is
    what one hop through pymesh's runtime costs before any HTTP work (a floor for `pymesh`)."""

    name = "pymesh-tcp"
    label = "pymesh (native sidecar, opaque TCP)"
    description = "pymesh-proxy with an OPAQUE listener: a byte relay, one upstream connection per client"
    protocol = "OPAQUE"

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"listener": "protocol OPAQUE (no detection, no HTTP)",
                                     "upstream": "one TCP connection per client connection"}
