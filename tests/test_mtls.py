"""Mutual TLS between two real proxies certified by a real control plane (the mesh CA).

A client proxy reaches a server proxy's inbound listener over TLS 1.3 with SPIFFE
identities; clients without a valid certificate are refused; authorization policy
answers 403; certificates rotate under load without a failed request."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pymesh.metrics import total

from .backends import EchoBackend, TcpEchoServer, start_echo_backend
from .conftest import NativeProxy
from .control_plane import ControlPlane, write_services
from .deps import missing
from .security import CONTROL_SNI
from .test_mesh import loadgen, wait_for
from .traffic import Traffic

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/server"


def sni(identity: str) -> str:
    """The SNI name a mesh client uses for ``identity`` (as the engine's `tls::sni_name`)."""
    td, _, ns, _, sa = identity.removeprefix("spiffe://").split("/")
    return f"{sa}.{ns}.serviceaccount.identity.pymesh.{td}".replace("_", "-").lower()


def pymesh(*args: str) -> str:
    result = subprocess.run([sys.executable, "-c", "from pymesh.cli import main; main()", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@dataclass
class Mesh:
    control: ControlPlane
    state_dir: Path
    anchors: Path
    tmp: Path

    def token_file(self, namespace: str, service_account: str) -> Path:
        token = pymesh("control", "token", "--namespace", namespace, "--service-account", service_account,
                       "--state-dir", str(self.state_dir)).strip()
        path = self.tmp / f"{namespace}-{service_account}.token"
        path.write_text(token)
        return path

    def identity(self, namespace: str, service_account: str) -> dict[str, Any]:
        return {
            "trustAnchorsFile": str(self.anchors),
            "caAddresses": [self.control.address],
            "tokenFile": str(self.token_file(namespace, service_account)),
            "namespace": namespace,
            "serviceAccount": service_account,
        }

    def certify(self, identity: str, key: ec.EllipticCurvePrivateKey) -> list[x509.Certificate]:
        """A certificate for ``identity`` from the CA, as a proxy would get it."""
        import grpc

        from pymesh._proto.pymesh.mesh.v1 import identity_pb2, identity_pb2_grpc

        ns, sa = identity.split("/")[4], identity.split("/")[6]
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                              critical=True)
               .sign(key, hashes.SHA256()))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.anchors.read_bytes())
        with grpc.secure_channel(self.control.address, credentials,
                                 options=[("grpc.ssl_target_name_override", CONTROL_SNI)]) as channel:
            reply = identity_pb2_grpc.IdentityStub(channel).Certify(identity_pb2.CertifyRequest(
                identity=identity, token=self.token_file(ns, sa).read_text(),
                certificate_signing_request=csr.public_bytes(serialization.Encoding.DER)), timeout=10)
        return [x509.load_der_x509_certificate(der)
                for der in [reply.leaf_certificate, *reply.intermediate_certificates]]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    state_dir = tmp_path / "ca"
    services = tmp_path / "services"
    services.mkdir()
    write_services(services / "services.yaml", [])
    # Over TLS, as a mesh runs: proxies verify the control plane as its identity.
    control = ControlPlane(f"file:{services}", tmp_path / "control.log", "--state-dir", str(state_dir),
                           "--cert-lifetime", os.environ.get("PYMESH_TEST_CERT_LIFETIME", "1h"), plaintext=False)
    anchors = tmp_path / "anchors.pem"
    anchors.write_text(pymesh("control", "ca-bundle", "--state-dir", str(state_dir)))
    try:
        yield Mesh(control, state_dir, anchors, tmp_path)
    finally:
        control.stop()


@pytest.fixture
def backend() -> Iterator[EchoBackend]:
    backend = start_echo_backend()
    yield backend
    backend.stop()


ProxyStarter = Callable[..., NativeProxy]


@pytest.fixture
def native(tmp_path: Path) -> Iterator[ProxyStarter]:
    started: list[NativeProxy] = []

    def start(name: str, config: dict[str, Any]) -> NativeProxy:
        proxy = NativeProxy(config, tmp_path / f"{name}.yaml")
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def server_config(mesh: Mesh, app: str, tls: str = "STRICT", protocol: str = "PROTOCOL_UNSPECIFIED",
                  authorization: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "direction": "INBOUND",
                       "defaultService": "app", "tls": tls, "protocol": protocol}],
        "services": [{"name": "app", "endpoints": [{"address": app}]}],
        "identity": mesh.identity("shop", "server"),
    }
    if authorization is not None:
        config["authorization"] = authorization
    return config


def client_config(mesh: Mesh, server: str, expected: str = SERVER_ID,
                  protocol: str = "PROTOCOL_UNSPECIFIED") -> dict[str, Any]:
    return {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "defaultService": "web",
                       "protocol": protocol}],
        "services": [{"name": "web", "endpoints": [{"address": server, "identity": expected}]}],
        "identity": mesh.identity("shop", "client"),
    }


def ready(proxy: NativeProxy) -> None:
    wait_for(lambda: httpx.get(f"http://{proxy.admin}/ready", timeout=5).status_code == 200, 15)


def metrics_text(proxy: NativeProxy) -> str:
    return httpx.get(f"http://{proxy.admin}/metrics", timeout=5).text


def metric_lines(proxy: NativeProxy, name: str) -> list[str]:
    text = httpx.get(f"http://{proxy.admin}/metrics", timeout=5).text
    return [line for line in text.splitlines() if line.startswith(name)]


def pair(mesh: Mesh, native: ProxyStarter, backend: EchoBackend,
         **server: Any) -> tuple[NativeProxy, NativeProxy]:
    server_proxy = native("server", server_config(mesh, backend.address, **server))
    client_proxy = native("client", client_config(mesh, server_proxy.address("inbound")))
    ready(server_proxy)
    ready(client_proxy)
    return client_proxy, server_proxy


