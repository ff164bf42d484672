"""The ``pymesh.mesh.v1.Identity`` gRPC service, served next to Discovery on the same server.

A ``Certify`` call is judged in this order, each refusal saying what was wrong: the identity is
a workload SPIFFE id of this control plane's trust domain (INVALID_ARGUMENT, else
PERMISSION_DENIED); the peer has not been refused too often lately (RESOURCE_EXHAUSTED); the
identity is proven (PERMISSION_DENIED; UNAVAILABLE when the TokenReview API is away); the CSR is
acceptable (INVALID_ARGUMENT); the identity, its namespace and the control plane are under
their rate limits (RESOURCE_EXHAUSTED). Proof and CSR come before the rate limits, so nobody
can spend another workload's allowance, nor any with requests that are refused anyway.

The proof is either the token (a first certificate), or, for a renewal, the caller's current
client certificate (mutual TLS) naming the same identity: then no token is needed, nor
looked at, so it is never sent again. Renewals may use a share of the control plane's budget
that first certificates may not.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

import pymesh
from pymesh._proto.pymesh.mesh.v1 import identity_pb2

from ..metrics import ControlMetrics
from ..settings import ControlSettings
from ..sources import Source
from ..tls import PeerVerifier
from .ca import RELOAD_INTERVAL, CertificateAuthority, CSRError, Issuer, IssuerError, check_csr
from .limits import RateLimiter
from .proof import ProofError, ProofUnavailable, Verifier, make_verifier
from .spiffe import check_trust_domain, parse_spiffe_id

log = logging.getLogger("pymesh.control.identity")

SERVICE_NAME = "pymesh.mesh.v1.Identity"


class IdentityService:
    """Exchanges a proof of identity and a CSR for a short-lived leaf certificate."""

    def __init__(self, ca: CertificateAuthority, verifier: Verifier, trust_domain: str, metrics: ControlMetrics,
                 limiter: RateLimiter | None = None, peers: PeerVerifier | None = None) -> None:
        self.ca = ca
        self.verifier = verifier
        self.trust_domain = trust_domain
        self.metrics = metrics
        self.limiter = limiter or RateLimiter()
        #: who calls (in plaintext, nobody has an identity: no renewal by certificate)
        self.peers = peers or PeerVerifier(None, trust_domain)

    def handler(self) -> grpc.GenericRpcHandler:
        pb = identity_pb2
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Certify": grpc.unary_unary_rpc_method_handler(
                self.certify, request_deserializer=pb.CertifyRequest.FromString,
                response_serializer=pb.CertifyResponse.SerializeToString),
        })

    async def follow_issuer(self) -> None:
        """Re-reads changed issuer files every second, for ever, so a rotation (or a bad one) shows
        in the log and the expiry metric at once, not at the next request."""
        while True:
            try:
                self.ca.refresh()
            except Exception:  # a bug; the current issuer keeps signing
                log.exception("checking the issuer files failed")
            await asyncio.sleep(RELOAD_INTERVAL)

    async def certify(self, request: identity_pb2.CertifyRequest,
                      context: grpc.aio.ServicerContext) -> identity_pb2.CertifyResponse:
        peer = self.peers.peer(context)
        try:
            identity = parse_spiffe_id(request.identity)
        except ValueError as e:
            await self._refuse(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT,
                               f"identity: {e}" if request.identity else "identity: required", peer)
        if identity.trust_domain != self.trust_domain:
            await self._refuse(context, "denied", grpc.StatusCode.PERMISSION_DENIED,
                               f"identity: {identity} is in the trust domain {identity.trust_domain!r}; this "
                               f"control plane certifies {self.trust_domain!r} only", peer)
        if (why := self.limiter.admit_peer(peer)) is not None:
            await self._refuse(context, "rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        current = self.peers.identity(context)[0]
        renewal = current == identity
        if not renewal:
            try:
                await self.verifier.verify(identity, request.token)
            except ProofError as e:
                await self._refuse(context, "denied", grpc.StatusCode.PERMISSION_DENIED, str(e), peer)
            except ProofUnavailable as e:
                await self._refuse(context, "error", grpc.StatusCode.UNAVAILABLE, str(e))
        try:
            public_key = check_csr(request.certificate_signing_request, str(identity))
        except CSRError as e:
            await self._refuse(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT,
                               f"certificate_signing_request: {e}", peer)
        if (why := self.limiter.admit(str(identity), identity.namespace, renewal=renewal)) is not None:
            await self._refuse(context, "rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            issued = self.ca.sign_key(public_key, str(identity))
        except IssuerError as e:
            log.error("cannot issue for %s: %s", identity, e)
            await self._refuse(context, "error", grpc.StatusCode.UNAVAILABLE, str(e))
        self.metrics.certify.labels("issued").inc()
        log.info("issued a certificate for %s%s: serial %x, valid until %s", identity,
                 " (a renewal)" if renewal else "", issued.serial, issued.not_after.isoformat())
        response = identity_pb2.CertifyResponse(leaf_certificate=issued.leaf,
                                                intermediate_certificates=list(issued.chain))
        response.valid_until.FromSeconds(int(issued.not_after.timestamp()))
        return response

    async def _refuse(self, context: grpc.aio.ServicerContext, result: str, code: grpc.StatusCode,
                      message: str, peer: str = "") -> None:
        """Answers ``code``; with ``peer``, the refusal counts against that peer's allowance."""
        if peer:
            self.limiter.refused(peer)
        self.metrics.certify.labels(result).inc()
        log.debug("Certify refused (%s): %s", code.name, message)
        await context.abort(code, message)


def identity_service(settings: ControlSettings, source: Source, metrics: ControlMetrics) -> IdentityService:
    """The CA and the proof check from the settings. Raises :class:`pymesh.ConfigError` naming
    the setting at fault (an unreadable file, a key not matching the issuer, an issuer not signed
    by the anchor, an expired issuer)."""
    try:
        trust_domain = check_trust_domain(settings.trust_domain)
    except ValueError as e:
        raise pymesh.ConfigError("trustDomain", str(e)) from None

    def on_issuer(issuer: Issuer) -> None:
        metrics.issuer_expiry.set(issuer.not_after.timestamp())

    ca = CertificateAuthority.from_settings(settings, on_issuer, metrics.issuer_rejected.inc)
    verifier = make_verifier(settings, source)
    log.info("CA for trust domain %s, proofs by %s, leaf lifetime %gs", trust_domain, verifier.kind,
             settings.cert_lifetime)
    limiter = RateLimiter(global_rate=settings.cert_rate_limit, global_burst=settings.cert_rate_burst)
    return IdentityService(ca, verifier, trust_domain, metrics, limiter=limiter,
                           peers=PeerVerifier(ca, trust_domain))
