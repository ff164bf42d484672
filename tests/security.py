"""What the security tests share: a mesh client of a TLS control plane made only of grpcio and
cryptography (the honest proxy and the attacker alike), tokens from `pymesh control token`,
and a TCP relay that records what crosses it (an attacker on the path) and can come from
another loopback address (another pod)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pymesh._proto.pymesh.mesh.v1 import discovery_pb2_grpc, identity_pb2, identity_pb2_grpc

from .control_plane import ControlPlane

PYMESH = [sys.executable, "-c", "from pymesh.cli import main; main()"]
TD = "cluster.local"
CONTROL_ID = f"spiffe://{TD}/ns/pymesh-system/sa/pymesh-control"
#: the name a proxy sends as SNI and checks in the control plane's certificate
CONTROL_SNI = "pymesh-control.pymesh-system.serviceaccount.identity.pymesh.cluster.local"


def spiffe(namespace: str, service_account: str) -> str:
    return f"spiffe://{TD}/ns/{namespace}/sa/{service_account}"


def cli(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PYMESH, *args], capture_output=True, text=True, timeout=60)
    assert expect is None or result.returncode == expect, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    return result


def token(state_dir: Path, namespace: str, service_account: str, *args: str) -> str:
    return cli("control", "token", "-n", namespace, "--service-account", service_account,
               "--state-dir", str(state_dir), *args).stdout.strip()


def csr(key: ec.EllipticCurvePrivateKey, identity: str) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_chain(*ders: bytes) -> bytes:
    return b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders)


@dataclass
class Workload:
    """A mesh identity's key and certificate chain (PEM), as a proxy holds them."""

    identity: str
    key: bytes
    chain: bytes


class MeshClient:
    """Talks to a TLS control plane as a proxy does: verifies its certificate against the
    trust anchors and its SNI name, and presents a workload certificate once it has one."""

    def __init__(self, control: ControlPlane, anchors: bytes, address: str = "") -> None:
        self.control = control
        self.anchors = anchors
        self.address = address or control.address
        self._channels: list[grpc.Channel] = []

    def channel(self, workload: Workload | None = None) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.anchors, private_key=workload.key if workload else None,
            certificate_chain=workload.chain if workload else None)
        channel = grpc.secure_channel(self.address, credentials,
                                      options=[("grpc.ssl_target_name_override", CONTROL_SNI)])
        self._channels.append(channel)
        return channel

    def discovery(self, workload: Workload | None = None) -> discovery_pb2_grpc.DiscoveryStub:
        return discovery_pb2_grpc.DiscoveryStub(self.channel(workload))

    def identity(self, workload: Workload | None = None) -> identity_pb2_grpc.IdentityStub:
        return identity_pb2_grpc.IdentityStub(self.channel(workload))

    def certify(self, identity: str, proof: str, current: Workload | None = None,
                key: ec.EllipticCurvePrivateKey | None = None) -> Workload:
        """A certificate for ``identity``: with a token, or (renewal) over the current one."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        response = self.identity(current).Certify(identity_pb2.CertifyRequest(
            identity=identity, token=proof, certificate_signing_request=csr(key, identity)), timeout=10)
        return Workload(identity, pem_key(key), pem_chain(response.leaf_certificate,
                                                          *response.intermediate_certificates))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


def self_signed(identity: str) -> Workload:
    """What an attacker can make alone: a CA of its own and a leaf claiming ``identity``."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return Workload(identity, pem_key(key), b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca)))


class Relay:
    """A TCP relay to ``target`` that keeps every byte it forwards; its upstream connections
    come from ``source_ip`` (another loopback address: another pod, to the control plane)."""

    def __init__(self, target: str, source_ip: str = "127.0.0.1") -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.source_ip = source_ip
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target, timeout=10, source_address=(self.source_ip, 0))
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._copy, args=(a, b), daemon=True).start()

    def _copy(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                with self._lock:
                    self.seen += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self._sockets:
            s.close()
