"""The mesh's CA: `pymesh.mesh.v1.Identity` served by `pymesh control run` (a real subprocess),
asked with real CSRs made with cryptography; chains checked with cryptography and by a real
mutual-TLS handshake (OpenSSL); Kubernetes ServiceAccount tokens from a real kube-apiserver,
checked with its TokenReview API. No mocks."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pymesh._proto.pymesh.mesh.v1 import identity_pb2, identity_pb2_grpc

from .console import plain_env
from .control_plane import ControlPlane, KubeApiServer, wait_for

WEB = "spiffe://cluster.local/ns/default/sa/web"
DB = "spiffe://cluster.local/ns/default/sa/db"
PYMESH = [sys.executable, "-c", "from pymesh.cli import main; main()"]

StartControl = Callable[..., ControlPlane]
Key = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


# -- helpers --------------------------------------------------------------------------------


def cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PYMESH, *args], capture_output=True, text=True, timeout=60, env=plain_env())
    assert result.returncode == expect, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    return result


def token(state_dir: Path, namespace: str = "default", service_account: str = "web", *args: str) -> str:
    return cli("control", "token", "--namespace", namespace, "--service-account", service_account,
               "--state-dir", str(state_dir), *args).stdout.strip()


def make_csr(key: Key, *names: x509.GeneralName) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def uri(identity: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(identity)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def certify(control: ControlPlane, identity: str, proof: str, csr: bytes) -> identity_pb2.CertifyResponse:
    stub = identity_pb2_grpc.IdentityStub(control.channel)
    return stub.Certify(identity_pb2.CertifyRequest(identity=identity, token=proof,
                                                    certificate_signing_request=csr), timeout=10)


def refused(control: ControlPlane, identity: str, proof: str, csr: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        certify(control, identity, proof, csr)
    return caught.value


def chain_of(response: identity_pb2.CertifyResponse) -> tuple[x509.Certificate, list[x509.Certificate]]:
    return (x509.load_der_x509_certificate(response.leaf_certificate),
            [x509.load_der_x509_certificate(c) for c in response.intermediate_certificates])


def metric(control: ControlPlane, sample: str) -> float:
    text = httpx.get(f"http://{control.admin}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in /metrics:\n{text}"
    return float(match.group(1))


def ca_certificate(name: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
                   parent: x509.Certificate | None = None, *, path_length: int | None = 0,
                   not_after: datetime | None = None) -> x509.Certificate:
    """A CA certificate, as an operator's own PKI would make one."""
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(parent.subject if parent is not None else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=2))
            .not_valid_after(not_after or now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def pem_key(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def rotate(issuer_cert: Path, issuer_key: Path, certificate: x509.Certificate, key: Key) -> None:
    """As an operator would: the key first, then the certificate."""
    replace_file(issuer_key, pem_key(key))
    replace_file(issuer_cert, pem(certificate))


def issued_by(control: ControlPlane, proof: str, issuer: x509.Certificate, timeout: float = 5.0) -> bool:
    """Asks (every half second, within the rate limit) until certificates come from ``issuer``."""
    def check() -> bool:
        leaf, chain = chain_of(certify(control, WEB, proof, make_csr(p256(), uri(WEB))))
        return chain[0] == issuer and _verifies(leaf, issuer)
    return bool(wait_for(check, timeout=timeout, interval=0.5))


def _verifies(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except Exception:
        return False
    return True


def mutual_tls(tmp_path: Path, anchors: bytes, server: tuple[identity_pb2.CertifyResponse, Key],
               client: tuple[identity_pb2.CertifyResponse, Key]) -> tuple[bytes, bytes]:
    """A TLS 1.3 handshake (OpenSSL) between two certified workloads, each trusting only the
    anchors; returns the leaf each side saw of the other."""
    def context(side: str, response: identity_pb2.CertifyResponse, key: Key) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=anchors.decode())
        chain = tmp_path / f"{side}-chain.pem"
        chain.write_bytes(b"".join(pem(x509.load_der_x509_certificate(der)) for der in
                                   [response.leaf_certificate, *response.intermediate_certificates]))
        key_file = tmp_path / f"{side}.key"
        key_file.write_bytes(pem_key(key))
        ctx.load_cert_chain(chain, key_file)
        return ctx

    server_ctx, client_ctx = context("server", *server), context("client", *client)
    a, b = socket.socketpair()
    seen: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                seen["server"] = tls.getpeercert(binary_form=True) or b""
                tls.sendall(b"ok")
        except BaseException as e:  # reported by the test
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(b) as tls:
        seen["client"] = tls.getpeercert(binary_form=True) or b""
        assert tls.recv(2) == b"ok"
    thread.join(timeout=10)
    assert not errors, errors
    return seen["client"], seen["server"]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def start_control(tmp_path: Path) -> Iterator[StartControl]:
    """Starts `pymesh control run` (file source, an empty directory) with extra flags."""
    services = tmp_path / "services"
    services.mkdir()
    started: list[ControlPlane] = []

    def start(*args: str, source: str | None = None) -> ControlPlane:
        control = ControlPlane(source or f"file:{services}", tmp_path / f"control{len(started)}.log", *args)
        started.append(control)
        control.wait_ready(timeout=30)
        return control

    yield start
    for control in started:
        control.stop()


# -- issuing --------------------------------------------------------------------------------


def test_a_token_gets_a_certificate_that_chains_to_the_anchor(start_control: StartControl, state_dir: Path,
                                                              tmp_path: Path) -> None:
    control = start_control("--state-dir", str(state_dir), "--cert-lifetime", "60s")
    proof = token(state_dir)
    assert re.fullmatch(r"v2\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}", proof), proof
    key = p256()
    asked_at = datetime.now(UTC)
    response = certify(control, WEB, proof, make_csr(key, uri(WEB)))
    leaf, chain = chain_of(response)

    # The chain: leaf ← issuer ← the anchor `ca-bundle` prints (the state directory's).
    bundle = cli("control", "ca-bundle", "--state-dir", str(state_dir)).stdout.encode()
    assert bundle == (state_dir / "trust-anchor.pem").read_bytes()
    [anchor] = x509.load_pem_x509_certificates(bundle)
    assert len(chain) == 1, "one issuer, and never the anchor"
    issuer = chain[0]
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(anchor)
    anchor.verify_directly_issued_by(anchor)
    assert anchor.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    issuer_constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert issuer_constraints.ca and issuer_constraints.path_length == 0
    assert isinstance(anchor.public_key(), ec.EllipticCurvePublicKey)
    assert anchor.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]

    # The leaf: an empty subject, so the one URI SAN is critical (RFC 5280); a TLS client and server.
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [uri(WEB)]
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
            == issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest)
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.public_key() == key.public_key()

    # The lifetime asked for (60 s), valid from a minute ago for clocks behind ours.
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(seconds=120)
    assert abs(leaf.not_valid_after_utc - (asked_at + timedelta(seconds=60))) < timedelta(seconds=5)
    assert response.valid_until.seconds == int(leaf.not_valid_after_utc.timestamp())

    # Ed25519 keys too; and OpenSSL accepts the two for mutual TLS, each seeing the other's leaf.
    db_key = ed25519.Ed25519PrivateKey.generate()
    db = certify(control, DB, token(state_dir, "default", "db"), make_csr(db_key, uri(DB)))
    seen_by_client, seen_by_server = mutual_tls(tmp_path, bundle, (response, key), (db, db_key))
    assert seen_by_client == response.leaf_certificate and seen_by_server == db.leaf_certificate

    # Private files are private; metrics and one log line per issuance.
    for name in ("trust-anchor.key", "issuer.key", "token-secret"):
        assert (state_dir / name).stat().st_mode & 0o777 == 0o600, name
    assert metric(control, 'identity_certify_total{result="issued"}') == 2
    assert metric(control, "identity_issuer_expiry_timestamp_seconds") == issuer.not_valid_after_utc.timestamp()
    assert f"issued a certificate for {WEB}: serial {leaf.serial_number:x}, valid until" in control.logs