def test_a_meshed_hop_is_mutual_tls_with_identities(mesh: Mesh, native: ProxyStarter,
                                                     backend: EchoBackend) -> None:
    client_proxy, server_proxy = pair(mesh, native, backend)
    with httpx.Client(timeout=10) as http:
        for _ in range(5):
            r = http.get(f"http://{client_proxy.address()}/echo/hello", headers={"host": "web"})
            assert r.status_code == 200, r.text
    inbound = metric_lines(server_proxy, "response_total")
    assert any('tls="true"' in line and f'client_id="{CLIENT_ID}"' in line and 'status_code="200"' in line
               for line in inbound), inbound
    outbound = metric_lines(client_proxy, "response_total")
    assert any('tls="true"' in line and f'server_id="{SERVER_ID}"' in line for line in outbound), outbound
    expiry = metric_lines(client_proxy, "identity_cert_expiration_timestamp_seconds")
    assert expiry and float(expiry[0].split()[-1]) > time.time()

    # The wire: a plaintext request to the STRICT mesh port gets no answer at all.
    host, port = server_proxy.address("inbound").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n")
        assert sock.recv(1024) == b""

    # A client holding a mesh certificate speaks TLS 1.3 to it, and is known by its identity.
    key = ec.generate_private_key(ec.SECP256R1())
    chain = mesh.certify(f"spiffe://{TRUST_DOMAIN}/ns/tools/sa/probe", key)
    with mesh_tls_client(mesh, key, chain, server_proxy) as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(b"GET /echo/probe HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        assert read_all(tls).startswith(b"HTTP/1.1 200")
    probe = 'client_id="spiffe://cluster.local/ns/tools/sa/probe"'
    assert any(probe in line for line in metric_lines(server_proxy, "response_total"))
    # Its connection has closed: counted with its identity too.
    wait_for(lambda: any(probe in line and 'tls="true"' in line
                         for line in metric_lines(server_proxy, "tcp_close_total")), 5)


def test_http1_between_proxies_travels_multiplexed_over_http2(mesh: Mesh, native: ProxyStarter,
                                                              backend: EchoBackend) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import websockets

    client_proxy, server_proxy = pair(mesh, native, backend)
    address = client_proxy.address()

    def get(i: int) -> httpx.Response:
        # A connection of its own for each request: many HTTP/1 clients at once.
        return httpx.get(f"http://{address}/echo/{i}", headers={"host": "web.example:8080"}, timeout=10)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(get, range(24)))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        seen = r.json()
        # The application gets HTTP/1.1 with the client's Host, and never the proxies' mark.
        assert (seen["version"], seen["path"], seen["headers"].get("host")) == ("1.1", f"/echo/{i}",
                                                                                  "web.example:8080")
        assert "pymesh-orig-proto" not in seen["headers"]
    # All of them went over one connection between the proxies.
    accepted = total(metrics_text(server_proxy), "tcp_open_total", direction="inbound")
    assert accepted == 1, accepted

    # HTTP/1.0 stays HTTP/1.0 for the application.
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /echo/old HTTP/1.0\r\nHost: web\r\n\r\n")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body)["version"] == "1.0"

    # A client's own mark is not trusted: it is removed, and the request stays what it was.
    r = httpx.get(f"http://{address}/echo/marked", headers={"host": "web", "pymesh-orig-proto": "HTTP/1.0"},
                  timeout=10)
    assert r.status_code == 200 and r.json()["version"] == "1.1"
    assert "pymesh-orig-proto" not in r.json()["headers"]

    # A connection-bound request (a WebSocket upgrade) keeps its own HTTP/1 connection.
    async def talk() -> str:
        async with websockets.connect(f"ws://{address}/ws", open_timeout=5) as ws:
            await ws.send("over the mesh")
            return str(await asyncio.wait_for(ws.recv(), 5))

    assert asyncio.run(talk()) == "echo: over the mesh"
    assert total(metrics_text(server_proxy), "tcp_open_total", direction="inbound") == 2


