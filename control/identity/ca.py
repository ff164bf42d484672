"""The trust anchor and the issuer, and signing workload certificates.

The trust anchor (a self-signed root) is what proxies trust; the issuer (an intermediate CA
signed by the anchor, pathlen 0) is what signs. Both are either supplied as PEM files
(``trustAnchorFile``; ``issuerCertFile`` + ``issuerKeyFile``) or generated into the state
directory on first start (``trust-anchor.pem``/``.key``, ``issuer.pem``/``.key``) and reused
after. The issuer files are re-read when they change on disk (checked at most once a second),
so an operator rotates the issuer by replacing them; a bad replacement is logged and the
current issuer keeps signing. To rotate the trust anchor: give proxies a bundle of the old and
the new anchor, then switch the issuer to one signed by the new anchor.

A leaf follows the SPIFFE X.509-SVID rules: an empty subject, so its one URI SAN (the SPIFFE
id) is critical (RFC 5280 §4.2.1.6); CA:false; digitalSignature; serverAuth and clientAuth.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import pymesh

from ..settings import ControlSettings
from .files import read_setting_file, state_lock, write_file, write_private

log = logging.getLogger("pymesh.control.identity")

ANCHOR_CERT = "trust-anchor.pem"
ANCHOR_KEY = "trust-anchor.key"
ISSUER_CERT = "issuer.pem"
ISSUER_KEY = "issuer.key"

#: a leaf is valid from this long ago, for clocks a little behind ours
CLOCK_SKEW = timedelta(seconds=60)
ANCHOR_LIFETIME = timedelta(days=3650)
ISSUER_LIFETIME = timedelta(days=365)
#: a generated issuer is renewed (from the anchor's key) when it has less than this left
ISSUER_RENEW_BEFORE = timedelta(days=30)
RELOAD_INTERVAL = 1.0
RENEW_CHECK_INTERVAL = 3600.0
#: bounds on what a request may make us parse and check
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

IssuerKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
_SETTINGS_HINT = "issuerCertFile/issuerKeyFile"


class CSRError(pymesh.MeshError):
    """The certificate signing request is at fault; the message says how."""


class IssuerError(pymesh.MeshError):
    """This CA cannot issue right now (its issuer has expired)."""


@dataclass(frozen=True)
class CAFiles:
    """Where the anchor and the issuer live, and which setting names each (for errors)."""

    anchor: Path
    issuer_cert: Path
    issuer_key: Path
    anchor_setting: str
    issuer_cert_setting: str
    issuer_key_setting: str
    #: in the state directory: generated on first start, the issuer renewed from the anchor key
    generated: bool
    #: no trustAnchorFile: the anchor is the self-signed certificate that ends the issuer's chain
    anchor_in_chain: bool = False

    @classmethod
    def from_settings(cls, settings: ControlSettings) -> CAFiles:
        anchor, cert, key = settings.trust_anchor_file, settings.issuer_cert_file, settings.issuer_key_file
        if not (anchor or cert or key):
            state = settings.state_path
            return cls(state / ANCHOR_CERT, state / ISSUER_CERT, state / ISSUER_KEY,
                       "stateDir", "stateDir", "stateDir", generated=True)
        for value, name in ((cert, "issuerCertFile"), (key, "issuerKeyFile")):
            if not value:
                raise pymesh.ConfigError(name, "required with trustAnchorFile: the control plane signs with an "
                                               "issuer (certificate and key), never with the trust anchor; or set "
                                               "none of the three to generate them in stateDir")
        if not anchor:
            # an offline anchor: its key is nowhere near here; its certificate ends the issuer's chain
            return cls(Path(cert).expanduser(), Path(cert).expanduser(), Path(key).expanduser(),
                       "issuerCertFile", "issuerCertFile", "issuerKeyFile", generated=False, anchor_in_chain=True)
        return cls(Path(anchor).expanduser(), Path(cert).expanduser(), Path(key).expanduser(),
                   "trustAnchorFile", "issuerCertFile", "issuerKeyFile", generated=False)

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return self.anchor, self.issuer_cert, self.issuer_key


@dataclass(frozen=True)
class Issuer:
    """A validated issuer: its key matches, it chains to one of the anchors, it is valid now."""

    anchors: tuple[x509.Certificate, ...]
    certificate: x509.Certificate
    key: IssuerKey
    #: DER, the issuer first, then any intermediates; never an anchor
    chain: tuple[bytes, ...]
    authority_key_id: x509.AuthorityKeyIdentifier

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True)
class Issued:
    """A signed leaf and the chain to send with it."""

    leaf: bytes
    chain: tuple[bytes, ...]
    serial: int
    not_after: datetime


# -- loading --------------------------------------------------------------------------------


def _certificates(data: bytes, path: Path, setting: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise pymesh.ConfigError(setting, f"{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) "
                                          "that can be parsed") from None


def _private_key(data: bytes, path: Path, setting: str) -> IssuerKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise pymesh.ConfigError(setting, f"{path}: the key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise pymesh.ConfigError(setting, f"{path}: not a PEM private key that can be parsed") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise pymesh.ConfigError(setting, f"{path}: a {type(key).__name__}; expected an EC, Ed25519 or RSA key")
    return key


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _name(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def _split_anchor(chain: list[x509.Certificate], files: CAFiles
                  ) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """The issuer's chain and, apart, the self-signed anchor that ends it (issuer-only settings)."""
    top = chain[-1]
    if len(chain) < 2 or top.issuer != top.subject or not _signed_by(top, top):
        raise pymesh.ConfigError(files.issuer_cert_setting, f"{files.issuer_cert}: without trustAnchorFile, the "
                                                            "file must end with the trust anchor (the self-signed "
                                                            "root the issuer chains to; its key stays offline)")
    return chain[:-1], [top]


