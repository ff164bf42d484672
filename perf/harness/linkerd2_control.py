"""A stand-in for Linkerd's control plane: just enough for linkerd2-proxy to run as a benchmark
peer in the harness's pods (systems/linkerd2.py), answering for one service, the backend.

linkerd2-proxy has no static configuration: it starts only against gRPC services for identity,
inbound and outbound policy and destination discovery (see /work/shared/linkerd2-proxy.md for
what it needs). This module serves those, over plaintext gRPC on the pod's loopback (a loopback
control-plane address is reached without TLS), one process per pod:

    Identity/Certify                  signs the proxy's CSR with the run's test CA (ECDSA P-256
                                      trust anchor → issuer → leaf for the requested DNS-like name,
                                      both client and server auth), DER leaf + the issuer, valid_until
    InboundServerPolicies/WatchPort   every port: protocol detection, every client allowed, meshed
                                      or not (Linkerd's default policy, `all-unauthenticated`)
    OutboundPolicies/Watch            the service's address: detection, one HTTP route (HTTP/1 and
                                      HTTP/2, so gRPC too) and one opaque route to a P2C balancer
                                      whose endpoints come from Destination/Get; anything else is
                                      forwarded to where it was going, without identity
    Destination/Get                   the service's endpoint with its TLS identity (so the client's
                                      proxy speaks mutual TLS to the server's) and the `h2` protocol
                                      hint (Linkerd's own HTTP/1 → HTTP/2 upgrade between proxies, its
                                      default for meshed endpoints)
    Destination/GetProfile            an empty profile (only called for targets in
                                      LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS, which the harness
                                      leaves unset)

Every stream sends its one answer and stays open until the proxy or this process ends it.

The messages are linkerd2-proxy-api's (the crates.io crate 0.20.0, Apache-2.0). Its protos are
taken from the cargo registry, where `scripts/linkerd2-protos` (run by `scripts/install --test`),
a build of linkerd2-proxy, or `cargo fetch` of anything depending on the crate puts them, or from
PYMESH_LINKERD2_PROTOS; Python stubs are generated at
run time with grpc_tools into the run's scratch directory. Nothing of Linkerd's is in this
repository. The CA helpers (`make_ca`, `identity_files`, `sign_csr`) need only `cryptography`.

Run by the harness as a script, with the path of a JSON config (`serve_config`):

    python3 perf/harness/linkerd2_control.py CONFIG.json     # prints `listening HOST:PORT`
"""

from __future__ import annotations

import datetime as dt
import glob
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROTO_CRATE = "linkerd2-proxy-api-0.20.0"
PROTOS_ENV = "PYMESH_LINKERD2_PROTOS"  # a proto/ directory of that crate, instead of the registry's
PACKAGE = "l5d_api"  # the generated stubs' Python package (in the scratch directory)
MODULES = ("identity", "inbound", "outbound", "destination", "net", "meta", "http_route", "opaque_route")
TRUST_DOMAIN = "cluster.local"
CERT_LIFETIME = dt.timedelta(hours=24)  # linkerd's default; renewal at 70 % is far beyond a run
DETECT_TIMEOUT_S = 10
STOP_GRACE_S = 1.0


def identity_name(service_account: str, namespace: str) -> str:
    """Linkerd's DNS-like identity of a workload: `SA.NS.serviceaccount.identity.linkerd.cluster.local`."""
    return f"{service_account}.{namespace}.serviceaccount.identity.linkerd.{TRUST_DOMAIN}"


# --- the protos and the stubs --------------------------------------------------------------------------------------

def find_protos() -> Path | None:
    """linkerd2-proxy-api 0.20.0's proto/ directory: PYMESH_LINKERD2_PROTOS, else the cargo registry."""
    override = os.environ.get(PROTOS_ENV)
    if override:
        return Path(override) if (Path(override) / "destination.proto").is_file() else None
    cargo_home = Path(os.environ.get("CARGO_HOME") or Path.home() / ".cargo")
    for found in sorted(glob.glob(str(cargo_home / "registry" / "src" / "*" / PROTO_CRATE / "proto"))):
        if (Path(found) / "destination.proto").is_file():
            return Path(found)
    return None