class mesh_tls_client:
    """A TLS 1.3 client socket presenting ``chain`` (or nothing) to a proxy's mesh port."""

    def __init__(self, mesh: Mesh, key: ec.EllipticCurvePrivateKey | None,
                 chain: list[x509.Certificate] | None, proxy: NativeProxy,
                 version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # mesh certificates name SPIFFE URIs, not hosts
        context.load_verify_locations(cafile=str(mesh.anchors))
        context.minimum_version = context.maximum_version = version
        if key is not None and chain is not None:
            cert_path = mesh.tmp / "probe-chain.pem"
            key_path = mesh.tmp / "probe-key.pem"
            cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            context.load_cert_chain(str(cert_path), str(key_path))
        host, port = proxy.address("inbound").rsplit(":", 1)
        self.raw = socket.create_connection((host, int(port)), timeout=5)
        self.tls = context.wrap_socket(self.raw, server_hostname=sni(SERVER_ID))

    def __enter__(self) -> ssl.SSLSocket:
        return self.tls

    def __exit__(self, *exc: object) -> None:
        self.tls.close()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def refused(attempt: Callable[[], bytes]) -> bool:
    """In TLS 1.3 the server judges the client's certificate after the client's handshake
    ends, so a refusal shows as an alert or a closed connection at the first read. A read
    that times out is a hang, not a refusal."""
    try:
        return attempt() == b""
    except TimeoutError:
        return False
    except (ssl.SSLError, ConnectionError, OSError):
        return True


def self_signed_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def leaf(identity: str, issuer_key: Any, issuer: x509.Certificate, *, expired: bool = False
         ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = ((now - datetime.timedelta(hours=2), now - datetime.timedelta(hours=1)) if expired
                  else (now - datetime.timedelta(minutes=1), now + datetime.timedelta(hours=1)))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return key, cert


def test_clients_without_a_valid_certificate_are_refused(mesh: Mesh, native: ProxyStarter,
                                                         backend: EchoBackend) -> None:
    server_proxy = native("server", server_config(mesh, backend.address, tls="PERMISSIVE"))
    ready(server_proxy)
    request = b"GET /echo HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"

    def exchange(key: Any, chain: list[x509.Certificate] | None,
                 version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> Callable[[], bytes]:
        def run() -> bytes:
            with mesh_tls_client(mesh, key, chain, server_proxy, version) as tls:
                tls.sendall(request)
                return read_all(tls)
        return run

    # No certificate at all.
    assert refused(exchange(None, None))
    # A certificate from another CA.
    other_key, other_ca = self_signed_ca("not the mesh")
    key, cert = leaf(CLIENT_ID, other_key, other_ca)
    assert refused(exchange(key, [cert, other_ca]))
    # An expired certificate from the mesh's own issuer.
    issuer = x509.load_pem_x509_certificate((mesh.state_dir / "issuer.pem").read_bytes())
    issuer_key = serialization.load_pem_private_key((mesh.state_dir / "issuer.key").read_bytes(), None)
    key, cert = leaf(CLIENT_ID, issuer_key, issuer, expired=True)
    assert refused(exchange(key, [cert, issuer]))
    # TLS 1.2 is never spoken, even with a good certificate.
    good_key = ec.generate_private_key(ec.SECP256R1())
    good_chain = mesh.certify(CLIENT_ID, good_key)
    assert refused(exchange(good_key, good_chain, ssl.TLSVersion.TLSv1_2))
    # The same good certificate over TLS 1.3 works; so does plaintext on a PERMISSIVE port.
    assert exchange(good_key, good_chain)().startswith(b"HTTP/1.1 200")
    r = httpx.get(f"http://{server_proxy.address('inbound')}/echo", headers={"host": "app"}, timeout=5)
    assert r.status_code == 200

    # A client proxy that expects another identity than the server has gets no mesh TLS from
    # it (the server answers only hellos naming its own identity) and refuses the connection.
    wrong = native("wrong", client_config(mesh, server_proxy.address("inbound"),
                                          expected=f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/someone-else"))
    ready(wrong)
    r = httpx.get(f"http://{wrong.address()}/echo", headers={"host": "web"}, timeout=10)
    assert r.status_code == 502
    assert "mutual TLS with" in r.text


def test_authorization_policy_denies_with_403(mesh: Mesh, native: ProxyStarter, backend: EchoBackend) -> None:
    authorization = {
        "defaultPolicy": "ALL_AUTHENTICATED",
        "policies": [
            {"name": "no-client-writes", "action": "DENY", "identities": [CLIENT_ID], "methods": ["POST"]},
        ],
    }
    client_proxy, server_proxy = pair(mesh, native, backend, tls="PERMISSIVE", authorization=authorization)
    with httpx.Client(timeout=10) as http:
        url = f"http://{client_proxy.address()}/echo"
        assert http.get(url, headers={"host": "web"}).status_code == 200
        denied = http.post(url, headers={"host": "web"}, content=b"x")
        assert denied.status_code == 403
        assert denied.headers["pymesh-reason"] == "denied"
        assert denied.headers["pymesh-policy"] == "no-client-writes"
        # Plaintext, so no identity: the mesh-wide default wants one.
        plain = http.get(f"http://{server_proxy.address('inbound')}/echo", headers={"host": "app"})
        assert plain.status_code == 403
        assert plain.headers["pymesh-policy"] == "default:all-authenticated"
    decisions = metric_lines(server_proxy, "inbound_authz_total")
    assert any('policy="no-client-writes"' in line and 'decision="deny"' in line
               and f'client_id="{CLIENT_ID}"' in line for line in decisions), decisions
    assert any('policy="default:all-authenticated"' in line and 'decision="allow"' in line
               for line in decisions), decisions


def test_opaque_tcp_is_protected_and_authorized(mesh: Mesh, native: ProxyStarter, tmp_path: Path) -> None:
    echo = TcpEchoServer()
    try:
        authorization = {"policies": [{"name": "only-client", "identities": [CLIENT_ID]}]}
        server_proxy = native("server", server_config(mesh, echo.address, protocol="OPAQUE",
                                                      authorization=authorization))
        client_proxy = native("client", client_config(mesh, server_proxy.address("inbound"), protocol="OPAQUE"))
        ready(server_proxy)
        ready(client_proxy)
        host, port = client_proxy.address().rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"hello over mutual TLS")
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock).startswith(b"hello over mutual TLS")
        # Another identity is not on the policy: its connection is closed unanswered.
        key = ec.generate_private_key(ec.SECP256R1())
        chain = mesh.certify(f"spiffe://{TRUST_DOMAIN}/ns/tools/sa/probe", key)
        with mesh_tls_client(mesh, key, chain, server_proxy) as tls:
            tls.sendall(b"let me in")
            assert refused(lambda: read_all(tls))
        decisions = metric_lines(server_proxy, "inbound_authz_total")
        assert any('protocol="tcp"' in line and 'decision="allow"' in line and 'policy="only-client"' in line
                   for line in decisions), decisions
        assert any('protocol="tcp"' in line and 'decision="deny"' in line for line in decisions), decisions
    finally:
        echo.stop()


def test_trust_anchor_rotation_with_a_bundle(tmp_path: Path, native: ProxyStarter, backend: EchoBackend) -> None:
    """The whole rotation, with traffic throughout: proxies get a bundle of the old and new
    anchors; the CA moves to an issuer under the new anchor; proxies renew (10 s
    certificates); the old anchor is dropped; the hop still works."""
    state_dir = tmp_path / "ca"
    services = tmp_path / "services"
    services.mkdir()
    write_services(services / "services.yaml", [])
    control = ControlPlane(f"file:{services}", tmp_path / "control.log", "--state-dir", str(state_dir),
                           "--cert-lifetime", "10s", plaintext=False)
    stack = contextlib.ExitStack()
    try:
        anchors = tmp_path / "anchors.pem"
        old_pem = pymesh("control", "ca-bundle", "--state-dir", str(state_dir))
        anchors.write_text(old_pem)
        mesh = Mesh(control, state_dir, anchors, tmp_path)
        client_proxy, server_proxy = pair(mesh, native, backend)
        url = f"http://{client_proxy.address()}/echo"
        # Requests without a pause from here to the end, counted (not bursts between steps).
        traffic = Traffic(client_proxy.address(), "web", clients=2, max_requests=1_000_000, max_seconds=150)
        stack.enter_context(traffic)
        traffic.wait_for(50)

        def works() -> None:
            with httpx.Client(timeout=10) as http:
                for _ in range(10):
                    assert http.get(url, headers={"host": "web"}).status_code == 200

        works()
        new_key, new_anchor = self_signed_ca("new anchor")
        new_pem = new_anchor.public_bytes(serialization.Encoding.PEM).decode()
        for proxy in (client_proxy, server_proxy):
            config = proxy_config(proxy)
            config["identity"]["trustAnchorsFile"] = str(tmp_path / "bundle.pem")
            (tmp_path / "bundle.pem").write_text(old_pem + new_pem)
            proxy.reload(config)
        works()

        # The CA switches to an issuer of the new anchor (key first, as the README says).
        issuer_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        issuer = (x509.CertificateBuilder()
                  .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "new issuer")]))
                  .issuer_name(new_anchor.subject).public_key(issuer_key.public_key())
                  .serial_number(x509.random_serial_number())
                  .not_valid_before(now - datetime.timedelta(minutes=1))
                  .not_valid_after(now + datetime.timedelta(days=1))
                  .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                  .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                               content_commitment=False, key_encipherment=False,
                                               data_encipherment=False, key_agreement=False,
                                               encipher_only=False, decipher_only=False), critical=True)
                  .sign(new_key, hashes.SHA256()))
        (state_dir / "trust-anchor.pem").write_text(old_pem + new_pem)
        (state_dir / "issuer.key").write_bytes(issuer_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (state_dir / "issuer.pem").write_bytes(issuer.public_bytes(serialization.Encoding.PEM))

        def serves_new_issuer() -> bool:
            works()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # only reading which issuer signed it
            host, port = server_proxy.address("inbound").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=sni(SERVER_ID)) as tls:
                der = tls.getpeercert(binary_form=True)
            return der is not None and x509.load_der_x509_certificate(der).issuer == issuer.subject

        wait_for(serves_new_issuer, 30)
        # Two more renewals of the client proxy (the first may have been asked of the old
        # issuer): it then holds a new-issuer certificate too.
        renewed = refreshes(client_proxy, "ok")
        wait_for(lambda: refreshes(client_proxy, "ok") >= renewed + 2, 40)

        (tmp_path / "new.pem").write_text(new_pem)
        for proxy in (client_proxy, server_proxy):
            config = proxy_config(proxy)
            config["identity"]["trustAnchorsFile"] = str(tmp_path / "new.pem")
            proxy.reload(config)
        works()
        # A client checking against the new anchor alone accepts the server, and is accepted.
        mesh.anchors = tmp_path / "new.pem"
        key = ec.generate_private_key(ec.SECP256R1())
        chain = mesh.certify(f"spiffe://{TRUST_DOMAIN}/ns/tools/sa/probe", key)
        with mesh_tls_client(mesh, key, chain, server_proxy) as tls:
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            assert read_all(tls).startswith(b"HTTP/1.1 200")
        traffic.wait_for(traffic.sent + 50)
        stack.close()
        assert traffic.exhausted == 0, "traffic stopped before the rotation ended"
        assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.errors[:3], traffic.statuses)
    finally:
        stack.close()
        control.stop()


