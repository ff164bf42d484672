"""`pymesh demo`: a service, a proxy in front of it, traffic, and what the proxy saw.

Needs nothing beyond the install: the demo service runs in this process on
loopback, and the proxy is the embedded engine.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from rich.console import Console
from rich.table import Table

from .metrics import samples
from .proxy import Proxy


@dataclass
class DemoResult:
    sent: int
    statuses: dict[int, int]
    by_instance: dict[str, int]
    metrics_text: str


class _HelloHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    instance = "hello-0"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.dumps({"instance": self.instance, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


@contextmanager
def _hello_instances(count: int) -> Iterator[list[str]]:
    servers = []
    for i in range(count):
        handler = type(f"Hello{i}", (_HelloHandler,), {"instance": f"hello-{i}"})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def run(requests: int = 30, instances: int = 2) -> DemoResult:
    """Runs the demo and returns what happened (the CLI prints it)."""
    with _hello_instances(instances) as endpoints:
        config = {
            "admin": {"address": "127.0.0.1:0"},
            "listeners": [{"name": "outbound", "address": "127.0.0.1:0", "direction": "OUTBOUND"}],
            "services": [
                # Round-robin, so the demo's one-at-a-time requests visibly spread; the
                # default (P2C over PeakEWMA) would send them all to the fastest instance.
                {"name": "hello", "endpoints": [{"address": a} for a in endpoints],
                 "balancer": {"kind": "ROUND_ROBIN"}},
                {"name": "gone", "endpoints": [{"address": "127.0.0.1:9"}]},
            ],
        }
        with Proxy(config) as proxy, httpx.Client(base_url=f"http://{proxy.address('outbound')}") as client:
            statuses: Counter[int] = Counter()
            by_instance: Counter[str] = Counter()
            for i in range(requests):
                response = client.get(f"/greet/{i}", headers={"host": "hello"})
                statuses[response.status_code] += 1
                by_instance[response.json()["instance"]] += 1
            # Two requests the proxy answers itself: an unknown service, a dead endpoint.
            for host in ("nowhere", "gone"):
                statuses[client.get("/", headers={"host": host}).status_code] += 1
            return DemoResult(requests + 2, dict(statuses), dict(by_instance), proxy.metrics())


def print_result(result: DemoResult, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]Sent {result.sent} requests through the proxy[/bold]")
    table = Table(title="Where they went")
    table.add_column("instance")
    table.add_column("requests", justify="right")
    for instance, n in sorted(result.by_instance.items()):
        table.add_row(instance, str(n))
    console.print(table)
    console.print("Statuses: " + ", ".join(f"{k}×{v}" for k, v in sorted(result.statuses.items())))

    golden = Table(title="The proxy's golden metrics")
    for col in ("metric", "labels", "value"):
        golden.add_column(col, justify="right" if col == "value" else "left")
    wanted = ("request_total", "response_total", "tcp_open_total", "tcp_read_bytes_total",
              "tcp_write_bytes_total", "response_latency_seconds_count", "response_latency_seconds_sum")
    for s in samples(result.metrics_text):
        if s.name in wanted and s.value:
            labels = ", ".join(f"{k}={v}" for k, v in s.labels.items() if v)
            golden.add_row(s.name, labels, f"{s.value:g}")
    console.print(golden)