def protos_missing() -> str:
    """What to do when `find_protos()` finds nothing."""
    return (f"the linkerd2-proxy API protos ({PROTO_CRATE} from crates.io) are not in the cargo registry "
            f"(~/.cargo/registry/src/*/{PROTO_CRATE}/proto): run scripts/linkerd2-protos (scripts/install --test "
            "does), or build linkerd2-proxy; or set "
            f"{PROTOS_ENV} to the crate's proto/ directory")


class StubError(Exception):
    """The stubs could not be generated or imported."""


def generate_stubs(protos: Path, out: Path) -> Path:
    """Python stubs for the protos in `out/l5d_api` (generated now, never committed); returns
    `out`, the directory to put on sys.path.

    The protos import each other by bare file name; copied under `l5d_api/` with those imports
    prefixed, the generated modules live in one package instead of taking top-level names such
    as `net_pb2`. identity.proto imports its own copy of timestamp.proto under another path,
    which would define google.protobuf.Timestamp twice: it is pointed at protobuf's own."""
    source = out / "proto" / PACKAGE
    source.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in protos.glob("*.proto"))
    for name in names:
        text = (protos / name).read_text()
        text = re.sub(r'^import "([a-z_]+\.proto)";', rf'import "{PACKAGE}/\1";', text, flags=re.MULTILINE)
        text = text.replace('import "google/protobuf/timestamp/timestamp.proto";',
                            'import "google/protobuf/timestamp.proto";')
        (source / name).write_text(text)
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{out / 'proto'}", f"-I{well_known}",
               f"--python_out={out}", f"--grpc_python_out={out}", *(f"{PACKAGE}/{n}" for n in names)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise StubError(f"grpc_tools.protoc failed on {protos}: {result.stderr.strip()[-1500:]}")
    (out / PACKAGE / "__init__.py").touch()
    return out


@dataclass
class Api:
    """The generated modules, by proto file name (`api.outbound`, `api.outbound_grpc`, …)."""

    modules: dict[str, ModuleType]

    def __getattr__(self, name: str) -> ModuleType:
        try:
            return self.modules[name]
        except KeyError:
            raise AttributeError(name) from None


def load_stubs(stubs: Path) -> Api:
    import importlib

    if str(stubs) not in sys.path:
        sys.path.insert(0, str(stubs))
    modules: dict[str, ModuleType] = {}
    try:
        for name in MODULES:
            modules[name] = importlib.import_module(f"{PACKAGE}.{name}_pb2")
            if name in ("identity", "inbound", "outbound", "destination"):
                modules[f"{name}_grpc"] = importlib.import_module(f"{PACKAGE}.{name}_pb2_grpc")
    except ImportError as e:
        raise StubError(f"the generated stubs in {stubs} do not import: {e}") from e
    return Api(modules)


# --- the test CA ---------------------------------------------------------------------------------------------------