def load_issuer(files: CAFiles, now: datetime | None = None) -> Issuer:
    """Reads and checks the anchor(s) and the issuer. Raises :class:`pymesh.ConfigError` naming
    the setting at fault and what is wrong."""
    now = now or datetime.now(UTC)
    chain = _certificates(read_setting_file(files.issuer_cert, files.issuer_cert_setting), files.issuer_cert,
                          files.issuer_cert_setting)
    if files.anchor_in_chain:
        chain, anchors = _split_anchor(chain, files)
    else:
        anchors = _certificates(read_setting_file(files.anchor, files.anchor_setting), files.anchor,
                                files.anchor_setting)
    key = _private_key(read_setting_file(files.issuer_key, files.issuer_key_setting), files.issuer_key,
                       files.issuer_key_setting)
    certificate = chain[0]
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        raise pymesh.ConfigError(files.issuer_key_setting, f"{files.issuer_key} does not match the issuer "
                                                           f"certificate {files.issuer_cert} ({_name(certificate)})")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise pymesh.ConfigError(files.issuer_cert_setting, f"{files.issuer_cert}: {_name(certificate)} is not a CA "
                                                            "certificate (BasicConstraints CA:true is missing)")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise pymesh.ConfigError(files.issuer_cert_setting, f"{files.issuer_cert}: its KeyUsage lacks "
                                                                "keyCertSign, so it may not sign certificates")
    except x509.ExtensionNotFound:
        pass
    for child, parent in zip(chain, chain[1:], strict=False):
        if not _signed_by(child, parent):
            raise pymesh.ConfigError(files.issuer_cert_setting, f"{files.issuer_cert}: {_name(child)} is not signed "
                                                                f"by the next certificate, {_name(parent)}")
    top = chain[-1]
    if not any(_signed_by(top, a) for a in anchors):
        raise pymesh.ConfigError(files.issuer_cert_setting, f"{files.issuer_cert}: {_name(top)} (issued by "
                                                            f"{top.issuer.rfc4514_string()}) is not signed by a "
                                                            f"trust anchor in {files.anchor}")
    for cert in chain:
        if now < cert.not_valid_before_utc:
            raise pymesh.ConfigError(files.issuer_cert_setting, f"{files.issuer_cert}: {_name(cert)} is not valid "
                                                                f"before {cert.not_valid_before_utc.isoformat()}")
        if now >= cert.not_valid_after_utc:
            raise pymesh.ConfigError(files.issuer_cert_setting, f"{files.issuer_cert}: {_name(cert)} "
                                                                f"expired at {cert.not_valid_after_utc.isoformat()}; "
                                                                "rotate the issuer")
    try:
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            certificate.public_key())  # type: ignore[arg-type]
    anchor_ders = {a.public_bytes(serialization.Encoding.DER) for a in anchors}
    ders = tuple(d for d in (c.public_bytes(serialization.Encoding.DER) for c in chain) if d not in anchor_ders)
    return Issuer(tuple(anchors), certificate, key, ders, authority_key_id)