def refreshes(proxy: NativeProxy, result: str) -> float:
    return sum(float(line.split()[-1]) for line in metric_lines(proxy, "identity_cert_refresh_total")
               if f'result="{result}"' in line)


def proxy_config(proxy: NativeProxy) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(proxy.config_path.read_text())


@pytest.mark.timeout(480)  # five minutes of load, beyond the suite's per-test default
def test_certificates_rotate_under_load_without_a_failed_request(tmp_path: Path, native: ProxyStarter,
                                                                 backend: EchoBackend) -> None:
    """60 s certificates, 500 rps offered for five minutes through a meshed hop: every request
    succeeds while each proxy renews several times (how much of the rate a machine achieves
    is not this test's business)."""
    state_dir = tmp_path / "ca"
    services = tmp_path / "services"
    services.mkdir()
    write_services(services / "services.yaml", [])
    control = ControlPlane(f"file:{services}", tmp_path / "control.log", "--state-dir", str(state_dir),
                           "--cert-lifetime", "60s", plaintext=False)
    try:
        anchors = tmp_path / "anchors.pem"
        anchors.write_text(pymesh("control", "ca-bundle", "--state-dir", str(state_dir)))
        mesh = Mesh(control, state_dir, anchors, tmp_path)
        client_proxy, server_proxy = pair(mesh, native, backend)
        duration = int(os.environ.get("PYMESH_ROTATION_SECONDS", "300"))
        result = subprocess.run(
            [loadgen(), "--url", f"http://{client_proxy.address()}/echo", "--header", "host: web",
             "--rate", "500", "--duration", str(duration), "--warmup", "0", "--connections", "4", "--json"],
            capture_output=True, text=True, timeout=duration + 60)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["errors"] == 0, report
        assert report["requests"] > 0 and report["status_counts"] == {"200": report["requests"]}, report
        for proxy in (client_proxy, server_proxy):
            # Renewed at about 70% of each 60 s certificate: one a minute at least.
            assert refreshes(proxy, "ok") >= duration // 60, metric_lines(proxy, "identity_cert_refresh")
    finally:
        control.stop()


