"""`pymesh demo`: a service behind two meshed proxies, traffic, and what the proxies saw.

The path: this process → client proxy ══ mutual TLS ══▶ server proxy → hello (2 instances).
The control plane runs as the mesh's CA; each proxy proves its workload identity with a token
and gets a short-lived SPIFFE certificate. The user handles no certificate.

Needs nothing beyond the install: the hello instances run in this process on loopback, the
proxies are the embedded engine, and the control plane is ``pymesh control run`` in a
subprocess on loopback with its state in a temporary directory. Everything started is stopped
at the end, on error and on Ctrl-C (or SIGTERM) too.
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from .errors import MeshError
from .metrics import samples
from .proxy import Proxy

NAMESPACE = "demo"
TRUST_DOMAIN = "cluster.local"
READY_TIMEOUT = 20.0  # seconds, for the control plane to start and for each certificate


def spiffe_id(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}"


class DemoError(MeshError):
    """The demo could not run; the message says which part failed."""


@dataclass
class ProxyView:
    """What one proxy saw: its identity, its certificate's expiry and its metrics."""

    identity: str
    cert_expires: float | None
    metrics_text: str

    def responses(self) -> list[dict[str, Any]]:
        """The ``response_total`` samples, as label dicts with a ``count``."""
        return [{**{k: v for k, v in s.labels.items() if v}, "count": int(s.value)}
                for s in samples(self.metrics_text) if s.name == "response_total" and s.value]


@dataclass
class DemoResult:
    sent: int
    statuses: dict[int, int]
    by_instance: dict[str, int]
    proxies: dict[str, ProxyView] = field(default_factory=dict)  # "client", "server"

    def as_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "statuses": self.statuses, "by_instance": self.by_instance,
            "proxies": {name: {"identity": v.identity, "cert_expires": v.cert_expires,
                               "responses": v.responses()}
                        for name, v in self.proxies.items()},
        }


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
    try:
        for i in range(count):
            handler = type(f"Hello{i}", (_HelloHandler,), {"instance": f"hello-{i}"})
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        yield [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


class _ControlPlane:
    """``pymesh control run`` in a subprocess: the mesh's CA, state in ``directory``."""

    def __init__(self, directory: Path) -> None:
        services = directory / "services"
        services.mkdir()
        (services / "services.yaml").write_text("services: []\n")
        self.state_dir = directory / "ca"
        self.log_path = directory / "control.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from pymesh.cli import main; main()", "control", "run",
                 "--source", f"file:{services}", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                 "--state-dir", str(self.state_dir)],  # TLS: proxies verify it as the mesh's control plane
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
            )
        self.address = ""

    def wait_started(self, timeout: float) -> None:
        """Reads ``listening ADDR`` and ``admin ADDR``; the rest of stdout is drained on a thread."""
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None

        def drain() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while "admin" not in seen:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DemoError(f"the control plane printed no addresses within {timeout:g}s"
                                f"{self.log_tail()}") from None
            if line is None:
                self.process.wait(timeout=5)
                raise DemoError(f"the control plane exited with code {self.process.returncode} "
                                f"before it was listening{self.log_tail()}")
            kind, _, rest = line.strip().partition(" ")
            seen[kind] = rest
        if not seen.get("listening"):
            raise DemoError(f"the control plane did not print its `listening` address{self.log_tail()}")
        self.address = seen["listening"]

    def log_tail(self, lines: int = 8) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "; the control plane's log ends with:\n  " + "\n  ".join(tail) if tail else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


class _Workloads:
    """Per-workload tokens and the trust anchors, made as `pymesh control token` and
    `pymesh control ca-bundle` make them (same functions, no subprocess)."""

    def __init__(self, control: _ControlPlane, directory: Path) -> None:
        from .control.identity.ca import trust_anchor_bundle
        from .control.identity.proof import load_secret
        from .control.settings import ControlSettings

        self.control = control
        self.directory = directory
        settings = ControlSettings(state_dir=str(control.state_dir), trust_domain=TRUST_DOMAIN)
        _, pem = trust_anchor_bundle(settings)
        self.anchors = directory / "trust-anchors.pem"
        self.anchors.write_bytes(pem)
        self._secret = load_secret(settings)

    def identity(self, service_account: str) -> dict[str, Any]:
        """The ``identity`` block of a proxy running as ``service_account`` in the demo namespace."""
        from .control.identity.proof import mint_token

        token = self.directory / f"{service_account}.token"
        token.touch(mode=0o600)
        token.write_text(mint_token(self._secret, spiffe_id(service_account)))
        return {"trustAnchorsFile": str(self.anchors), "caAddresses": [self.control.address],
                "tokenFile": str(token), "namespace": NAMESPACE, "serviceAccount": service_account}


