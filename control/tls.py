"""The control plane's transport security: its own server certificate, the TLS front that
terminates TLS on the control plane's one port, and who a caller is.

The gRPC server (Discovery and Identity) is reached over TLS 1.3 with a certificate issued by
the control plane's own issuer for its identity (``identity``, by default
``spiffe://<trust-domain>/ns/pymesh-system/sa/pymesh-control``), exactly like any workload's:
an EC P-256 key made in this process (never written to disk), the identity as its URI SAN,
plus the DNS SANs ``<sa>.<ns>.serviceaccount.identity.pymesh.<td>`` (the name proxies send as
SNI and check, see :func:`sni_name`) and ``localhost``; serverAuth and clientAuth. It is
renewed in-process at 70% of its lifetime, and whenever the issuer changes; new connections
get the new one, without a restart.

Client certificates are requested but not required (a proxy's first ``Certify`` has only a
token). grpcio's Python API can only require and verify them or not ask at all, so TLS is
terminated here, by :class:`TlsFront` (Python's ``ssl``: OpenSSL, ``CERT_OPTIONAL``, ALPN
``h2``), and each connection is relayed to the gRPC server on a private loopback port; the
front remembers, per relayed connection, the real peer and its certificate. A presented
certificate that does not chain to a trust anchor fails the handshake; :class:`PeerVerifier`
then checks the leaf again with ``cryptography``: valid now, exactly one URI SAN, a workload
SPIFFE id of this trust domain. That id is the caller's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .identity.ca import CertificateAuthority, IssuerError
from .identity.spiffe import SpiffeId, parse_spiffe_id

log = logging.getLogger("pymesh.control.tls")

#: renewed when this share of the certificate's lifetime has passed
RENEW_AT = 0.7
RENEW_CHECK_INTERVAL = 1.0
#: verified client certificates remembered (by their DER digest)
MAX_VERIFIED = 10_000
#: issuers (rotated away) whose leaves are still recognised
MAX_ISSUERS = 8
#: a client has this long to complete its TLS handshake
HANDSHAKE_TIMEOUT = 10.0
RELAY_CHUNK = 64 * 1024


def sni_name(identity: SpiffeId) -> str:
    """The DNS name standing for an identity, as the engine sends it in SNI
    (``core/engine/src/tls.rs``)."""
    return (f"{identity.service_account}.{identity.namespace}.serviceaccount.identity.pymesh."
            f"{identity.trust_domain}").replace("_", "-").lower()


def _pem(ders: tuple[bytes, ...]) -> bytes:
    return b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders)


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _load(context: ssl.SSLContext, key_pem: bytes, chain_pem: bytes, trusted_pem: bytes) -> None:
    """Gives ``context`` (in use: new handshakes take it) a certificate, and adds trust."""
    context.load_verify_locations(cadata=trusted_pem.decode())
    # ssl loads keys from files only: an anonymous memory file, so the key never touches a disk
    fd = os.memfd_create("pymesh-control-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class ServerCertificate:
    """The control plane's own certificate, kept current, as an SSL context for new connections."""

    def __init__(self, ca: CertificateAuthority, identity: SpiffeId) -> None:
        self.ca = ca
        self.identity = identity
        self.dns_names = (sni_name(identity), "localhost")
        self._issuer = None
        self.not_after = datetime.now(UTC)
        self._renew_at = self.not_after
        #: one context for the server's life, its certificate replaced in place (an anchor rotated
        #: away stays in its store, but PeerVerifier judges identities by the current anchors)
        self.context = _server_context()
        self.renew()

    def renew(self) -> None:
        """A new key and certificate from the current issuer. Raises :class:`IssuerError`."""
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.ca.sign_key(key.public_key(), str(self.identity), self.dns_names)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        issuer = self.ca.issuer
        # the anchors, and the issuer's chain so a client need not send it
        trusted = b"".join(a.public_bytes(serialization.Encoding.PEM) for a in issuer.anchors) + _pem(issuer.chain)
        _load(self.context, key_pem, _pem((issued.leaf, *issued.chain)), trusted)
        now = datetime.now(UTC)
        self._issuer = issuer
        self.not_after = issued.not_after
        self._renew_at = now + (issued.not_after - now) * RENEW_AT
        log.info("server certificate for %s (DNS %s), serial %x, valid until %s", self.identity,
                 ", ".join(self.dns_names), issued.serial, issued.not_after.isoformat())

    async def follow(self) -> None:
        """Renews before expiry, and at once when the issuer changed (a rotation), for ever; a
        failure is logged and retried, the current certificate kept meanwhile."""
        failed = ""
        while True:
            await asyncio.sleep(RENEW_CHECK_INTERVAL)
            if datetime.now(UTC) < self._renew_at and self.ca.issuer is self._issuer:
                continue
            try:
                self.renew()
                failed = ""
            except (IssuerError, ssl.SSLError, OSError) as e:
                if str(e) != failed:
                    failed = str(e)
                    log.error("cannot renew the control plane's certificate: %s", e)


@dataclass(frozen=True)
class Connection:
    """A relayed connection: who is really at the other end, and the certificate it presented."""

    peer: str
    certificate: bytes | None


