"""Talking to a control plane as a mesh client does (``pymesh check``, ``pymesh control
register``): over TLS, verifying the server's certificate against the trust anchors and the
control plane's identity (its SNI name, see :func:`pymesh.control.tls.sni_name`), with a
client certificate of the mesh; or in plaintext, to a development control plane.

A client certificate comes from files, or is obtained here: a fresh key and a CSR exchanged
with the control plane's CA for a token (as a proxy's first certificate is).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pymesh._proto.pymesh.mesh.v1 import identity_pb2, identity_pb2_grpc

from .identity.spiffe import parse_spiffe_id
from .tls import sni_name


@dataclass(frozen=True)
class ClientCredentials:
    """What a TLS client of the control plane needs (PEM); no certificate: only ``Certify``."""

    trust_anchors: bytes
    server_identity: str
    key: bytes = b""
    chain: bytes = b""


def open_channel(address: str, credentials: ClientCredentials | None) -> grpc.Channel:
    """A channel to ``address``: TLS with ``credentials``, plaintext without."""
    if credentials is None:
        return grpc.insecure_channel(address)
    tls = grpc.ssl_channel_credentials(root_certificates=credentials.trust_anchors,
                                       private_key=credentials.key or None,
                                       certificate_chain=credentials.chain or None)
    name = sni_name(parse_spiffe_id(credentials.server_identity))
    return grpc.secure_channel(address, tls, options=[("grpc.ssl_target_name_override", name)])


def obtain_certificate(address: str, credentials: ClientCredentials, identity: str, token: str,
                       timeout: float = 10) -> ClientCredentials:
    """``credentials`` with a fresh key and a certificate for ``identity`` from the CA at
    ``address``, proven by ``token``. Raises grpc.RpcError."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
           .sign(key, hashes.SHA256()))
    with open_channel(address, credentials) as channel:
        response = identity_pb2_grpc.IdentityStub(channel).Certify(identity_pb2.CertifyRequest(
            identity=identity, token=token, certificate_signing_request=csr.public_bytes(serialization.Encoding.DER)),
            timeout=timeout)
    ders = [response.leaf_certificate, *response.intermediate_certificates]
    chain = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ClientCredentials(credentials.trust_anchors, credentials.server_identity, key_pem, chain)