def test_refusals_say_what_was_wrong(start_control: StartControl, state_dir: Path) -> None:
    control = start_control("--state-dir", str(state_dir))
    web_token, csr = token(state_dir), make_csr(p256(), uri(WEB))

    def denied(identity: str, proof: str, message: str) -> None:
        error = refused(control, identity, proof, csr)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        assert message in error.details(), error.details()

    tokens = {WEB: web_token, DB: token(state_dir, "default", "db")}

    def invalid(identity: str, request: bytes, message: str) -> None:
        error = refused(control, identity, tokens[identity], request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert message in error.details(), error.details()

    # Proofs.
    denied(WEB, tokens[DB], f"the token does not prove identity {WEB}")
    denied(WEB, "v1.AAAA", f"the token does not prove identity {WEB}")
    denied(WEB, "nope", "not a pymesh token")
    denied(WEB, "", "no token given")
    other = "spiffe://example.org/ns/default/sa/web"
    denied(other, token(state_dir, "default", "web", "--trust-domain", "example.org"),
           "is in the trust domain 'example.org'; this control plane certifies 'cluster.local' only")
    # Identities.
    for bad in ("spiffe://cluster.local/web", "https://cluster.local/ns/default/sa/web",
                "spiffe://cluster.local/ns/default/sa/web/x", "spiffe://Cluster.local/ns/default/sa/web"):
        error = refused(control, bad, web_token, csr)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("identity: "), bad
    # Requests.
    invalid(WEB, make_csr(p256(), uri(DB)), f"its subjectAltName URI '{DB}' is not the identity asked for, {WEB}")
    invalid(WEB, make_csr(p256(), uri(WEB), x509.DNSName("web.local")),
            f"its subjectAltName must be exactly one URI, {WEB}; it has URI:{WEB}, DNS:web.local")
    invalid(WEB, make_csr(p256()), f"it has no subjectAltName; it needs exactly one, the URI {WEB}")
    invalid(WEB, b"not a csr", "certificate_signing_request: not a DER PKCS#10 certificate signing request")
    invalid(WEB, b"", "certificate_signing_request: required")
    tampered = bytearray(make_csr(p256(), uri(WEB)))
    tampered[-1] ^= 1
    invalid(WEB, bytes(tampered), "its signature does not verify with its own public key")
    invalid(DB, make_csr(rsa.generate_private_key(65537, 1024), uri(DB)), "an RSA key of 1024 bits")
    invalid(DB, make_csr(ec.generate_private_key(ec.SECP384R1()), uri(DB)),
            "an EC key on secp384r1; use EC P-256 (secp256r1) or Ed25519")

    assert metric(control, 'identity_certify_total{result="denied"}') == 5
    assert metric(control, 'identity_certify_total{result="invalid"}') == 12
    assert metric(control, 'identity_certify_total{result="issued"}') == 0


def test_rate_limit_per_identity(start_control: StartControl, state_dir: Path) -> None:
    control = start_control("--state-dir", str(state_dir))
    proof, csr = token(state_dir), make_csr(p256(), uri(WEB))
    stub = identity_pb2_grpc.IdentityStub(control.channel)
    request = identity_pb2.CertifyRequest(identity=WEB, token=proof, certificate_signing_request=csr)
    started = time.monotonic()
    calls = [stub.Certify.future(request, timeout=10) for _ in range(60)]
    issued, limited = 0, []
    for call in calls:
        try:
            call.result()
            issued += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            limited.append(e.details())
    elapsed = time.monotonic() - started
    # A burst of 20, then 10 a second.
    assert 20 <= issued <= 20 + 10 * elapsed + 1, (issued, elapsed)
    assert limited and limited[0] == f"too many certificate requests for {WEB}: at most 10/s (bursts of 20); " \
                                     "retry later"
    assert metric(control, 'identity_certify_total{result="rate_limited"}') == len(limited)
    # Another workload is not held back by this one.
    certify(control, DB, token(state_dir, "default", "db"), make_csr(p256(), uri(DB)))


# -- the CA's files ---------------------------------------------------------------------------


def test_the_generated_ca_is_reused_across_restarts(start_control: StartControl, state_dir: Path) -> None:
    control = start_control("--state-dir", str(state_dir))
    proof = token(state_dir)
    _, [first_issuer] = chain_of(certify(control, WEB, proof, make_csr(p256(), uri(WEB))))
    files = {p.name: p.read_bytes() for p in state_dir.iterdir() if not p.name.startswith(".")}
    assert sorted(files) == ["issuer.key", "issuer.pem", "token-secret", "trust-anchor.key", "trust-anchor.pem"]
    control.stop()

    again = start_control("--state-dir", str(state_dir))
    assert {p.name: p.read_bytes() for p in state_dir.iterdir() if not p.name.startswith(".")} == files
    leaf, [issuer] = chain_of(certify(again, WEB, proof, make_csr(p256(), uri(WEB))))  # the same token works
    assert issuer == first_issuer
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(x509.load_pem_x509_certificate(files["trust-anchor.pem"]))


def test_an_issuer_rotated_on_disk_is_picked_up(start_control: StartControl, state_dir: Path) -> None:
    control = start_control("--state-dir", str(state_dir))
    proof = token(state_dir)
    _, [first] = chain_of(certify(control, WEB, proof, make_csr(p256(), uri(WEB))))
    anchor = x509.load_pem_x509_certificate((state_dir / "trust-anchor.pem").read_bytes())
    anchor_key = serialization.load_pem_private_key((state_dir / "trust-anchor.key").read_bytes(), None)
    assert isinstance(anchor_key, ec.EllipticCurvePrivateKey)
    issuer_cert, issuer_key = state_dir / "issuer.pem", state_dir / "issuer.key"

    key = p256()
    second = ca_certificate("second issuer", key, anchor_key, anchor)
    rotate(issuer_cert, issuer_key, second, key)
    assert issued_by(control, proof, second), control.logs
    assert second != first
    assert metric(control, "identity_issuer_expiry_timestamp_seconds") == second.not_valid_after_utc.timestamp()

    # A certificate whose key is not there (yet): logged once, and the current issuer keeps signing.
    key = p256()
    third = ca_certificate("third issuer", key, anchor_key, anchor)
    replace_file(issuer_cert, pem(third))
    assert wait_for(lambda: "keeping the current issuer" in control.logs, timeout=5), control.logs
    assert f"{issuer_key} does not match the issuer certificate {issuer_cert}" in control.logs
    # Checked again (every second) and still refused, but logged once only.
    rejected = "identity_issuer_reload_rejected_total"
    assert wait_for(lambda: metric(control, rejected) >= 2, timeout=30), control.logs
    _, [still] = chain_of(certify(control, WEB, proof, make_csr(p256(), uri(WEB))))
    assert still == second
    assert control.logs.count("keeping the current issuer") == 1, control.logs
    replace_file(issuer_key, pem_key(key))  # the key arrives: the rotation completes
    assert issued_by(control, proof, third), control.logs


def test_supplied_ca_files_and_a_trust_anchor_rotation(start_control: StartControl, state_dir: Path,
                                                      tmp_path: Path) -> None:
    old_anchor_key, old_issuer_key = p256(), p256()
    old_anchor = ca_certificate("old anchor", old_anchor_key, old_anchor_key, path_length=None)
    old_issuer = ca_certificate("old issuer", old_issuer_key, old_anchor_key, old_anchor)
    anchors, issuer_cert, issuer_key = tmp_path / "anchors.pem", tmp_path / "issuer.pem", tmp_path / "issuer.key"
    anchors.write_bytes(pem(old_anchor))
    rotate(issuer_cert, issuer_key, old_issuer, old_issuer_key)

    control = start_control("--state-dir", str(state_dir), "--trust-anchor-file", str(anchors),
                            "--issuer-cert-file", str(issuer_cert), "--issuer-key-file", str(issuer_key))
    proof = token(state_dir)
    leaf, [issuer] = chain_of(certify(control, WEB, proof, make_csr(p256(), uri(WEB))))
    assert issuer == old_issuer
    leaf.verify_directly_issued_by(old_issuer)
    assert not (state_dir / "trust-anchor.pem").exists(), "nothing is generated when the CA is supplied"
    assert cli("control", "ca-bundle", "--trust-anchor-file", str(anchors)).stdout.encode() == pem(old_anchor)

    # Rotating the trust anchor: proxies get the bundle of old + new, then the issuer moves to the new one.
    new_anchor_key, new_issuer_key = p256(), p256()
    new_anchor = ca_certificate("new anchor", new_anchor_key, new_anchor_key, path_length=None)
    new_issuer = ca_certificate("new issuer", new_issuer_key, new_anchor_key, new_anchor)
    replace_file(anchors, pem(old_anchor) + pem(new_anchor))
    rotate(issuer_cert, issuer_key, new_issuer, new_issuer_key)
    assert issued_by(control, proof, new_issuer), control.logs
    new_issuer.verify_directly_issued_by(new_anchor)
    bundle = json.loads(cli("control", "ca-bundle", "--trust-anchor-file", str(anchors), "--json").stdout)
    assert bundle == {"file": str(anchors), "trust_anchors": (pem(old_anchor) + pem(new_anchor)).decode()}


def test_bad_ca_settings_are_refused_at_startup(tmp_path: Path) -> None:
    services = tmp_path / "services"
    services.mkdir()
    anchor_key, issuer_key, stranger_key = p256(), p256(), p256()
    anchor = ca_certificate("anchor", anchor_key, anchor_key, path_length=None)
    files = {
        "anchor.pem": pem(anchor),
        "issuer.pem": pem(ca_certificate("issuer", issuer_key, anchor_key, anchor)),
        "issuer.key": pem_key(issuer_key),
        "stranger.pem": pem(ca_certificate("stranger", issuer_key, stranger_key,
                                           ca_certificate("stranger anchor", stranger_key, stranger_key))),
        "expired.pem": pem(ca_certificate("expired", issuer_key, anchor_key, anchor,
                                          not_after=datetime.now(UTC) - timedelta(hours=1))),
        "other.key": pem_key(p256()),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    def run(*args: str) -> str:
        result = subprocess.run([*PYMESH, "control", "run", "--source", f"file:{services}", "--listen", "127.0.0.1:0",
                                 "--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"), *args],
                                capture_output=True, text=True, timeout=60, env=plain_env())
        assert result.returncode == 2, result.stdout + result.stderr
        return result.stderr

    def supplied(anchor_file: str = "anchor.pem", cert: str = "issuer.pem", key: str = "issuer.key") -> list[str]:
        return ["--trust-anchor-file", str(tmp_path / anchor_file), "--issuer-cert-file", str(tmp_path / cert),
                "--issuer-key-file", str(tmp_path / key)]

    assert f"issuerKeyFile: {tmp_path / 'other.key'} does not match the issuer certificate" in run(
        *supplied(key="other.key"))
    assert "issuerCertFile:" in (message := run(*supplied(cert="stranger.pem"))) and \
        "is not signed by a trust anchor in" in message, message
    assert "issuerCertFile:" in (message := run(*supplied(cert="expired.pem"))) and "expired at" in message, message
    assert f"trustAnchorFile: cannot read {tmp_path / 'missing.pem'}: No such file or directory" in run(
        *supplied(anchor_file="missing.pem"))
    assert "issuerCertFile: required with trustAnchorFile" in run("--trust-anchor-file", str(tmp_path / "anchor.pem"))
    assert "without trustAnchorFile, the file must end with the trust anchor" in run(
        "--issuer-cert-file", str(tmp_path / "issuer.pem"), "--issuer-key-file", str(tmp_path / "issuer.key"))
    assert "trustDomain: 'Mesh.Example' is not a trust domain" in run("--trust-domain", "Mesh.Example")
    assert "certLifetime: '1 day' is not a duration" in run("--cert-lifetime", "1 day")


def test_the_token_command(start_control: StartControl, state_dir: Path, tmp_path: Path) -> None:
    web = token(state_dir)
    assert re.fullmatch(r"v2\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}", web)
    assert (state_dir / "token-secret").stat().st_mode & 0o777 == 0o600
    assert token(state_dir, "default", "db") != web
    assert token(state_dir, "other", "web") != web
    assert token(state_dir, "default", "web", "--trust-domain", "example.org") != web
    shown = cli("control", "token", "-n", "default", "--service-account", "web", "--state-dir", str(state_dir),
                "--json").stdout
    assert '"identity": "spiffe://cluster.local/ns/default/sa/web"' in shown and '"token": "v2.' in shown
    bad = cli("control", "token", "-n", "a/b", "--service-account", "web", "--state-dir", str(state_dir), expect=2)
    assert "is not a workload identity" in bad.stderr

    # A secret supplied by the operator: tokens minted with it are what the control plane accepts.
    secret = tmp_path / "secret"
    secret.write_text("short\n")
    bad = cli("control", "token", "-n", "default", "--service-account", "web", "--token-secret-file", str(secret),
              expect=2)
    assert f"tokenSecretFile: {secret}: the token secret is 5 bytes; at least 16 are needed" in bad.stderr
    secret.write_text("an operator's secret of some length\n")
    supplied = token(state_dir, "default", "web", "--token-secret-file", str(secret))
    assert supplied != web
    control = start_control("--state-dir", str(state_dir), "--token-secret-file", str(secret))
    certify(control, WEB, supplied, make_csr(p256(), uri(WEB)))
    assert refused(control, WEB, web, make_csr(p256(), uri(WEB))).code() == grpc.StatusCode.PERMISSION_DENIED


# -- Kubernetes: ServiceAccount tokens, checked with TokenReview --------------------------------


def service_account_token(kube: KubeApiServer, namespace: str, name: str) -> str:
    """A ServiceAccount and a token for it (the TokenRequest API, as the kubelet asks for pods)."""
    created = kube.client.post(f"/api/v1/namespaces/{namespace}/serviceaccounts",
                               json={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    assert created.status_code in (201, 409), created.text
    response = kube.client.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                                json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                      "spec": {"expirationSeconds": 3600, "audiences": ["pymesh-control"]}})
    assert response.status_code == 201, response.text
    return response.json()["status"]["token"]


def test_kubernetes_service_account_tokens(kube: KubeApiServer, start_control: StartControl,
                                           state_dir: Path) -> None:
    web, other = service_account_token(kube, "default", "web"), service_account_token(kube, "default", "other")
    control = start_control("--state-dir", str(state_dir), source=f"kubernetes:{kube.kubeconfig}")

    key = p256()
    leaf, [issuer] = chain_of(certify(control, WEB, web, make_csr(key, uri(WEB))))
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(x509.load_pem_x509_certificate((state_dir / "trust-anchor.pem").read_bytes()))
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [uri(WEB)]

    csr = make_csr(p256(), uri(WEB))
    error = refused(control, WEB, other, csr)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == (f"the token does not prove identity {WEB}: it authenticates "
                               "system:serviceaccount:default:other, not system:serviceaccount:default:web")
    error = refused(control, WEB, "not-a-kubernetes-token", csr)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the Kubernetes API did not authenticate it" in error.details(), error.details()
    # Per-workload tokens are not a proof where Kubernetes is the source of truth.
    error = refused(control, WEB, token(state_dir), csr)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert metric(control, 'identity_certify_total{result="denied"}') == 3