def test_sslyze_finds_only_tls13_and_no_weak_settings(mesh: Mesh, native: ProxyStarter,
                                                      backend: EchoBackend) -> None:
    """sslyze (a real TLS scanner) against a STRICT mesh port, presenting a mesh certificate.
    (Its SSL 2.0 probe does not run with the OpenSSL sslyze ships; SSL 3.0 up to TLS 1.3 do.)"""
    try:
        from sslyze import (
            ClientAuthenticationCredentials,
            OpenSslFileTypeEnum,
            ScanCommand,
            Scanner,
            ServerNetworkConfiguration,
            ServerNetworkLocation,
            ServerScanRequest,
            ServerScanStatusEnum,
        )
    except ImportError as e:
        missing(e)

    server_proxy = native("server", server_config(mesh, backend.address))
    ready(server_proxy)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = mesh.certify(f"spiffe://{TRUST_DOMAIN}/ns/tools/sa/scanner", key)
    cert_path, key_path = mesh.tmp / "scanner.pem", mesh.tmp / "scanner.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    host, port = server_proxy.address("inbound").rsplit(":", 1)
    suites = {
        ScanCommand.SSL_3_0_CIPHER_SUITES: "ssl_3_0_cipher_suites",
        ScanCommand.TLS_1_0_CIPHER_SUITES: "tls_1_0_cipher_suites",
        ScanCommand.TLS_1_1_CIPHER_SUITES: "tls_1_1_cipher_suites",
        ScanCommand.TLS_1_2_CIPHER_SUITES: "tls_1_2_cipher_suites",
        ScanCommand.TLS_1_3_CIPHER_SUITES: "tls_1_3_cipher_suites",
    }
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=host, port=int(port), ip_address=host),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication=sni(SERVER_ID),
            tls_client_auth_credentials=ClientAuthenticationCredentials(
                certificate_chain_path=cert_path, key_path=key_path, key_type=OpenSslFileTypeEnum.PEM)),
        scan_commands={*suites, ScanCommand.TLS_COMPRESSION, ScanCommand.HEARTBLEED,
                       ScanCommand.OPENSSL_CCS_INJECTION, ScanCommand.ELLIPTIC_CURVES,
                       ScanCommand.SESSION_RENEGOTIATION},
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    scan = result.scan_result
    assert scan is not None
    for name in [*suites.values(), "tls_compression", "heartbleed", "openssl_ccs_injection", "elliptic_curves"]:
        attempt = getattr(scan, name)
        assert attempt.result is not None, f"{name}: {attempt.error_reason} {attempt.error_trace}"
    accepted = {name: [s.cipher_suite.name for s in getattr(scan, name).result.accepted_cipher_suites]
                for name in suites.values()}
    assert accepted["tls_1_3_cipher_suites"], accepted
    assert all(not found for name, found in accepted.items() if name != "tls_1_3_cipher_suites"), accepted
    assert set(accepted["tls_1_3_cipher_suites"]) <= {
        "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
    assert not scan.tls_compression.result.supports_compression
    assert not scan.heartbleed.result.is_vulnerable_to_heartbleed
    assert not scan.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection
    curves = {c.name for c in scan.elliptic_curves.result.supported_curves or []}
    assert curves and curves <= {"X25519", "prime256v1", "secp256r1", "secp384r1", "X25519MLKEM768"}, curves


def test_the_control_plane_marks_endpoints_as_meshed_and_streams_policy(
        mesh: Mesh, native: ProxyStarter, backend: EchoBackend) -> None:
    """Discovery streams an endpoint with its identity, and a mesh-wide policy for the
    server; proxies configured with only their control plane, identity and anchors mesh
    to each other, and the server enforces the streamed policy as it changes."""
    source = Path(mesh.control.source.removeprefix("file:")) / "services.yaml"

    def publish(server_inbound: str, authorization: dict[str, Any] | None) -> None:
        document: dict[str, Any] = {"services": [
            {"name": "app", "endpoints": [{"address": backend.address}]},
            {"name": "web", "endpoints": [{"address": server_inbound, "identity": SERVER_ID}]},
        ]}
        if authorization is not None:
            document["authorization"] = authorization
        import yaml

        write_services(source, yaml.safe_dump(document))

    def meshed(service_account: str, listener: dict[str, Any]) -> dict[str, Any]:
        identity = mesh.identity("shop", service_account)
        del identity["caAddresses"], identity["namespace"], identity["serviceAccount"]
        return {
            "admin": {"address": "127.0.0.1:0"},
            "listeners": [listener],
            "services": [{"name": "app", "endpoints": [{"address": backend.address}]}],
            "controlPlane": {"addresses": [mesh.control.address], "namespace": "shop",
                             "serviceAccount": service_account},
            "identity": identity,
        }

    server_proxy = native("server", meshed("server", {
        "name": "inbound", "address": "127.0.0.1:0", "direction": "INBOUND", "defaultService": "app",
        "tls": "STRICT"}))
    deny_posts = {"policies": [{"name": "no-client-posts", "action": "DENY", "servers": [SERVER_ID],
                                "identities": [CLIENT_ID], "methods": ["POST"]},
                               {"name": "for-other-servers", "action": "DENY", "identities": ["*"],
                                "servers": ["spiffe://cluster.local/ns/elsewhere/*"]}]}
    publish(server_proxy.address("inbound"), deny_posts)
    client_proxy = native("client", meshed("client", {"name": "main", "address": "127.0.0.1:0"}))
    ready(server_proxy)
    ready(client_proxy)
    url = f"http://{client_proxy.address()}/echo"
    with httpx.Client(timeout=5) as http:
        wait_for(lambda: http.get(url, headers={"host": "web"}).status_code == 200, 10)
        wait_for(lambda: http.post(url, headers={"host": "web"}, content=b"x").status_code == 403, 10)
        denied = http.post(url, headers={"host": "web"}, content=b"x")
        assert denied.headers["pymesh-policy"] == "no-client-posts"
        assert http.get(url, headers={"host": "web"}).status_code == 200  # the other policy is not ours
        publish(server_proxy.address("inbound"), None)  # the policy is withdrawn
        wait_for(lambda: http.post(url, headers={"host": "web"}, content=b"x").status_code == 200, 10)
    assert any(f'server_id="{SERVER_ID}"' in line for line in metric_lines(client_proxy, "response_total"))
    assert any(f'client_id="{CLIENT_ID}"' in line for line in metric_lines(server_proxy, "response_total"))


def test_rate_limits_per_client_identity(mesh: Mesh, native: ProxyStarter, backend: EchoBackend) -> None:
    """A per-client rate limit on the server: one client identity over its bucket gets 429,
    on every connection it opens, while another identity is still served."""
    config = server_config(mesh, backend.address)
    config["services"][0]["rateLimit"] = {"requestsPerSecond": 0.01, "burst": 3, "perClient": True}
    server_proxy = native("server", config)
    client_proxy = native("client", client_config(mesh, server_proxy.address("inbound")))
    ready(server_proxy)
    ready(client_proxy)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = mesh.certify(f"spiffe://{TRUST_DOMAIN}/ns/tools/sa/probe", key)

    def probe() -> bytes:
        # A new connection each time: the bucket is the identity's, not the connection's.
        with mesh_tls_client(mesh, key, chain, server_proxy) as tls:
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            return read_all(tls).split(b" ", 2)[1]

    assert [probe() for _ in range(4)] == [b"200", b"200", b"200", b"429"]
    # Another identity has its own bucket, through the client proxy's pooled connection.
    with httpx.Client(timeout=10) as http:
        statuses = [http.get(f"http://{client_proxy.address()}/echo", headers={"host": "web"}).status_code
                    for _ in range(4)]
    assert statuses == [200, 200, 200, 429], statuses
    limited = [line for line in metric_lines(server_proxy, "rate_limited_total") if 'dst_service="app"' in line]
    assert limited and float(limited[0].split()[-1]) == 2, limited


def test_path_policies_cannot_be_sidestepped(mesh: Mesh, native: ProxyStarter, backend: EchoBackend) -> None:
    """A DENY on a path holds against other spellings of the path, and against a client that
    stays silent until detection gives up and treats its connection as opaque TCP."""
    authorization = {"policies": [{"name": "no-admin", "action": "DENY", "paths": ["/admin*"]}]}
    server_proxy = native("server", server_config(mesh, backend.address, tls="PERMISSIVE",
                                                  authorization=authorization))
    ready(server_proxy)
    host, port = server_proxy.address("inbound").rsplit(":", 1)
    with httpx.Client(timeout=5) as http:
        base = f"http://{server_proxy.address('inbound')}"
        assert http.get(f"{base}/echo", headers={"host": "app"}).status_code == 200
        # Denied as the application reads it, or refused as ambiguous (tests/test_path_policy.py).
        for path, status in [("/admin", 403), ("/%61dmin", 403), ("/echo/../admin", 400), ("//admin", 400)]:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".encode())
                answer = read_all(sock)
            assert answer.startswith(f"HTTP/1.1 {status}".encode()), (path, answer[:100])
    # Silent until the detect timeout: the proxy now sees opaque TCP, which a path policy cannot
    # judge, and closes it (forwarded, the application would wait for a request: a hang here).
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        assert refused(lambda: read_all(sock))
        with contextlib.suppress(OSError):  # nothing reaches the application either way
            sock.sendall(b"GET /admin HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            assert refused(lambda: read_all(sock))


def test_a_meshed_endpoint_is_never_reached_in_plaintext(mesh: Mesh, native: ProxyStarter,
                                                          backend: EchoBackend) -> None:
    """A proxy without an identity cannot reach an endpoint that has one, even when the
    server would take plaintext (PERMISSIVE): it fails to connect instead of downgrading."""
    server_proxy = native("server", server_config(mesh, backend.address, tls="PERMISSIVE"))
    ready(server_proxy)
    inbound = server_proxy.address("inbound")
    plain = native("plain", {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "defaultService": "web"}],
        "services": [{"name": "web", "endpoints": [{"address": inbound, "identity": SERVER_ID}]}],
    })
    with httpx.Client(timeout=10) as http:
        # The server does take plaintext from a client that asks for it directly...
        assert http.get(f"http://{inbound}/echo", headers={"host": "app"}).status_code == 200
        # ...but a proxy told the endpoint is meshed refuses to send it plaintext.
        for _ in range(3):
            r = http.get(f"http://{plain.address()}/echo", headers={"host": "web"})
            assert r.status_code == 502 and r.headers["pymesh-reason"] == "connect-failed", (r.status_code, r.text)
    # Only the direct request reached the server proxy.
    served = sum(float(line.split()[-1]) for line in metric_lines(server_proxy, "response_total")
                 if 'direction="inbound"' in line)
    assert served == 1, metric_lines(server_proxy, "response_total")


