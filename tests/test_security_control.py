"""Security regression tests of the control plane (issue 10): each performs an attack the
review reproduced, against a real `pymesh control run` (and a real etcd), with grpcio clients
as both the honest proxy and the attacker, and shows that it now fails."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pymesh._proto.pymesh.mesh.v1 import discovery_pb2, discovery_pb2_grpc, identity_pb2
from pymesh.control.identity.proof import mint_token

from .control_plane import ControlPlane, Etcd, StartControl, write_services
from .security import (
    CONTROL_ID,
    CONTROL_SNI,
    MeshClient,
    Relay,
    Workload,
    cli,
    csr,
    self_signed,
    spiffe,
    token,
)

WEB = spiffe("shop", "web")
EVIL = spiffe("evil", "mallory")
MESHED = "127.0.0.1:18443"


@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir()
    write_services(directory / "web.yaml", [{"name": "web", "authorities": ["web.shop"],
                                             "endpoints": [{"address": MESHED, "identity": WEB}]}])
    return directory


class TlsMesh:
    """A TLS control plane, its state directory and the clients talking to it."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.state_dir = control.log_path.with_suffix(".state")
        self.anchors = (self.state_dir / "trust-anchor.pem").read_bytes()
        self.client = MeshClient(control, self.anchors)

    def workload(self, identity: str) -> Workload:
        namespace, service_account = identity.split("/ns/")[1].split("/sa/")
        return self.client.certify(identity, token(self.state_dir, namespace, service_account))


StartTls = Callable[..., TlsMesh]


@pytest.fixture
def start_tls(start_control: StartControl) -> Iterator[StartTls]:
    meshes: list[TlsMesh] = []

    def start(source: str, *args: str) -> TlsMesh:
        mesh = TlsMesh(start_control(source, *args, plaintext=False))
        meshes.append(mesh)
        return mesh

    yield start
    for mesh in meshes:
        mesh.client.close()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def register(stub: object, service: str, address: str, identity: str = "", weight: int = 0) -> object:
    request = discovery_pb2.RegisterRequest(service=service)
    request.endpoint.address, request.endpoint.identity, request.endpoint.weight = address, identity, weight
    return stub.Register(request, timeout=10)  # type: ignore[attr-defined]


def endpoints_of(stub: object, service: str) -> dict[str, tuple[str, int]]:
    """The first (full) endpoint set a watcher of ``service`` gets: address → (identity, weight)."""
    stream = stub.WatchEndpoints(discovery_pb2.WatchEndpointsRequest(service=service),  # type: ignore[attr-defined]
                                 timeout=10)
    update = next(iter(stream))
    stream.cancel()
    return {e.address: (e.identity, e.weight) for e in update.added}


# -- 1. Register/Deregister -------------------------------------------------------------------