# -- generating, in the state directory -----------------------------------------------------


def _ca_certificate(subject: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
                    issuer: x509.Certificate | None, not_after: datetime, path_length: int | None) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pymesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _issue_issuer(directory: Path, anchor_key: ec.EllipticCurvePrivateKey, anchor: x509.Certificate) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(datetime.now(UTC) + ISSUER_LIFETIME, anchor.not_valid_after_utc)
    certificate = _ca_certificate("pymesh issuer", key, anchor_key, anchor, not_after, path_length=0)
    # the key first: a reader that sees the new certificate finds its key (a reader in between
    # finds them mismatched, and keeps the issuer it has)
    write_private(directory / ISSUER_KEY, _pem_key(key))
    write_file(directory / ISSUER_CERT, _pem(certificate), 0o644)
    log.info("generated an issuer in %s, valid until %s", directory, not_after.isoformat())


def prepare_state_dir(files: CAFiles, *, create_anchor: bool = True) -> None:
    """Generates what is missing in the state directory: the trust anchor (first start, unless
    ``create_anchor`` is false: a running CA never switches anchors by itself), the issuer
    (first start, or when it has less than ISSUER_RENEW_BEFORE left and the anchor's key is
    there). Holds the directory's lock, so concurrent starts generate once."""
    directory = files.anchor.parent
    with state_lock(directory):
        anchor_key_path = directory / ANCHOR_KEY
        if not files.anchor.exists():
            if not create_anchor:
                raise pymesh.ConfigError("stateDir", f"{files.anchor} is gone; restore it (or restart to "
                                                     "generate a new trust anchor that proxies must be given)")
            if files.issuer_cert.exists() or files.issuer_key.exists():
                raise pymesh.ConfigError("stateDir", f"{directory} holds {ISSUER_CERT} or {ISSUER_KEY} but no "
                                                     f"{ANCHOR_CERT}: restore it, or remove the issuer files to "
                                                     "start a new trust anchor")
            key = ec.generate_private_key(ec.SECP256R1())
            anchor = _ca_certificate("pymesh trust anchor", key, key, None, datetime.now(UTC) + ANCHOR_LIFETIME,
                                     path_length=None)
            write_private(anchor_key_path, _pem_key(key))
            write_file(files.anchor, _pem(anchor), 0o644)
            log.info("generated a trust anchor in %s", files.anchor)
        if files.issuer_cert.exists() and files.issuer_key.exists() and not _expiring(files.issuer_cert):
            return
        if not anchor_key_path.exists():
            if files.issuer_cert.exists() and files.issuer_key.exists():
                log.warning("the issuer in %s expires soon and %s is not there to renew it; rotate it", directory,
                            ANCHOR_KEY)
                return
            raise pymesh.ConfigError("stateDir", f"{directory} has no issuer and no {ANCHOR_KEY} to sign one: "
                                                 f"put {ISSUER_CERT} and {ISSUER_KEY} there, or restore {ANCHOR_KEY}")
        anchor_key = _private_key(read_setting_file(anchor_key_path, "stateDir"), anchor_key_path, "stateDir")
        anchors = _certificates(read_setting_file(files.anchor, "stateDir"), files.anchor, "stateDir")
        matching = [a for a in anchors if _spki(a.public_key()) == _spki(anchor_key.public_key())]
        if not isinstance(anchor_key, ec.EllipticCurvePrivateKey) or not matching:
            raise pymesh.ConfigError("stateDir", f"{anchor_key_path} is not the EC key of {files.anchor}")
        _issue_issuer(directory, anchor_key, matching[0])