class TlsFront:
    """Terminates TLS on the public address and relays each connection to the gRPC server's
    private loopback address, remembering the connection by the relay's own local address. A
    local process that connects to the private port directly has no such entry, so it has no
    identity; and it cannot take a relayed connection's address while that one is open (the
    address pair is in use), which is forgotten before it closes."""

    def __init__(self, certificate: ServerCertificate) -> None:
        self.certificate = certificate
        #: by the relay's local address as the gRPC server sees it: ``ipv4:127.0.0.1:PORT``
        self.connections: dict[str, Connection] = {}
        self._server: asyncio.Server | None = None
        self._backend = ""
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, address: str, backend: str) -> str:
        """Listens on ``address`` (``IP:port``); returns the bound ``IP:port``."""
        host, _, port = address.rpartition(":")
        self._backend = backend
        try:
            self._server = await asyncio.start_server(self._accept, host.strip("[]"), int(port),
                                                      ssl=self.certificate.context, reuse_address=True,
                                                      ssl_handshake_timeout=HANDSHAKE_TIMEOUT, limit=RELAY_CHUNK)
        except OSError as e:
            raise OSError(f"cannot listen on {address}: {e.strerror}") from None
        bound = self._server.sockets[0].getsockname()[1]
        return f"{host}:{bound}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._server = None

    def of(self, context: grpc.aio.ServicerContext) -> Connection | None:
        """The relayed connection a call came on (None: not through this front)."""
        return self.connections.get(context.peer())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        upstream: asyncio.StreamWriter | None = None
        local = ""
        try:
            tls = writer.get_extra_info("ssl_object")
            host, _, backend_port = self._backend.rpartition(":")
            up_reader, upstream = await asyncio.open_connection(host, int(backend_port), limit=RELAY_CHUNK)
            host, port = upstream.get_extra_info("sockname")[:2]
            local = f"ipv4:{host}:{port}"
            self.connections[local] = Connection(str(peer[0]) if peer else "", tls.getpeercert(binary_form=True))
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except OSError as e:
            log.debug("relaying %s: %s", peer, e)
        except asyncio.CancelledError:
            pass  # stopping: this task is the connection's own, nobody waits for it
        finally:
            self.connections.pop(local, None)  # forgotten before the address can be reused
            for w in (upstream, writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ssl.SSLError):
        with contextlib.suppress(Exception):
            writer.close()


class PeerVerifier:
    """A caller's identity from its client certificate, verified against the trust anchors."""

    def __init__(self, ca: CertificateAuthority | None, trust_domain: str) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        #: set once the TLS front runs (None: plaintext)
        self.front: TlsFront | None = None
        self._verified: OrderedDict[bytes, tuple[SpiffeId, datetime]] = OrderedDict()
        self._issuer = None
        #: the issuers' chains seen in this process: leaves of an issuer rotated away stay valid
        self._chains: OrderedDict[bytes, list[x509.Certificate]] = OrderedDict()

    def identity(self, context: grpc.aio.ServicerContext) -> tuple[SpiffeId | None, str]:
        """(the caller's identity, "") for a valid client certificate, else (None, why not)."""
        if self.ca is None or self.front is None:
            return None, "this control plane runs in plaintext (development only): no caller has an identity"
        connection = self.front.of(context)
        if connection is None:
            return None, "this call did not come through the control plane's TLS port"
        if not connection.certificate:
            return None, "no client certificate: present your mesh certificate (mutual TLS)"
        try:
            leaf = x509.load_der_x509_certificate(connection.certificate)
        except ValueError:
            return None, "the client certificate cannot be parsed"
        issuer = self.ca.issuer
        if issuer is not self._issuer:  # anchors may have changed: judge everything again
            self._verified.clear()
            self._issuer = issuer
            self._chains[b"".join(issuer.chain)] = [x509.load_der_x509_certificate(d) for d in issuer.chain]
            while len(self._chains) > MAX_ISSUERS:
                self._chains.popitem(last=False)
        digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).digest()
        now = datetime.now(UTC)
        known = self._verified.get(digest)
        if known is not None and now < known[1]:
            self._verified.move_to_end(digest)
            return known[0], ""
        intermediates = [c for chain in self._chains.values() for c in chain]
        try:
            verifier = PolicyBuilder().store(Store(list(issuer.anchors))).time(now).build_client_verifier()
            verifier.verify(leaf, intermediates)
        except (VerificationError, ValueError) as e:
            return None, f"the client certificate does not chain to this mesh's trust anchors ({e})"
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            return None, f"the client certificate must carry exactly one URI SAN (a SPIFFE id); it has {len(uris)}"
        try:
            identity = parse_spiffe_id(uris[0])
        except ValueError as e:
            return None, f"the client certificate's identity: {e}"
        if identity.trust_domain != self.trust_domain:
            return None, f"the client certificate's identity {identity} is not in the trust domain {self.trust_domain}"
        if len(self._verified) >= MAX_VERIFIED:
            self._verified.popitem(last=False)
        self._verified[digest] = (identity, leaf.not_valid_after_utc)
        return identity, ""

    def peer(self, context: grpc.aio.ServicerContext) -> str:
        """Who is at the other end (its IP address), through the TLS front or not."""
        connection = self.front.of(context) if self.front is not None else None
        if connection is not None:
            return connection.peer
        kind, _, rest = context.peer().partition(":")
        if kind in ("ipv4", "ipv6"):
            return rest.rpartition(":")[0].strip("[]") or rest
        return context.peer()

    async def require(self, context: grpc.aio.ServicerContext) -> SpiffeId:
        """The caller's identity; aborts the call with UNAUTHENTICATED saying why there is none."""
        identity, why = self.identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        assert identity is not None
        return identity