def test_identity_waits_for_its_first_certificate_and_keeps_it_while_renewal_fails(
        tmp_path: Path, native: ProxyStarter, backend: EchoBackend) -> None:
    """/ready waits for the first certificate; the token file is read again at every attempt
    until then (a fixed file is used); renewals are proven by the current certificate, so the
    token is not needed after the first; while renewal fails (the CA away) the proxy keeps its
    certificate and keeps serving."""
    state_dir = tmp_path / "ca"
    services = tmp_path / "services"
    services.mkdir()
    write_services(services / "services.yaml", [])
    control = ControlPlane(f"file:{services}", tmp_path / "control.log", "--state-dir", str(state_dir),
                           "--cert-lifetime", "20s", plaintext=False)
    try:
        anchors = tmp_path / "anchors.pem"
        anchors.write_text(pymesh("control", "ca-bundle", "--state-dir", str(state_dir)))
        mesh = Mesh(control, state_dir, anchors, tmp_path)
        server_proxy = native("server", server_config(mesh, backend.address))
        ready(server_proxy)
        config = client_config(mesh, server_proxy.address("inbound"))
        token_file = Path(config["identity"]["tokenFile"])
        good_token = token_file.read_text()
        token_file.write_text("v2.not-a-token.at-all\n")
        client_proxy = native("client", config)

        def ready_status() -> int:
            return httpx.get(f"http://{client_proxy.admin}/ready", timeout=5).status_code

        # Refused by the CA, twice: no certificate, so not ready.
        wait_for(lambda: refreshes(client_proxy, "failed") >= 2, 30)
        assert ready_status() == 503 and refreshes(client_proxy, "ok") == 0
        # The file fixed: read again at the next attempt, certified, ready.
        token_file.write_text(good_token)
        wait_for(lambda: ready_status() == 200, 30)
        assert refreshes(client_proxy, "ok") == 1
        expiry = metric_lines(client_proxy, "identity_cert_expiration_timestamp_seconds")
        url = f"http://{client_proxy.address()}/echo"
        assert httpx.get(url, headers={"host": "web"}, timeout=10).status_code == 200

        # The token gone: the renewal is proven by the certificate the proxy has.
        token_file.unlink()
        wait_for(lambda: refreshes(client_proxy, "ok") >= 2, 40)
        assert metric_lines(client_proxy, "identity_cert_expiration_timestamp_seconds") != expiry

        # The CA away: the next renewal fails, and the proxy keeps its certificate.
        control.stop()
        expiry = metric_lines(client_proxy, "identity_cert_expiration_timestamp_seconds")
        renewed = refreshes(client_proxy, "ok")
        failed = refreshes(client_proxy, "failed")
        wait_for(lambda: refreshes(client_proxy, "failed") > failed, 30)
        assert refreshes(client_proxy, "ok") == renewed
        assert metric_lines(client_proxy, "identity_cert_expiration_timestamp_seconds") == expiry
        assert float(expiry[0].split()[-1]) > time.time(), "the certificate expired before the check"
        assert ready_status() == 200
        assert httpx.get(url, headers={"host": "web"}, timeout=10).status_code == 200
    finally:
        control.stop()