def _expiring(path: Path) -> bool:
    try:
        certificate = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError):
        return False  # load_issuer says what is wrong with it
    return certificate.not_valid_after_utc - datetime.now(UTC) < ISSUER_RENEW_BEFORE


def trust_anchor_bundle(settings: ControlSettings) -> tuple[Path, bytes]:
    """The file of trust anchors proxies should trust, and its certificates as PEM: the
    ``trustAnchorFile``, else the state directory's (generated first if need be)."""
    if settings.trust_anchor_file:
        path, setting = Path(settings.trust_anchor_file).expanduser(), "trustAnchorFile"
    elif settings.issuer_cert_file:
        files = CAFiles.from_settings(settings)
        chain = _certificates(read_setting_file(files.issuer_cert, files.issuer_cert_setting), files.issuer_cert,
                              files.issuer_cert_setting)
        return files.issuer_cert, b"".join(_pem(a) for a in _split_anchor(chain, files)[1])
    else:
        files = CAFiles.from_settings(settings)
        prepare_state_dir(files)
        path, setting = files.anchor, files.anchor_setting
    anchors = _certificates(read_setting_file(path, setting), path, setting)
    return path, b"".join(_pem(a) for a in anchors)


# -- signing --------------------------------------------------------------------------------


class CertificateAuthority:
    """Signs workload certificates with the current issuer; follows the issuer files."""

    def __init__(self, files: CAFiles, lifetime: float,
                 on_issuer: Callable[[Issuer], None] | None = None,
                 on_rejected: Callable[[], None] | None = None) -> None:
        if lifetime <= 0:
            raise pymesh.ConfigError("certLifetime", "must be positive")
        self.files = files
        self.lifetime = timedelta(seconds=lifetime)
        self.on_issuer = on_issuer
        self.on_rejected = on_rejected
        if files.generated:
            prepare_state_dir(files)
        stamp = self._stamp()
        self.issuer = load_issuer(files)
        self._loaded_stamp = stamp
        self._checked = time.monotonic()
        self._renew_checked = self._checked
        self._last_error = ""
        self._announce()

    @classmethod
    def from_settings(cls, settings: ControlSettings, on_issuer: Callable[[Issuer], None] | None = None,
                      on_rejected: Callable[[], None] | None = None) -> CertificateAuthority:
        return cls(CAFiles.from_settings(settings), settings.cert_lifetime, on_issuer, on_rejected)

    def _announce(self) -> None:
        log.info("issuer %s (serial %x) valid until %s, chaining to %s", _name(self.issuer.certificate),
                 self.issuer.certificate.serial_number, self.issuer.not_after.isoformat(), self.files.anchor)
        if self.on_issuer is not None:
            self.on_issuer(self.issuer)

    def _stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.files.paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def refresh(self) -> None:
        """Re-reads the issuer files if they changed (checked at most once a second). A bad
        replacement is logged once and the current issuer kept."""
        now = time.monotonic()
        if now - self._checked < RELOAD_INTERVAL:
            return
        self._checked = now
        if self.files.generated and now - self._renew_checked >= RENEW_CHECK_INTERVAL:
            self._renew_checked = now
            try:
                prepare_state_dir(self.files, create_anchor=False)
            except pymesh.ConfigError as e:
                log.warning("cannot renew the issuer: %s", e)
        stamp = self._stamp()
        if stamp == self._loaded_stamp:
            return
        try:
            issuer = load_issuer(self.files)
        except pymesh.ConfigError as e:
            if self.on_rejected is not None:
                self.on_rejected()
            if str(e) != self._last_error:
                self._last_error = str(e)
                log.warning("the issuer files changed but cannot be used; keeping the current issuer: %s", e)
            return  # tried again in a second: the files may be half-way through a rotation
        self._loaded_stamp, self._last_error, self.issuer = stamp, "", issuer
        self._announce()

    def sign(self, csr_der: bytes, identity: str) -> Issued:
        """A leaf certificate for ``identity`` (already proven) from a DER PKCS#10 request.
        Raises :class:`CSRError` saying what is wrong with the request, or
        :class:`IssuerError`."""
        return self.sign_key(check_csr(csr_der, identity), identity)

    def sign_key(self, public_key: CsrKey, identity: str, dns_names: tuple[str, ...] = ()) -> Issued:
        """A leaf for ``identity`` (its one URI SAN, plus ``dns_names``: the control plane's own
        certificate is also a DNS server certificate). Raises :class:`IssuerError`."""
        self.refresh()
        issuer = self.issuer
        now = datetime.now(UTC)
        not_after = min(now + self.lifetime, issuer.not_after)
        if not_after <= now:
            raise IssuerError(f"the issuer expired at {issuer.not_after.isoformat()}; rotate it ({_SETTINGS_HINT})")
        not_before = max(now - CLOCK_SKEW, issuer.certificate.not_valid_before_utc)
        serial = x509.random_serial_number()
        rsa_key = isinstance(public_key, rsa.RSAPublicKey)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
        names += [x509.DNSName(n) for n in dns_names]
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(issuer.certificate.subject)
                .public_key(public_key)
                .serial_number(serial)
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName(names), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=rsa_key, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(issuer.authority_key_id, critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .sign(issuer.key, None if isinstance(issuer.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()))
        return Issued(leaf.public_bytes(serialization.Encoding.DER), issuer.chain, serial, leaf.not_valid_after_utc)


CsrKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def check_csr(csr_der: bytes, identity: str) -> CsrKey:
    """The public key of a request that is well-formed, self-signed, for an accepted key type
    and names exactly ``identity``. Raises :class:`CSRError` saying what is wrong."""
    if not csr_der:
        raise CSRError("required: a DER PKCS#10 certificate signing request")
    if len(csr_der) > MAX_CSR_BYTES:
        raise CSRError(f"{len(csr_der)} bytes; at most {MAX_CSR_BYTES} are accepted")
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError as e:
        raise CSRError(f"not a DER PKCS#10 certificate signing request ({e})") from None
    try:
        public_key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CSRError(f"its key or signature algorithm is not supported ({e}); use EC P-256 or Ed25519") from None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise CSRError(f"an EC key on {public_key.curve.name}; use EC P-256 (secp256r1) or Ed25519")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
            raise CSRError(f"an RSA key of {public_key.key_size} bits; RSA needs {MIN_RSA_BITS} to {MAX_RSA_BITS} "
                           "bits (EC P-256 or Ed25519 are preferred)")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise CSRError(f"a {type(public_key).__name__.lstrip('_')}; use EC P-256 or Ed25519")
    if not valid:
        raise CSRError("its signature does not verify with its own public key")
    try:
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise CSRError(f"it has no subjectAltName; it needs exactly one, the URI {identity}") from None
    except ValueError as e:
        raise CSRError(f"its extensions cannot be parsed ({e})") from None
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        shown = ", ".join(_general_name(n) for n in names[:4]) + (", …" if len(names) > 4 else "")
        raise CSRError(f"its subjectAltName must be exactly one URI, {identity}; it has {shown or 'none'}")
    if names[0].value != identity:
        raise CSRError(f"its subjectAltName URI {names[0].value[:300]!r} is not the identity asked for, {identity}")
    return public_key


def _general_name(name: x509.GeneralName) -> str:
    kind = {x509.DNSName: "DNS", x509.UniformResourceIdentifier: "URI", x509.IPAddress: "IP",
            x509.RFC822Name: "email"}.get(type(name), type(name).__name__)
    return f"{kind}:{str(getattr(name, 'value', ''))[:100]}"
