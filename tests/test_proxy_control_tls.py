"""The engine's side of the control plane's TLS (issue 10), with a real `pymesh-proxy` and a
real `pymesh control run`: the proxy certifies, discovers and renews over TLS, verifying the
control plane as its identity; its token crosses the wire only inside TLS and only until it
has a certificate; it never falls back to plaintext and trusts no other server, not even one
with a genuine mesh certificate of another identity."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from .backends import EchoBackend, start_echo_backend
from .conftest import NativeProxy, StartControl, proxy_binary
from .control_plane import ControlPlane, write_services
from .security import MeshClient, Relay, spiffe, token

CLIENT = spiffe("shop", "client")
StartProxy = Callable[..., NativeProxy]


@pytest.fixture
def backend() -> Iterator[EchoBackend]:
    server = start_echo_backend()
    yield server
    server.stop()


def control_plane(start_control: StartControl, tmp_path: Path, backend: EchoBackend, *,
                  plaintext: bool = False) -> ControlPlane:
    """A control plane whose file source knows `web` (one plain endpoint: the echo backend)."""
    services = tmp_path / "services"
    services.mkdir(exist_ok=True)
    write_services(services / "web.yaml", [{"name": "web", "endpoints": [{"address": backend.address}]}])
    return start_control(f"file:{services}", "--cert-lifetime", "10s", plaintext=plaintext)


def state_dir(control: ControlPlane) -> Path:
    return control.log_path.with_suffix(".state")


def meshed_config(tmp_path: Path, control: ControlPlane, address: str, **control_plane: Any) -> dict[str, Any]:
    """A proxy that learns its services from, and gets its certificate from, ``address``."""
    token_file = tmp_path / "client.token"
    token_file.write_text(token(state_dir(control), "shop", "client"))
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0"}],
        "controlPlane": {"addresses": [address], "namespace": "shop", "serviceAccount": "client",
                         **control_plane},
        "identity": {"trustAnchorsFile": str(state_dir(control) / "trust-anchor.pem"),
                     "tokenFile": str(token_file)},
    }


def refreshes(proxy: NativeProxy, result: str) -> float:
    return sum(float(line.split()[-1]) for line in proxy.metrics().splitlines()
               if line.startswith("identity_cert_refresh_total") and f'result="{result}"' in line)


def ready_status(proxy: NativeProxy) -> int:
    return httpx.get(f"http://{proxy.admin}/ready", timeout=5).status_code


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g}s: {what}")


def assert_never_certified(proxy: NativeProxy, relay: Relay, token_text: str) -> None:
    """Two tries failed, no certificate, not ready, and the token never crossed the wire."""
    wait_for(lambda: refreshes(proxy, "failed") >= 2, 40, "two failed certificate requests")
    assert refreshes(proxy, "ok") == 0
    assert ready_status(proxy) == 503
    assert token_text.encode() not in relay.seen
    assert CLIENT.encode() not in relay.seen


def test_a_proxy_certifies_discovers_and_renews_over_tls(start_control: StartControl, native_proxy: StartProxy,
                                                        backend: EchoBackend, tmp_path: Path) -> None:
    """Through a relay that records every byte (an attacker on the path): the proxy gets its
    certificate, learns `web` and serves it, then renews with the token file gone. The relay
    saw neither the token nor the identity the proxy asked for."""
    control = control_plane(start_control, tmp_path, backend)
    relay = Relay(control.address)
    try:
        config = meshed_config(tmp_path, control, relay.address)
        token_file = Path(config["identity"]["tokenFile"])
        token_text = token_file.read_text()
        proxy = native_proxy(config)
        wait_for(lambda: ready_status(proxy) == 200, 30, "the first certificate")
        url = f"http://{proxy.address()}/echo"
        wait_for(lambda: httpx.get(url, headers={"host": "web"}, timeout=5).status_code == 200, 30,
                 "`web` discovered over TLS and served")

        token_file.unlink()  # renewals are proven by the certificate the proxy holds
        wait_for(lambda: refreshes(proxy, "ok") >= 3, 40, "two renewals without the token")
        assert httpx.get(url, headers={"host": "web"}, timeout=5).status_code == 200

        assert relay.seen, "the proxy did not go through the relay"
        assert token_text.encode() not in relay.seen
        assert token_text.split(".")[-1].encode() not in relay.seen
        assert CLIENT.encode() not in relay.seen
        assert b"reached in plaintext" not in Path(proxy.log_path).read_bytes()
    finally:
        relay.close()


def test_a_proxy_never_falls_back_to_plaintext(start_control: StartControl, native_proxy: StartProxy,
                                               backend: EchoBackend, tmp_path: Path) -> None:
    """A control plane answering in plaintext (a downgrade on the path, or a development
    one) is not used by a proxy that was not told to: no token is sent, nothing is learnt."""
    control = control_plane(start_control, tmp_path, backend, plaintext=True)
    relay = Relay(control.address)
    try:
        config = meshed_config(tmp_path, control, relay.address)
        proxy = native_proxy(config)
        assert_never_certified(proxy, relay, Path(config["identity"]["tokenFile"]).read_text())
        response = httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web"}, timeout=5)
        assert response.status_code != 200
    finally:
        relay.close()


def test_a_proxy_trusts_only_the_control_planes_identity(start_control: StartControl, native_proxy: StartProxy,
                                                         backend: EchoBackend, tmp_path: Path) -> None:
    """A workload with a genuine mesh certificate (`evil/mallory`) serves gRPC over TLS and
    waits for proxies' tokens: the proxy checks the server's identity, not only its chain,
    and sends nothing. Told to expect another identity, it refuses the real control plane."""
    control = control_plane(start_control, tmp_path, backend)
    anchors = (state_dir(control) / "trust-anchor.pem").read_bytes()
    client = MeshClient(control, anchors)
    impostor = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        mallory = spiffe("evil", "mallory")
        workload = client.certify(mallory, token(state_dir(control), "evil", "mallory"))
        port = impostor.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(workload.key, workload.chain)]))
        impostor.start()
        relay = Relay(f"127.0.0.1:{port}")
        config = meshed_config(tmp_path, control, relay.address)
        assert_never_certified(native_proxy(config), relay, Path(config["identity"]["tokenFile"]).read_text())
        relay.close()

        relay = Relay(control.address)
        config = meshed_config(tmp_path, control, relay.address, identity=spiffe("pymesh-system", "other"))
        assert_never_certified(native_proxy(config), relay, Path(config["identity"]["tokenFile"]).read_text())
        relay.close()
    finally:
        impostor.stop(0)
        client.close()


def test_plaintext_to_the_control_plane_is_only_by_configuration(tmp_path: Path) -> None:
    """A proxy with a control plane but no identity cannot use TLS: it refuses to start and
    names the setting; with `plaintext: true` it starts and warns in its log."""
    config = {"admin": {"address": "127.0.0.1:0"}, "listeners": [{"name": "main", "address": "127.0.0.1:0"}],
              "controlPlane": {"addresses": ["127.0.0.1:9"], "namespace": "shop", "serviceAccount": "client"}}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([proxy_binary(), "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "control_plane.plaintext" in result.stderr + result.stdout

    config["controlPlane"]["plaintext"] = True
    proxy = NativeProxy(config, tmp_path / "plaintext.yaml")
    try:
        wait_for(lambda: "reached in plaintext" in proxy.logs, 10, "the plaintext warning in the log")
    finally:
        proxy.stop()