def test_registration_cannot_take_a_services_traffic(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}", "--allow-register")
    web, evil = mesh.workload(WEB), mesh.workload(EVIL)
    anonymous, attacker = mesh.client.discovery(), mesh.client.discovery(evil)

    # The attack of the review: strip the meshed endpoint's identity, add a listener at weight
    # 1000. Without a client certificate nothing is even looked at.
    error = rpc_error(lambda: register(anonymous, "web", MESHED))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    # With the attacker's own mesh certificate: not an endpoint of another identity...
    error = rpc_error(lambda: register(attacker, "web", "127.0.0.1:6666", WEB, weight=1000))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "not the caller's identity" in error.details()
    # ...nor over an endpoint the source defines, under any identity.
    error = rpc_error(lambda: register(attacker, "web", MESHED))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "defined by the source" in error.details()
    error = rpc_error(lambda: attacker.Deregister(discovery_pb2.DeregisterRequest(service="web", address=MESHED),
                                                 timeout=10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # What it may do: register its own identity's endpoint (clients verify that identity)...
    register(attacker, "web", "127.0.0.1:6666", weight=1000)
    # ...which another identity may neither replace nor remove.
    honest = mesh.client.discovery(web)
    error = rpc_error(lambda: register(honest, "web", "127.0.0.1:6666"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and f"registered by {EVIL}" in error.details()
    error = rpc_error(lambda: honest.Deregister(discovery_pb2.DeregisterRequest(service="web",
                                                                                address="127.0.0.1:6666"), timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED

    # The meshed endpoint is as the file says; the registration carries its registrant's identity.
    assert endpoints_of(honest, "web") == {MESHED: (WEB, 0), "127.0.0.1:6666": (EVIL, 1000)}
    attacker.Deregister(discovery_pb2.DeregisterRequest(service="web", address="127.0.0.1:6666"), timeout=10)
    assert endpoints_of(honest, "web") == {MESHED: (WEB, 0)}


def test_registering_from_the_cli_needs_a_certificate(start_tls: StartTls, services_dir: Path,
                                                      tmp_path: Path) -> None:
    mesh = start_tls(f"file:{services_dir}", "--allow-register")
    evil = mesh.workload(EVIL)
    (tmp_path / "evil.pem").write_bytes(evil.chain)
    (tmp_path / "evil.key").write_bytes(evil.key)
    (tmp_path / "anchors.pem").write_bytes(mesh.anchors)
    common = ("--control-plane", mesh.control.address, "--trust-anchors", str(tmp_path / "anchors.pem"))
    assert cli("control", "register", "web", "127.0.0.1:7777", *common, expect=2).returncode == 2  # no --cert
    assert cli("control", "register", "web", "127.0.0.1:7777", "--control-plane", mesh.control.address,
               "--plaintext", expect=1).returncode == 1  # a plaintext client gets nowhere
    cli("control", "register", "web", "127.0.0.1:7777", *common, "--cert", str(tmp_path / "evil.pem"),
        "--key", str(tmp_path / "evil.key"))
    assert endpoints_of(mesh.client.discovery(evil), "web")["127.0.0.1:7777"] == (EVIL, 0)
    cli("control", "deregister", "web", "127.0.0.1:7777", *common, "--cert", str(tmp_path / "evil.pem"),
        "--key", str(tmp_path / "evil.key"))
    assert "127.0.0.1:7777" not in endpoints_of(mesh.client.discovery(evil), "web")


def test_registration_is_off_unless_allowed(start_tls: StartTls, start_control: StartControl,
                                            services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    error = rpc_error(lambda: register(mesh.client.discovery(mesh.workload(EVIL)), "web", "127.0.0.1:6666"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "registration is off" in error.details()

    # In plaintext (development) nobody has an identity: no meshed endpoint can be registered.
    dev = start_control(f"file:{services_dir}")  # --plaintext --allow-register
    error = rpc_error(lambda: register(dev.stub, "web", "127.0.0.1:6666", WEB))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = rpc_error(lambda: register(dev.stub, "web", MESHED))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    off = start_control(f"file:{services_dir}", "--plaintext", plaintext=False)
    error = rpc_error(lambda: register(off.stub, "web", "127.0.0.1:6666"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "registration is off" in error.details()


def test_etcd_deregister_never_deletes_operator_endpoints(start_tls: StartTls, etcd: Etcd) -> None:
    etcd.put("/pymesh/services/web", {"authorities": ["web.shop"]})
    etcd.put(f"/pymesh/endpoints/web/{MESHED}", {"identity": WEB})
    mesh = start_tls(f"etcd:{etcd.endpoint}", "--allow-register")
    attacker = mesh.client.discovery(mesh.workload(EVIL))

    error = rpc_error(lambda: attacker.Deregister(discovery_pb2.DeregisterRequest(service="web", address=MESHED),
                                                  timeout=10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "defined by the source" in error.details()
    error = rpc_error(lambda: register(attacker, "web", MESHED, weight=1000))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert json.loads(etcd.get(f"/pymesh/endpoints/web/{MESHED}")["value"]) == {"identity": WEB}
    # A registration lives under its own prefix, and an operator's key of the same address wins.
    register(attacker, "web", "127.0.0.1:6666")
    assert json.loads(etcd.get("/pymesh/registrations/web/127.0.0.1:6666")["value"])["identity"] == EVIL
    etcd.put("/pymesh/endpoints/web/127.0.0.1:6666", {"identity": WEB})
    honest = mesh.client.discovery(mesh.workload(WEB))
    deadline = time.monotonic() + 10
    while endpoints_of(honest, "web").get("127.0.0.1:6666") != (WEB, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert endpoints_of(honest, "web") == {MESHED: (WEB, 0), "127.0.0.1:6666": (WEB, 0)}


# -- 2. Identity over TLS; tokens that expire, name an audience and are not resent ------------


def test_the_control_plane_serves_tls_with_its_own_certificate(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    host, _, port = mesh.control.address.rpartition(":")
    context = ssl.create_default_context(cadata=mesh.anchors.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=CONTROL_SNI) as tls:
        assert tls.version() == "TLSv1.3" and tls.selected_alpn_protocol() == "h2"
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [CONTROL_ID]
    assert names.get_values_for_type(x509.DNSName) == [CONTROL_SNI, "localhost"]
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # TLS 1.2 is refused.
    old = ssl.create_default_context(cadata=mesh.anchors.decode())
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, int(port)), timeout=10) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname=CONTROL_SNI)
    # A plaintext client gets nothing.
    with grpc.insecure_channel(mesh.control.address) as channel:
        error = rpc_error(lambda: discovery_pb2_grpc.DiscoveryStub(channel).Status(discovery_pb2.StatusRequest(),
                                                                                  timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def served_certificate(mesh: TlsMesh) -> x509.Certificate:
    host, _, port = mesh.control.address.rpartition(":")
    context = ssl.create_default_context(cadata=mesh.anchors.decode())
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=CONTROL_SNI) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_the_server_certificate_is_renewed_in_process(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}", "--cert-lifetime", "5s")
    first = served_certificate(mesh)
    deadline = time.monotonic() + 30
    while (current := served_certificate(mesh)).serial_number == first.serial_number and time.monotonic() < deadline:
        time.sleep(0.2)
    assert current.serial_number != first.serial_number, "not renewed"
    assert current.not_valid_after_utc > first.not_valid_after_utc
    assert mesh.control.process.poll() is None  # the same process: no restart
    mesh.workload(WEB)  # and it still serves


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets' inodes matched in /proc/net/tcp[6])."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for line in [x for t in ("tcp", "tcp6") for x in Path(f"/proc/net/{t}").read_text().splitlines()[1:]]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def test_the_private_grpc_port_gives_no_identity(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    announced = {int(mesh.control.address.rpartition(":")[2]), int(mesh.control.admin.rpartition(":")[2])}
    [private] = listening_ports(mesh.control.process.pid) - announced  # the gRPC server behind the TLS front
    with grpc.insecure_channel(f"127.0.0.1:{private}") as channel:  # a local user skipping TLS
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        error = rpc_error(lambda: next(iter(stub.WatchConfig(discovery_pb2.WatchConfigRequest(), timeout=10))))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "did not come through the control plane's TLS port" in error.details()


def test_a_relay_on_the_path_reads_no_token(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    relay = Relay(mesh.control.address)
    try:
        proof = token(mesh.state_dir, "shop", "web")
        on_path = MeshClient(mesh.control, mesh.anchors, relay.address)
        web = on_path.certify(WEB, proof)
        on_path.certify(WEB, "", current=web)  # the renewal sends no token at all
        on_path.close()
        assert relay.seen and proof.encode() not in relay.seen
        assert proof.split(".")[2].encode() not in relay.seen
    finally:
        relay.close()


def test_renewal_needs_the_current_certificate_of_that_identity(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    web = mesh.workload(WEB)
    renewed = mesh.client.certify(WEB, "", current=web)
    assert renewed.chain != web.chain
    # Another identity's certificate is no proof of this one; a self-made one does not even connect.
    error = rpc_error(lambda: mesh.client.certify(EVIL, "", current=web))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "no token given" in error.details()
    error = rpc_error(lambda: mesh.client.certify(WEB, "", current=self_signed(WEB)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_expire_and_name_an_audience(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    secret = (mesh.state_dir / "token-secret").read_bytes().strip()

    def denied(proof: str) -> str:
        error = rpc_error(lambda: mesh.client.certify(WEB, proof))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        return error.details()

    assert "expired at" in denied(mint_token(secret, WEB, lifetime=60, now=time.time() - 3600))
    assert "its audience is 'elsewhere'" in denied(token(mesh.state_dir, "shop", "web", "--audience", "elsewhere"))
    assert f"it was minted for {EVIL}" in denied(token(mesh.state_dir, "evil", "mallory"))
    # The tokens of earlier versions: an HMAC of the identity alone, valid for ever.
    legacy = "v1." + base64.urlsafe_b64encode(hmac.new(secret, WEB.encode(), hashlib.sha256).digest()).rstrip(
        b"=").decode()
    assert "a v1 token, which never expires, is no longer accepted" in denied(legacy)
    shown = json.loads(cli("control", "token", "-n", "shop", "--service-account", "web", "--state-dir",
                           str(mesh.state_dir), "--lifetime", "10m", "--json").stdout)
    assert shown["audience"] == "pymesh-control" and shown["lifetime_seconds"] == 600
    mesh.client.certify(WEB, shown["token"])
    bad = cli("control", "token", "-n", "shop", "--service-account", "web", "--state-dir", str(mesh.state_dir),
              "--lifetime", "400d", expect=2)
    assert "lifetime" in bad.stderr


# -- 7. Discovery: mutual TLS, and each proxy gets what it needs ------------------------------


def test_discovery_needs_mutual_tls_and_hides_others_policies(start_tls: StartTls, services_dir: Path) -> None:
    (services_dir / "policy.yaml").write_text(yaml.safe_dump({"authorization": {"policies": [
        {"name": "shop-admin", "action": "DENY", "servers": ["spiffe://cluster.local/ns/shop/*"],
         "paths": ["/admin"]},
        {"name": "ops-secret", "action": "DENY", "servers": ["spiffe://cluster.local/ns/ops/*"],
         "paths": ["/internal/secret"]},
        {"name": "everyone", "action": "DENY", "paths": ["/debug"]}]}}))
    (services_dir / "broken.yaml").write_text("services: [")
    mesh = start_tls(f"file:{services_dir}")

    error = rpc_error(lambda: next(iter(mesh.client.discovery().WatchConfig(
        discovery_pb2.WatchConfigRequest(), timeout=10))))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "no client certificate" in error.details()
    error = rpc_error(lambda: next(iter(mesh.client.discovery(self_signed(WEB)).WatchConfig(
        discovery_pb2.WatchConfigRequest(), timeout=10))))
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: not this mesh's certificate

    web = mesh.client.discovery(mesh.workload(WEB))
    stream = web.WatchConfig(discovery_pb2.WatchConfigRequest(identity=discovery_pb2.ProxyIdentity(
        proxy_id="web-1", namespace="ops", service_account="admin")))  # claims to be someone else
    update = next(iter(stream))
    assert [p.name for p in update.config.authorization.policies] == ["shop-admin", "everyone"]
    # Who is connected is for the control plane's own identity only; and it is who the
    # certificate says, whatever the proxy claimed.
    seen = web.Status(discovery_pb2.StatusRequest(), timeout=5)
    assert list(seen.proxies) == [] and seen.source_error == "see the control plane's log"
    operator = mesh.client.discovery(mesh.workload(CONTROL_ID))
    status = operator.Status(discovery_pb2.StatusRequest(), timeout=5)
    assert "broken.yaml" in status.source_error
    [proxy] = status.proxies
    assert (proxy.identity.namespace, proxy.identity.service_account) == ("shop", "web")
    stream.cancel()


def test_check_verifies_tls_and_warns_about_plaintext(start_tls: StartTls, start_control: StartControl,
                                                      services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    report = json.loads(cli("check", "--control-plane", mesh.control.address, "--state-dir", str(mesh.state_dir),
                            "--json").stdout)
    assert report["ok"] is True
    tls = next(c for c in report["checks"] if c["name"] == "control plane uses TLS")
    assert tls["ok"] and not tls["warning"] and CONTROL_ID in tls["detail"]

    dev = start_control(f"file:{services_dir}")  # --plaintext
    result = cli("check", "--control-plane", dev.address, "--json")
    report = json.loads(result.stdout)
    assert report["ok"] is True and result.returncode == 0
    assert next(c for c in report["checks"] if c["name"] == "control plane uses TLS")["warning"] is True
    assert "PLAINTEXT" in dev.logs


# -- 6. Issuance cannot be starved ------------------------------------------------------------


def flood(mesh: TlsMesh, source_ip: str, requests: list[identity_pb2.CertifyRequest]) -> list[str]:
    """Sends ``requests`` at once from another pod (``source_ip``); the refusals' details."""
    relay = Relay(mesh.control.address, source_ip=source_ip)
    try:
        client = MeshClient(mesh.control, mesh.anchors, relay.address)
        calls = [client.identity().Certify.future(r, timeout=60) for r in requests]
        refusals = [e.details() for c in calls if (e := c.exception()) is not None]
        client.close()
        return refusals
    finally:
        relay.close()


def test_issuance_cannot_be_starved(start_tls: StartTls, services_dir: Path) -> None:
    mesh = start_tls(f"file:{services_dir}")
    secret = (mesh.state_dir / "token-secret").read_bytes().strip()
    renewing = mesh.workload(WEB)
    evil = {spiffe("evil", f"sa{i}"): mint_token(secret, spiffe("evil", f"sa{i}")) for i in range(40)}

    def everyone_else_is_served(round_: int) -> None:
        nonlocal renewing
        for i in range(10):  # first certificates of other namespaces
            identity = spiffe(f"team{i}", f"app{round_}")
            mesh.client.certify(identity, mint_token(secret, identity))
        renewing = mesh.client.certify(WEB, "", current=renewing)  # and a renewal

    # The review's attack: tokens for 40 identities, 20 empty CSRs each, from one pod.
    refusals = flood(mesh, "127.0.0.2", [identity_pb2.CertifyRequest(identity=i, token=t) for i, t in evil.items()]
                     * 20)
    assert len(refusals) == 800 and any("too many refused certificate requests from 127.0.0.2" in r
                                        for r in refusals)
    everyone_else_is_served(1)
    # The same with valid CSRs, from another pod: the namespace's budget runs out, not the mesh's.
    requests = [identity_pb2.CertifyRequest(identity=i, token=t, certificate_signing_request=csr(
        ec.generate_private_key(ec.SECP256R1()), i)) for i, t in evil.items()] * 20
    refusals = flood(mesh, "127.0.0.3", requests)
    assert any("too many certificate requests for namespace 'evil'" in r for r in refusals)
    everyone_else_is_served(2)



def test_the_cas_overall_ceiling_keeps_a_reserve_for_renewals(start_tls: StartTls, services_dir: Path,
                                                              tmp_path: Path) -> None:
    # Set from a settings file (`pymesh control run --config`): 8 saved up, one more every 1,000 s,
    # so nothing refills while the test runs. A quarter of the 8 is kept for renewals.
    settings = tmp_path / "control-settings.yaml"
    settings.write_text(yaml.safe_dump({"certRateLimit": 0.001, "certRateBurst": 8}))
    mesh = start_tls(f"file:{services_dir}", "--config", str(settings))
    secret = (mesh.state_dir / "token-secret").read_bytes().strip()
    # Each first certificate is for another namespace and identity: only the overall bucket binds.
    firsts = [spiffe(f"team{i}", "app") for i in range(8)]
    issued = {}
    for identity in firsts[:6]:
        issued[identity] = mesh.client.certify(identity, mint_token(secret, identity))
    for identity in firsts[6:]:
        refusal = rpc_error(lambda i=identity: mesh.client.certify(i, mint_token(secret, i)))
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
        assert refusal.details() == "too many certificate requests to this control plane: at most 0.001/s; " \
                                    "retry later"
    # The reserve: identities already issued still renew, until the bucket is empty.
    first, second, third = list(issued.values())[:3]
    mesh.client.certify(first.identity, "", current=first)
    mesh.client.certify(second.identity, "", current=second)
    refusal = rpc_error(lambda: mesh.client.certify(third.identity, "", current=third))
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
    assert "too many certificate requests to this control plane" in refusal.details()
    text = httpx.get(f"http://{mesh.control.admin}/metrics", timeout=5).text
    assert 'identity_certify_total{result="rate_limited"} 3.0' in text.splitlines(), text


def test_ca_rate_settings_are_checked(tmp_path: Path) -> None:
    from pymesh import ConfigError
    from pymesh.control.settings import load_settings

    path = tmp_path / "control.yaml"
    for text, key, words in [("certRateLimit: 0\n", "certRateLimit", "positive number"),
                             ("certRateLimit: fast\n", "certRateLimit", "positive number"),
                             ("certRateBurst: 2\n", "certRateBurst", "at least 4")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert caught.value.path == key and words in str(caught.value), (text, caught.value)
    path.write_text("certRateLimit: 50\ncertRateBurst: 100\n")
    loaded = load_settings(path)
    assert (loaded.cert_rate_limit, loaded.cert_rate_burst) == (50.0, 100.0)

# -- 10. The CA's files, the limiter's tables ---------------------------------------------------


def test_the_state_directory_is_private_and_never_written_through_a_link(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o777)  # as an operator's `mkdir` under a permissive umask might leave it
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    # Temporary files had predictable names (.<name>.<pid>.tmp) and were opened through links:
    # plant links for the next process ids, where the keys would be written.
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last + 1, last + 400):
        for name in ("trust-anchor.key", "issuer.key", "token-secret"):
            (state / f".{name}.{pid}.tmp").symlink_to(stolen / f"{name}.{pid}")
    cli("control", "token", "-n", "shop", "--service-account", "web", "--state-dir", str(state))
    cli("control", "ca-bundle", "--state-dir", str(state))
    assert state.stat().st_mode & 0o777 == 0o700
    assert list(stolen.iterdir()) == []
    for name in ("trust-anchor.key", "issuer.key", "token-secret"):
        path = state / name
        assert path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    # The lock is never opened through a link either.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / ".lock").symlink_to(stolen / "lock")
    bad = cli("control", "ca-bundle", "--state-dir", str(other), expect=2)
    assert "stateDir: cannot use" in bad.stderr and not (stolen / "lock").exists()


def test_the_trust_anchor_key_can_stay_offline(start_control: StartControl, services_dir: Path,
                                               tmp_path: Path) -> None:
    # An operator's PKI: the anchor and an issuer made once (here by a first control plane's
    # state directory); the anchor's key then goes offline, the issuer alone is supplied.
    made = tmp_path / "made"
    cli("control", "ca-bundle", "--state-dir", str(made))
    proof = token(made, "shop", "web")  # and the token secret
    offline = tmp_path / "offline"
    offline.mkdir()
    (made / "trust-anchor.key").rename(offline / "trust-anchor.key")
    chain = tmp_path / "issuer-chain.pem"
    chain.write_bytes((made / "issuer.pem").read_bytes() + (made / "trust-anchor.pem").read_bytes())
    supplied = ("--issuer-cert-file", str(chain), "--issuer-key-file", str(made / "issuer.key"),
                "--token-secret-file", str(made / "token-secret"))
    shown = json.loads(cli("control", "ca-bundle", *supplied[:4], "--json").stdout)
    assert shown["trust_anchors"] == (made / "trust-anchor.pem").read_text()
    control = start_control(f"file:{services_dir}", *supplied, plaintext=False)
    state = control.log_path.with_suffix(".state")
    assert not list(state.glob("trust-anchor*")), "nothing of the anchor is generated or kept online"
    client = MeshClient(control, (made / "trust-anchor.pem").read_bytes())
    web = client.certify(WEB, proof)
    leaf, issuer, *_ = x509.load_pem_x509_certificates(web.chain)
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(x509.load_pem_x509_certificate((made / "trust-anchor.pem").read_bytes()))
    client.close()
    bad = cli("control", "ca-bundle", "--issuer-cert-file", str(made / "issuer.pem"), "--issuer-key-file",
              str(made / "issuer.key"), expect=2)
    assert "must end with the trust anchor" in bad.stderr


def test_the_limiters_tables_are_bounded() -> None:
    from pymesh.control.identity.limits import RateLimiter

    limiter = RateLimiter(limit=100)
    for i in range(10_000):  # a stream of new identities and peers costs one bucket each, kept bounded
        assert limiter.admit(spiffe(f"ns{i}", "sa"), f"ns{i}") is None or i >= 300
        limiter.refused(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter.identities) == len(limiter.namespaces) == len(limiter.peers) == 100


def test_plaintext_and_registration_from_the_settings_file(start_control: StartControl, services_dir: Path,
                                                           tmp_path: Path) -> None:
    settings = tmp_path / "control.yaml"
    settings.write_text(yaml.safe_dump({"plaintext": True, "allowRegister": True}))
    dev = start_control(f"file:{services_dir}", "--config", str(settings), plaintext=False)
    register(dev.stub, "web", "127.0.0.1:6666")
    assert "PLAINTEXT" in dev.logs
    settings.write_text(yaml.safe_dump({"plaintext": "yes"}))
    bad = cli("control", "run", "--source", f"file:{services_dir}", "--config", str(settings), expect=2)
    assert "plaintext: expected true or false" in bad.stderr