def _wait_ready(name: str, proxy: Proxy, control: _ControlPlane, timeout: float) -> None:
    """Until the proxy's admin ``/ready`` says 200 (it holds its certificate)."""
    deadline = time.monotonic() + timeout
    said = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"http://{proxy.admin_address}/ready", timeout=2)
            if response.status_code == 200:
                return
            said = f"{response.status_code} {response.text.strip()[:200]}"
        except httpx.HTTPError as e:
            said = str(e) or type(e).__name__
        if control.process.poll() is not None:
            raise DemoError(f"the control plane exited (code {control.process.returncode}) before the "
                            f"{name} proxy got its certificate{control.log_tail()}")
        time.sleep(0.02)
    raise DemoError(f"the {name} proxy did not become ready within {timeout:g}s (no certificate from the "
                    f"CA at {control.address}?); its /ready said: {said}{control.log_tail()}")


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C does, so cleanup runs (only possible on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _expiry(metrics_text: str) -> float | None:
    return next((s.value for s in samples(metrics_text)
                 if s.name == "identity_cert_expiration_timestamp_seconds"), None)


def run(requests: int = 30, instances: int = 2) -> DemoResult:
    """Runs the demo and returns what happened (the CLI prints it)."""
    with _sigterm_as_exit(), ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pymesh-demo-")))
        os.chmod(directory, 0o700)
        control = _ControlPlane(directory)
        stack.callback(control.stop)
        control.wait_started(READY_TIMEOUT)
        workloads = _Workloads(control, directory)
        endpoints = stack.enter_context(_hello_instances(instances))

        server = Proxy({
            "admin": {"address": "127.0.0.1:0"},
            "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "direction": "INBOUND",
                           "defaultService": "hello", "tls": "STRICT"}],
            # Round-robin, so the demo's one-at-a-time requests visibly spread; the
            # default (P2C over PeakEWMA) would send them all to the fastest instance.
            "services": [{"name": "hello", "endpoints": [{"address": a} for a in endpoints],
                          "balancer": {"kind": "ROUND_ROBIN"}}],
            "identity": workloads.identity("hello"),
        }).start()
        stack.callback(server.stop, 1.0)
        client = Proxy({
            "admin": {"address": "127.0.0.1:0"},
            "listeners": [{"name": "outbound", "address": "127.0.0.1:0", "direction": "OUTBOUND"}],
            "services": [
                # The one endpoint of `hello` is the server proxy, known by its identity.
                {"name": "hello", "endpoints": [{"address": server.address("inbound"),
                                                 "identity": spiffe_id("hello")}]},
                {"name": "gone", "endpoints": [{"address": "127.0.0.1:9"}]},
            ],
            "identity": workloads.identity("client"),
        }).start()
        stack.callback(client.stop, 1.0)
        _wait_ready("server", server, control, READY_TIMEOUT)
        _wait_ready("client", client, control, READY_TIMEOUT)

        http = stack.enter_context(httpx.Client(base_url=f"http://{client.address('outbound')}", timeout=10))
        statuses: Counter[int] = Counter()
        by_instance: Counter[str] = Counter()
        for i in range(requests):
            response = http.get(f"/greet/{i}", headers={"host": "hello"})
            statuses[response.status_code] += 1
            if response.status_code != 200:
                reason = response.headers.get("pymesh-reason", "none")
                raise DemoError(f"a request through the client proxy failed: {response.status_code} "
                                f"(pymesh-reason: {reason}) {response.text.strip()[:200]}")
            by_instance[response.json()["instance"]] += 1
        # Two requests the client proxy answers itself: an unknown service, a dead endpoint.
        for host in ("nowhere", "gone"):
            statuses[http.get("/", headers={"host": host}).status_code] += 1

        proxies = {}
        for name, proxy, account in (("client", client, "client"), ("server", server, "hello")):
            text = proxy.metrics()
            proxies[name] = ProxyView(spiffe_id(account), _expiry(text), text)
        return DemoResult(requests + 2, dict(statuses), dict(by_instance), proxies)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "[red]no certificate[/red]"
    at = datetime.fromtimestamp(timestamp, UTC).strftime("%m-%d %H:%M UTC")
    left = timestamp - time.time()
    return f"in {left / 3600:.0f}h ({at})" if left >= 3600 else f"in {left / 60:.0f}m ({at})"


_SHOWN = ("direction", "dst_service", "status_code", "tls", "client_id", "server_id", "error")


def _labels(response: dict[str, Any]) -> str:
    parts = []
    for key in _SHOWN:
        if value := response.get(key):
            style = "green" if (key, value) == ("tls", "true") else "bold" if key.endswith("_id") else ""
            parts.append(f"[{style}]{key}={value}[/{style}]" if style else f"{key}={value}")
    return " ".join(parts)


def print_result(result: DemoResult, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]Sent {result.sent} requests:[/bold] "
                  "demo → client proxy ══[green]mTLS[/green]══▶ server proxy → hello")
    table = Table(title="Where they went")
    table.add_column("instance")
    table.add_column("requests", justify="right")
    for instance, n in sorted(result.by_instance.items()):
        table.add_row(instance, str(n))
    console.print(table)
    console.print("Statuses: " + ", ".join(f"{k}×{v}" for k, v in sorted(result.statuses.items())))

    ids = Table(title="Identities, from the control plane (the mesh CA)")
    for col in ("proxy", "identity", "certificate expires"):
        ids.add_column(col, no_wrap=True)
    for name, view in result.proxies.items():
        ids.add_row(name, view.identity, _when(view.cert_expires))
    console.print(ids)

    seen = Table(title="What each proxy saw: response_total")
    seen.add_column("proxy")
    seen.add_column("labels")
    seen.add_column("count", justify="right")
    for name, view in result.proxies.items():
        for response in sorted(view.responses(), key=lambda r: r.get("tls") != "true"):
            seen.add_row(name, _labels(response), str(response["count"]))
    console.print(seen)
    console.print("tls=true: the hop between the proxies was mutual TLS, and you handled no certificate: "
                  "each proxy proved its workload with a token and got a short-lived SPIFFE certificate "
                  "from the CA.", style="dim", highlight=False)
