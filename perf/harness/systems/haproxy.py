"""`haproxy`: HAProxy as an HTTP reverse proxy, a foreground child process (`-db`) with a
generated config in a scratch directory: one thread (`nbthread 1`, matched to pymesh),
keep-alive on both sides with idle upstream connections reused (`http-reuse always`), no log.

HTTP/2 and gRPC scenarios: the frontend binds `proto h2` (h2c, prior knowledge) and the server
line says `proto h2`, so the upstream hop is HTTP/2 too, as pymesh's is (gRPC trailers pass
through end to end).

`haproxy-tcp`: the same HAProxy in `mode tcp`, a byte relay (a floor for one hop; see the class).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from ..procs import Child, free_port, pinned
from ..scenarios import Scenario
from .base import THREADS, DebianPackageSystem, Running, supervised

CONFIG = """\
global
    nbthread {threads}
    maxconn 4000

defaults
    mode {mode}
    timeout connect 5s
    timeout client 90s
    timeout server 90s
    timeout http-keep-alive 90s
{http_options}
frontend bench
    bind {listen}{proto}
    default_backend upstream

backend upstream
    server backend {upstream}{proto}
"""


HTTP_OPTIONS = """\
    option http-keep-alive
    http-reuse always
"""


class Haproxy(DebianPackageSystem):
    name = "haproxy"
    label = "HAProxy"
    description = "HAProxy reverse proxy, 1 thread, http-reuse always"

    executable = "haproxy"
    package = "haproxy"
    #: `http` (a reverse proxy) or `tcp` (a byte relay)
    mode: ClassVar[str] = "http"

    def settings(self) -> dict[str, Any]:
        return {"threads": THREADS, "nbthread": THREADS, "http_reuse": "always",
                "upstream": "HTTP/1.1 keep-alive; HTTP/2 (proto h2) for HTTP/2 clients", "log": "off"}

    def config(self, upstream: str, listen: str, scenario: Scenario) -> str:
        http = self.mode == "http"
        proto = " proto h2" if http and scenario.http2 else ""
        return CONFIG.format(threads=THREADS, listen=listen, upstream=upstream, proto=proto, mode=self.mode,
                             http_options=HTTP_OPTIONS if http else "")

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        listen = f"127.0.0.1:{free_port()}"
        path = workdir / "haproxy.cfg"
        path.write_text(self.config(upstream, listen, scenario))
        command = pinned([str(self.binary()), "-db", "-f", str(path)], self.context.proxy_cpu)
        with supervised(Child(self.name, command, workdir / "haproxy.log")) as child:
            child.wait_for_port(listen)
            yield Running(address=listen, child=child, config_name=f"{self.name}-{scenario.protocol}.cfg",
                          config_text=path.read_text())


class HaproxyTcp(Haproxy):
    """HAProxy in `mode tcp`: each client connection gets an upstream connection of its own and
    bytes are copied both ways, nothing parsed. Its added latency is what one hop through a
    mature event-loop proxy costs on this machine before any HTTP work: the floor an HTTP proxy's
    added latency is measured against."""

    name = "haproxy-tcp"
    label = "HAProxy (mode tcp)"
    description = "HAProxy in mode tcp, 1 thread: a byte relay, one upstream connection per client"
    mode = "tcp"

    def settings(self) -> dict[str, Any]:
        return {"threads": THREADS, "nbthread": THREADS, "mode": "tcp",
                "upstream": "one TCP connection per client connection", "log": "off"}