class FirstBytes:
    """An application that records the first bytes each connection sends it, then closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.seen.append(conn.recv(65536))
                except OSError:
                    self.seen.append(b"")

    def close(self) -> None:
        self.sock.close()


def client_hello(server_name: str, address: str) -> None:
    """Starts a TLS handshake naming ``server_name`` and gives up on whatever comes back."""
    context = ssl.create_default_context()
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, contextlib.suppress(OSError):
        context.wrap_socket(raw, server_hostname=server_name)


def test_another_tls_client_passes_through_an_inbound_listener(mesh: Mesh, native: ProxyStarter) -> None:
    """On an INBOUND listener, TLS that is not mesh TLS (another SNI) is not terminated: its
    bytes reach the application as they were sent."""
    app = FirstBytes()
    try:
        server_proxy = native("server", server_config(mesh, app.address, tls="PERMISSIVE"))
        ready(server_proxy)
        client_hello("shop.example.com", server_proxy.address("inbound"))
        wait_for(lambda: len(app.seen) == 1, 10)
        assert app.seen[0][:2] == b"\x16\x03" and b"shop.example.com" in app.seen[0], app.seen[0][:64]
    finally:
        app.close()


def test_tls_disabled_never_terminates_mesh_tls(mesh: Mesh, native: ProxyStarter) -> None:
    """`tls: DISABLED`: even a mesh ClientHello (the proxy's own identity as SNI) reaches the
    application untouched; with PERMISSIVE the same hello is terminated by the proxy."""
    app = FirstBytes()
    try:
        disabled = native("disabled", server_config(mesh, app.address, tls="DISABLED"))
        permissive = native("permissive", server_config(mesh, app.address, tls="PERMISSIVE"))
        ready(disabled)
        ready(permissive)
        client_hello(sni(SERVER_ID), disabled.address("inbound"))
        wait_for(lambda: len(app.seen) == 1, 10)
        assert app.seen[0][:2] == b"\x16\x03" and sni(SERVER_ID).encode() in app.seen[0], app.seen[0][:64]
        # The control: PERMISSIVE takes that hello itself (refusing the certificate-less
        # client), so nothing reaches the application.
        client_hello(sni(SERVER_ID), permissive.address("inbound"))
        wait_for(lambda: any('tls="true"' not in line and "inbound" in line
                             for line in metric_lines(permissive, "tcp_close_total")), 10)
        assert len(app.seen) == 1, app.seen
    finally:
        app.close()


FORGED_IDENTITY = {"pymesh-client-id": f"spiffe://{TRUST_DOMAIN}/ns/ops/sa/admin",
                   "l5d-client-id": "admin.ops.serviceaccount.identity.linkerd.cluster.local",
                   "x-forwarded-client-cert": f"By=x;URI=spiffe://{TRUST_DOMAIN}/ns/ops/sa/admin"}


def test_the_application_sees_only_the_verified_client_identity(mesh: Mesh, native: ProxyStarter,
                                                                backend: EchoBackend) -> None:
    """A client claiming to be `ops/admin` in identity headers: over the mesh the application
    sees the identity from the client's certificate; in plaintext (PERMISSIVE) it sees none.
    Before, the forged headers reached the application as sent."""
    client_proxy, server_proxy = pair(mesh, native, backend, tls="PERMISSIVE")
    with httpx.Client(timeout=10) as http:
        meshed = http.get(f"http://{client_proxy.address()}/echo", headers={"host": "web", **FORGED_IDENTITY})
        direct = http.get(f"http://{server_proxy.address('inbound')}/echo", headers=FORGED_IDENTITY)
    assert meshed.status_code == 200 and direct.status_code == 200
    seen = meshed.json()["headers"]
    assert seen["pymesh-client-id"] == CLIENT_ID
    assert "l5d-client-id" not in seen and "x-forwarded-client-cert" not in seen
    seen = direct.json()["headers"]
    assert not set(FORGED_IDENTITY) & set(seen), seen


def test_connection_cannot_strip_protected_headers(native: ProxyStarter, backend: EchoBackend) -> None:
    """`Connection` names hop-by-hop headers, but not the ones the application relies on:
    before, `Connection: close, X-Forwarded-For, Authorization` arrived as neither."""
    proxy = native("plain", {"admin": {"address": "127.0.0.1:0"},
                             "listeners": [{"name": "main", "address": "127.0.0.1:0"}],
                             "services": [{"name": "web", "endpoints": [{"address": backend.address}]}]})
    protected = {"x-forwarded-for": "192.0.2.7", "authorization": "Bearer secret", "cookie": "session=1",
                 "forwarded": "for=192.0.2.7", "pymesh-trace": "1"}
    response = httpx.get(f"http://{proxy.address()}/echo", timeout=10, headers={
        "host": "web", **protected, "x-private": "1",
        "connection": "keep-alive, " + ", ".join(["x-private", *protected])})
    assert response.status_code == 200
    seen = response.json()["headers"]
    assert {name: seen.get(name) for name in protected} == protected
    assert "x-private" not in seen  # what Connection may name still goes


def test_the_admin_endpoint_cannot_change_trust(mesh: Mesh, native: ProxyStarter, backend: EchoBackend) -> None:
    """The reproduced attack: one `POST /config` added the attacker's CA to the trust anchors,
    after which its own certificate claiming the client's identity passed STRICT. Now the
    admin endpoint is read-only by default, and with changes enabled it still refuses what a
    browser page or DNS rebinding can send."""
    evil_key, evil_ca = self_signed_ca("attacker")
    key, cert = leaf(CLIENT_ID, evil_key, evil_ca)
    anchors = mesh.tmp / "anchors-and-attacker.pem"
    anchors.write_bytes(mesh.anchors.read_bytes() + evil_ca.public_bytes(serialization.Encoding.PEM))

    def attack(proxy: NativeProxy, **headers: str) -> httpx.Response:
        config = proxy_config(proxy)
        config["identity"]["trustAnchorsFile"] = str(anchors)
        return httpx.post(f"http://{proxy.admin}/config", content=json.dumps(config), timeout=10,
                          headers={"content-type": "application/json", **headers})

    def attacker_passes(proxy: NativeProxy) -> bool:
        attempt = mesh_tls_client(mesh, key, [cert], proxy)
        with attempt as tls:
            return not refused(lambda: (tls.sendall(b"GET /echo HTTP/1.1\r\nHost: app\r\n"
                                                    b"Connection: close\r\n\r\n"), read_all(tls))[1])

    default = native("default", {**server_config(mesh, backend.address), "admin": {"address": "127.0.0.1:0",
                                                                                  "enableMutations": False}})
    ready(default)
    assert attack(default).status_code == 403
    assert httpx.put(f"http://{default.admin}/config", content=json.dumps(proxy_config(default)), timeout=10,
                     headers={"content-type": "application/json"}).status_code == 403
    assert httpx.post(f"http://{default.admin}/shutdown", timeout=10).status_code == 403
    assert default.process.poll() is None
    assert not attacker_passes(default)

    enabled = native("enabled", server_config(mesh, backend.address))  # the harness enables changes
    ready(enabled)
    csrf = httpx.post(f"http://{enabled.admin}/config", content=json.dumps(proxy_config(enabled)), timeout=10,
                      headers={"content-type": "text/plain"})
    assert csrf.status_code == 415
    assert attack(enabled, origin="http://evil.example").status_code == 403
    assert attack(enabled, host="evil.example").status_code == 403  # DNS rebinding: the page's own name
    assert httpx.post(f"http://{enabled.admin}/shutdown", headers={"origin": "http://evil.example"},
                      timeout=10).status_code == 403
    assert enabled.process.poll() is None
    assert not attacker_passes(enabled)
    # What the operator sends on the machine itself still works.
    assert attack(enabled).status_code == 200
    assert attacker_passes(enabled)