@dataclass
class CA:
    """The trust anchor (its PEM is what proxies trust) and the issuer that signs leaves."""

    anchors_pem: str
    issuer: x509.Certificate
    issuer_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, directory: Path) -> CA:
        key = serialization.load_pem_private_key((directory / "issuer.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls((directory / "trust-anchors.pem").read_text(),
                   x509.load_pem_x509_certificate((directory / "issuer.pem").read_bytes()), key)


def _ca_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
             signer: ec.EllipticCurvePrivateKey, path_length: int | None, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return builder.sign(signer, hashes.SHA256())


def make_ca(directory: Path) -> CA:
    """A fresh trust anchor and issuer (ECDSA P-256, as Linkerd's), written to `directory`:
    trust-anchors.pem (readable by the proxy user), issuer.pem, issuer.key (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    root_key, issuer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(f"root.linkerd.{TRUST_DOMAIN}", root_key, None, root_key, 1, now)
    issuer = _ca_cert(f"identity.linkerd.{TRUST_DOMAIN}", issuer_key, root.subject, root_key, 0, now)
    anchors = root.public_bytes(serialization.Encoding.PEM).decode()
    (directory / "trust-anchors.pem").write_text(anchors)
    (directory / "issuer.pem").write_bytes(issuer.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "issuer.key"
    key_path.write_bytes(issuer_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    key_path.chmod(0o600)
    return CA(anchors, issuer, issuer_key)


def identity_files(directory: Path, name: str) -> None:
    """What a proxy's LINKERD2_PROXY_IDENTITY_DIR holds: `key.p8` (PKCS#8 DER, P-256) and
    `csr.der` (a DER CSR for `name`, its common name and DNS SAN), readable by the proxy user;
    and `token`, the (non-empty) token it presents with its CSR."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hashes.SHA256()))
    (directory / "key.p8").write_bytes(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (directory / "csr.der").write_bytes(csr.public_bytes(serialization.Encoding.DER))
    (directory / "token").write_text(f"bench-token-{name}\n")
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)  # a test key in a run's scratch directory, read by the proxy user


class CertifyError(Exception):
    """A CSR this CA will not sign; the message says why."""


def sign_csr(ca: CA, csr_der: bytes, identity: str,
             lifetime: dt.timedelta = CERT_LIFETIME) -> tuple[bytes, list[bytes], dt.datetime]:
    """The leaf (DER) for a CSR whose names are `identity`, the intermediates (the issuer, DER)
    and the leaf's expiry."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError as e:
        raise CertifyError(f"the CSR is not DER: {e}") from e
    if not csr.is_signature_valid:
        raise CertifyError("the CSR's signature does not verify")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        sans = []
    common = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if identity not in (sans or common):
        raise CertifyError(f"the CSR names {sans or common}, not the identity {identity!r} it asks for")
    now = dt.datetime.now(dt.UTC)
    expiry = now + lifetime
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(ca.issuer.subject).public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(expiry)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.issuer_key.public_key()),
                           critical=False)
            .sign(ca.issuer_key, hashes.SHA256()))
    return (leaf.public_bytes(serialization.Encoding.DER), [ca.issuer.public_bytes(serialization.Encoding.DER)],
            leaf.not_valid_after_utc)


# --- the replies ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Service:
    """One meshed service: the authority the proxies discover it by, its one endpoint and that
    endpoint's identity."""

    authority: str  # `NAME.NS.svc.cluster.local:PORT`, the Destination.Get path
    address: str  # IPv4 host:port of the endpoint (the address the client dials)
    identity: str  # the endpoint's DNS-like identity
    name: str = "bench"
    namespace: str = "bench"
    h2_hint: bool = True

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


def _duration(api: Api, seconds: float) -> Any:
    from google.protobuf import duration_pb2

    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _ip(api: Api, text: str) -> Any:
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return api.net.IPAddress(ipv4=int(ip))
    value = int(ip)
    return api.net.IPAddress(ipv6=api.net.IPv6(first=value >> 64, last=value & ((1 << 64) - 1)))


def tcp_address(api: Api, address: str) -> Any:
    host, _, port = address.rpartition(":")
    return api.net.TcpAddress(ip=_ip(api, host.strip("[]")), port=int(port))


def address_text(api: Api, addr: Any) -> str:
    """`host:port` of a TcpAddress."""
    if addr.ip.WhichOneof("ip") == "ipv6":
        host = f"[{ipaddress.IPv6Address((addr.ip.ipv6.first << 64) | addr.ip.ipv6.last)}]"
    else:
        host = str(ipaddress.IPv4Address(addr.ip.ipv4))
    return f"{host}:{addr.port}"


def inbound_server(api: Api) -> Any:
    """Every inbound port: detect the protocol, allow every client (meshed or not), from anywhere."""
    inbound, meta = api.inbound, api.meta
    everywhere = [inbound.Network(net=api.net.IPNetwork(ip=_ip(api, "0.0.0.0"), prefix_len=0)),
                  inbound.Network(net=api.net.IPNetwork(ip=_ip(api, "::"), prefix_len=0))]
    return inbound.Server(
        protocol=inbound.ProxyProtocol(detect=inbound.ProxyProtocol.Detect(timeout=_duration(api, DETECT_TIMEOUT_S))),
        authorizations=[inbound.Authz(
            networks=everywhere,
            authentication=inbound.Authn(unauthenticated=inbound.Authn.PermitUnauthenticated()),
            labels={"name": "all-unauthenticated"},
            metadata=meta.Metadata(default="all-unauthenticated"))],
        labels={"name": "all-unauthenticated", "kind": "default"},
    )


def _backend(api: Api, service: Service | None, target: str) -> Any:
    """A service's P2C balancer (endpoints from Destination.Get), or a forward to `target`."""
    out, meta = api.outbound, api.meta
    queue = out.Queue(capacity=100, failfast_timeout=_duration(api, 3))
    if service is None:
        return out.Backend(metadata=meta.Metadata(default="forward"), queue=queue,
                           forward=api.destination.WeightedAddr(addr=tcp_address(api, target), weight=1))
    balancer = out.Backend.BalanceP2c(
        discovery=out.Backend.EndpointDiscovery(dst=out.Backend.EndpointDiscovery.DestinationGet(path=service.authority)),
        peak_ewma=out.Backend.BalanceP2c.PeakEwma(default_rtt=_duration(api, 0.03), decay=_duration(api, 10)))
    return out.Backend(metadata=_service_meta(api, service), queue=queue, balancer=balancer)


def _service_meta(api: Api, service: Service) -> Any:
    return api.meta.Metadata(resource=api.meta.Resource(group="core", kind="Service", name=service.name,
                                                        namespace=service.namespace, port=service.port))


def outbound_policy(api: Api, service: Service | None, target: str) -> Any:
    """The policy for traffic to `target`: detection, then an HTTP route (HTTP/1, HTTP/2) or an
    opaque route, each to the one backend."""
    out, meta = api.outbound, api.meta
    backend = _backend(api, service, target)
    route = out.HttpRoute(
        metadata=meta.Metadata(default="http"),
        rules=[out.HttpRoute.Rule(
            matches=[api.http_route.HttpRouteMatch(path=api.http_route.PathMatch(prefix="/"))],
            backends=out.HttpRoute.Distribution(first_available=out.HttpRoute.Distribution.FirstAvailable(
                backends=[out.HttpRoute.RouteBackend(backend=backend)])))],
    )
    opaque = out.OpaqueRoute(
        metadata=meta.Metadata(default="opaq"),
        rules=[out.OpaqueRoute.Rule(backends=out.OpaqueRoute.Distribution(
            first_available=out.OpaqueRoute.Distribution.FirstAvailable(
                backends=[out.OpaqueRoute.RouteBackend(backend=backend)])))],
    )
    detect = out.ProxyProtocol.Detect(timeout=_duration(api, DETECT_TIMEOUT_S),
                                      http1=out.ProxyProtocol.Http1(routes=[route]),
                                      http2=out.ProxyProtocol.Http2(routes=[route]),
                                      opaque=out.ProxyProtocol.Opaque(routes=[opaque]))
    parent = _service_meta(api, service) if service else meta.Metadata(default="forward")
    return out.OutboundPolicy(protocol=out.ProxyProtocol(detect=detect), metadata=parent)


def endpoints(api: Api, service: Service | None) -> Any:
    """Destination.Get's answer: the service's endpoint with its identity and protocol hint, or
    `no_endpoints {exists: false}` for a name this control plane does not know."""
    dst = api.destination
    if service is None:
        return dst.Update(no_endpoints=dst.NoEndpoints(exists=False))
    name = dst.TlsIdentity.DnsLikeIdentity(name=service.identity)
    hint = dst.ProtocolHint(h2=dst.ProtocolHint.H2()) if service.h2_hint else None
    endpoint = dst.WeightedAddr(addr=tcp_address(api, service.address), weight=10000,
                                tls_identity=dst.TlsIdentity(dns_like_identity=name, server_name=name),
                                protocol_hint=hint,
                                metric_labels={"namespace": service.namespace, "service": service.name})
    return dst.Update(add=dst.WeightedAddrSet(addrs=[endpoint], metric_labels={"namespace": service.namespace,
                                                                               "service": service.name}))


# --- the server ----------------------------------------------------------------------------------------------------

def _held(context: Any) -> None:
    """Until the RPC ends (the proxy hangs up, or this server stops)."""
    ended = threading.Event()
    context.add_callback(ended.set)
    while context.is_active() and not ended.wait(1.0):
        pass


def serve(api: Api, ca: CA, services: list[Service], listen: str, log: Any = sys.stdout) -> Any:
    """A started gRPC server (plaintext) with the four services; returns (server, port)."""
    import grpc
    from google.protobuf import timestamp_pb2

    by_address = {s.address: s for s in services}
    by_authority = {s.authority: s for s in services}
    lock = threading.Lock()

    def note(what: str, **fields: Any) -> None:
        with lock:
            log.write(json.dumps({"call": what, **fields}) + "\n")
            log.flush()

    class Identity(api.identity_grpc.IdentityServicer):  # type: ignore[name-defined,misc]
        def Certify(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
            try:
                leaf, chain, expiry = sign_csr(ca, request.certificate_signing_request, request.identity)
            except CertifyError as e:
                note("Certify", identity=request.identity, error=str(e))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            note("Certify", identity=request.identity, valid_until=expiry.isoformat())
            until = timestamp_pb2.Timestamp()
            until.FromDatetime(expiry)
            return api.identity.CertifyResponse(leaf_certificate=leaf, intermediate_certificates=chain,
                                                valid_until=until)

    class Inbound(api.inbound_grpc.InboundServerPoliciesServicer):  # type: ignore[name-defined,misc]
        def GetPort(self, request: Any, context: Any) -> Any:  # noqa: N802
            return inbound_server(api)

        def WatchPort(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
            note("WatchPort", workload=request.workload, port=request.port)
            yield inbound_server(api)
            _held(context)

    class Outbound(api.outbound_grpc.OutboundPoliciesServicer):  # type: ignore[name-defined,misc]
        def _policy(self, request: Any) -> Any:
            if request.WhichOneof("target") == "addr":
                target = address_text(api, request.addr)
                service = by_address.get(target)
            else:
                target = request.authority
                service = by_authority.get(target)
            note("OutboundPolicies", target=target, service=service.authority if service else None)
            return outbound_policy(api, service, target)

        def Get(self, request: Any, context: Any) -> Any:  # noqa: N802
            return self._policy(request)

        def Watch(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
            yield self._policy(request)
            _held(context)

    class Destination(api.destination_grpc.DestinationServicer):  # type: ignore[name-defined,misc]
        def Get(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
            service = by_authority.get(request.path)
            note("Destination.Get", path=request.path, known=service is not None)
            yield endpoints(api, service)
            _held(context)

        def GetProfile(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
            note("Destination.GetProfile", path=request.path)
            yield api.destination.DestinationProfile()
            _held(context)

    # Every open stream holds a worker: a proxy watches a handful (ports, targets, endpoints).
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    api.identity_grpc.add_IdentityServicer_to_server(Identity(), server)
    api.inbound_grpc.add_InboundServerPoliciesServicer_to_server(Inbound(), server)
    api.outbound_grpc.add_OutboundPoliciesServicer_to_server(Outbound(), server)
    api.destination_grpc.add_DestinationServicer_to_server(Destination(), server)
    port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server, port


def serve_config(path: Path) -> None:
    """Serve as `path` (JSON) says: {"stubs": DIR, "ca": DIR, "listen": "127.0.0.1:0",
    "services": [{"authority", "address", "identity", …}]}; print `listening HOST:PORT`, then
    one JSON line per call; stop on SIGTERM or SIGINT."""
    config = json.loads(path.read_text())
    api = load_stubs(Path(config["stubs"]))
    ca = CA.load(Path(config["ca"]))
    services = [Service(**s) for s in config["services"]]
    server, port = serve(api, ca, services, config["listen"])
    host = config["listen"].rpartition(":")[0]
    print(f"listening {host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(STOP_GRACE_S).wait(STOP_GRACE_S + 1)


def write_config(path: Path, *, stubs: Path, ca: Path, listen: str, services: list[Service]) -> None:
    path.write_text(json.dumps({"stubs": str(stubs), "ca": str(ca), "listen": listen,
                                "services": [s.__dict__ for s in services]}, indent=2))


def prepare(scratch: Path) -> Path:
    """Stubs generated into `scratch/stubs` (once per directory); returns that directory."""
    protos = find_protos()
    if protos is None:
        raise StubError(protos_missing())
    stubs = scratch / "stubs"
    if not (stubs / PACKAGE / "destination_pb2_grpc.py").exists():
        shutil.rmtree(stubs, ignore_errors=True)
        generate_stubs(protos, stubs)
    return stubs


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} CONFIG.json")
    serve_config(Path(sys.argv[1]))
