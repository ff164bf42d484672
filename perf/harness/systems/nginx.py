"""`nginx`: nginx (Debian's nginx-light) as a reverse proxy, a non-daemon child process with a
generated config in a scratch directory: one worker process (matched to pymesh's one thread),
an upstream block with `keepalive` so it pools connections like pymesh, no access log, and
streaming (`proxy_buffering off`, `proxy_request_buffering off`) as the other proxies stream.

HTTP/2 scenarios: `listen … http2` serves h2c (prior knowledge) to the client; nginx's
`proxy_pass` speaks HTTP/1.1 upstream only, so the upstream hop stays HTTP/1.1 keep-alive.
gRPC scenarios (unary and streaming) use `grpc_pass` instead, nginx's gRPC proxy, which speaks
HTTP/2 upstream (kept alive the same way) and passes trailers through; `proxy_pass` would drop
them. Measured as master + worker (CPU and RSS summed over both).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..procs import Child, free_port, pinned
from ..scenarios import Scenario
from .base import THREADS, DebianPackageSystem, Running, supervised

CONFIG = """\
{user}worker_processes {threads};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 20000;

events {{
    worker_connections 10000;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 90s;
    client_max_body_size 64m;

    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 90s;
    }}

    server {{
        listen {listen}{http2};
        location / {{
{location}
        }}
    }}
}}
"""


HTTP_LOCATION = """\
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;"""

# grpc_pass always streams the request body; responses are passed on as they arrive.
GRPC_LOCATION = """\
            grpc_pass grpc://backend;"""


class Nginx(DebianPackageSystem):
    name = "nginx"
    label = "nginx"
    description = "nginx reverse proxy, 1 worker, upstream keepalive"

    executable = "nginx"
    package = "nginx-light"

    def settings(self) -> dict[str, Any]:
        return {"threads": THREADS, "worker_processes": THREADS, "upstream_keepalive": 64,
                "upstream": "HTTP/1.1 keep-alive (nginx cannot proxy_pass HTTP/2); gRPC: grpc_pass, HTTP/2 "
                            "keep-alive", "buffering": "off",
                "access_log": "off"}

    def config(self, upstream: str, listen: str, scenario: Scenario, workdir: Path) -> str:
        # Run as root, the worker would switch to `nobody` and lose access to the scratch dir.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.geteuid() == 0 else ""
        return CONFIG.format(user=user, threads=THREADS, dir=workdir, upstream=upstream, listen=listen,
                             http2=" http2" if scenario.http2 else "",
                             location=GRPC_LOCATION if scenario.grpc else HTTP_LOCATION)

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        listen = f"127.0.0.1:{free_port()}"
        path = workdir / "nginx.conf"
        path.write_text(self.config(upstream, listen, scenario, workdir))
        command = pinned([str(self.binary()), "-c", str(path), "-p", str(workdir), "-e", "stderr"],
                         self.context.proxy_cpu)
        with supervised(Child(self.name, command, workdir / "nginx.log")) as child:
            child.wait_for_port(listen)
            yield Running(address=listen, child=child, config_name=f"nginx-{scenario.protocol}.conf",
                          config_text=path.read_text())
