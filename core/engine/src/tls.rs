//! Mutual TLS between meshed proxies: TLS 1.3 only (rustls with ring), SPIFFE
//! identities in URI SANs, and configs swapped atomically when the certificate or
//! the trust anchors change (handshakes in progress and open sessions carry on).
//!
//! A client proxy names the identity it expects in SNI (as a DNS-like name), so the
//! server proxy can tell mesh TLS from an application's own TLS, which it passes
//! through untouched. The chain is checked against the trust anchors by rustls;
//! the identity is checked after the handshake against what the endpoint should be.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why a mesh TLS connection could not be made or accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("this proxy has no certificate yet (its identity is not certified)")]
    NotCertified,
    #[error(
        "the endpoint is meshed, and this proxy has no `identity` to reach it with mutual TLS"
    )]
    NoLocalIdentity,
    #[error("{expected:?} cannot be named in TLS: {reason}")]
    BadName { expected: String, reason: String },
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("the TLS handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the peer is {found:?}, not the expected {expected:?}")]
    WrongIdentity { expected: String, found: String },
    #[error("the peer's certificate names no SPIFFE identity")]
    NoIdentity,
    #[error("the peer's certificate is not a mesh identity of this trust domain: {0}")]
    ForeignIdentity(String),
    #[error("the certificate does not chain to the trust anchors: {0}")]
    Untrusted(rustls::Error),
    #[error("cannot build a TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate a proxy holds: its chain (leaf first) and private key.
pub(crate) struct Certified {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    /// Seconds since the Unix epoch when the leaf expires.
    pub(crate) expires_at: u64,
}

/// The ALPN protocol a client proxy offers and a server proxy accepts when, inside mesh
/// TLS, it takes HTTP/1 requests carried over HTTP/2 (marked by [`ORIG_PROTO`]). A peer
/// that does not know it negotiates nothing, and requests to it stay HTTP/1.
pub(crate) const MESH_ALPN: &[u8] = b"pymesh.h2";

/// The request header that marks an HTTP/1 request carried over HTTP/2 between two
/// proxies, with its original version (`HTTP/1.1` or `HTTP/1.0`).
pub(crate) const ORIG_PROTO: &str = "pymesh-orig-proto";

/// Rustls configs for one (certificate, trust anchors) pair.
struct Configs {
    client: TlsConnector,
    server: TlsAcceptor,
    /// The same, accepting [`MESH_ALPN`]: used only for clients that offer it, so a
    /// client offering something else is never refused for it.
    server_alpn: TlsAcceptor,
}

/// The proxy's mesh TLS state: its identity, the current certificate and anchors.
pub(crate) struct MeshTls {
    /// The SNI name clients use to reach this proxy.
    pub(crate) sni: String,
    /// Peers' identities must be in this trust domain (this proxy's own).
    trust_domain: String,
    anchors: ArcSwap<Vec<CertificateDer<'static>>>,
    certified: ArcSwapOption<Certified>,
    configs: ArcSwapOption<Configs>,
    /// Serialises updates (a renewal and an anchor change at once must not lose either).
    updating: Mutex<()>,
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl MeshTls {
    pub(crate) fn new(id: Arc<str>, anchors: Vec<CertificateDer<'static>>) -> Self {
        Self {
            sni: sni_name(&id),
            trust_domain: trust_domain_of(&id).to_owned(),
            anchors: ArcSwap::from_pointee(anchors),
            certified: ArcSwapOption::empty(),
            configs: ArcSwapOption::empty(),
            updating: Mutex::new(()),
        }
    }

    pub(crate) fn is_certified(&self) -> bool {
        self.configs.load().is_some()
    }

    /// Installs a new certificate; new handshakes use it at once.
    pub(crate) fn set_certificate(&self, certified: Certified) -> Result<(), TlsError> {
        let _updating = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let configs = build(&self.anchors.load(), &certified)?;
        self.certified.store(Some(Arc::new(certified)));
        self.configs.store(Some(Arc::new(configs)));
        Ok(())
    }

    /// Replaces the trust anchors (a rotation adds the new anchor beside the old).
    pub(crate) fn set_anchors(
        &self,
        anchors: Vec<CertificateDer<'static>>,
    ) -> Result<(), TlsError> {
        let _updating = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        if **self.anchors.load() == anchors {
            return Ok(());
        }
        if let Some(certified) = self.certified.load_full() {
            let configs = build(&anchors, &certified)?;
            self.configs.store(Some(Arc::new(configs)));
        }
        self.anchors.store(Arc::new(anchors));
        Ok(())
    }

    /// Opens mutual TLS on `stream` to a proxy that must be `expected`, within `timeout`.
    pub(crate) async fn connect<S>(
        &self,
        stream: S,
        expected: &str,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let configs = self.configs.load_full().ok_or(TlsError::NotCertified)?;
        self.handshake(&configs.client, stream, expected, timeout)
            .await
    }

    /// TLS through `connector` to the peer whose SNI name stands for `expected`, which
    /// its certificate must then name exactly.
    async fn handshake<S>(
        &self,
        connector: &TlsConnector,
        stream: S,
        expected: &str,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(sni_name(expected)).map_err(|e| TlsError::BadName {
            expected: expected.to_owned(),
            reason: e.to_string(),
        })?;
        let tls = tokio::time::timeout(timeout, connector.connect(name, stream))
            .await
            .map_err(|_| TlsError::HandshakeTimeout(timeout))?
            .map_err(TlsError::Handshake)?;
        let found = self.peer_identity(tls.get_ref().1.peer_certificates())?;
        if &*found != expected {
            return Err(TlsError::WrongIdentity {
                expected: expected.to_owned(),
                found: found.to_string(),
            });
        }
        Ok(tls)
    }

    /// Completes the server side of a mesh handshake within `timeout` (a client that
    /// stalls mid-handshake must not hold a connection); returns the client's identity.
    /// `offers_mesh_alpn`: the ClientHello offered [`MESH_ALPN`], which is then accepted.
    pub(crate) async fn accept<S>(
        &self,
        stream: S,
        timeout: Duration,
        offers_mesh_alpn: bool,
    ) -> Result<(tokio_rustls::server::TlsStream<S>, Arc<str>), TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let configs = self.configs.load_full().ok_or(TlsError::NotCertified)?;
        let acceptor = if offers_mesh_alpn {
            &configs.server_alpn
        } else {
            &configs.server
        };
        let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
            .await
            .map_err(|_| TlsError::HandshakeTimeout(timeout))?
            .map_err(TlsError::Handshake)?;
        let client = self.peer_identity(tls.get_ref().1.peer_certificates())?;
        Ok((tls, client))
    }

    /// Opens TLS 1.3 to the control plane (or CA) on `stream`: its chain must end at the
    /// trust anchors and it must be `expected`. This proxy's certificate goes along when
    /// it has one and `present` (Discovery requires it; the CA renews by it).
    pub(crate) async fn connect_control_plane<S>(
        &self,
        stream: S,
        expected: &str,
        present: bool,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let provider = provider();
        let roots = Arc::new(root_store(&self.anchors.load())?);
        let verifier = Arc::new(MeshServerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match self.certified.load_full().filter(|_| present) {
            Some(certified) => {
                builder.with_client_auth_cert(certified.chain.clone(), certified.key.clone_key())?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = TlsConnector::from(Arc::new(config));
        self.handshake(&connector, stream, expected, timeout).await
    }

    /// Checks a chain the CA issued to this proxy: its leaf must chain to the trust
    /// anchors (and be valid now) before it is installed.
    pub(crate) fn check_issued(&self, chain: &[CertificateDer<'static>]) -> Result<(), TlsError> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(TlsError::NoIdentity);
        };
        let roots = root_store(&self.anchors.load())?;
        let cert =
            rustls::server::ParsedCertificate::try_from(leaf).map_err(TlsError::Untrusted)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(TlsError::Untrusted)
    }

    /// The peer's mesh identity: exactly one SPIFFE URI in its leaf, shaped as mesh
    /// identities are and in this proxy's trust domain (a second trusted CA must not be
    /// able to speak for this one's workloads).
    fn peer_identity(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<Arc<str>, TlsError> {
        let id = peer_identity(certs)?;
        crate::config::security::check_spiffe_id(&id).map_err(TlsError::ForeignIdentity)?;
        if trust_domain_of(&id) != self.trust_domain {
            return Err(TlsError::ForeignIdentity(format!(
                "{id} is not in the trust domain {}",
                self.trust_domain
            )));
        }
        Ok(id)
    }
}

/// The trust domain of `spiffe://<td>/…` (empty when it is not one).
fn trust_domain_of(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("")
}

fn root_store(anchors: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots.add(anchor.clone())?;
    }
    Ok(roots)
}

/// What the first bytes of a connection say about TLS.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not a complete ClientHello yet.
    Partial,
    NotTls,
    /// A ClientHello, with the name it asks for and whether it offers [`MESH_ALPN`].
    Tls {
        sni: Option<String>,
        mesh_alpn: bool,
    },
}

/// Reads a ClientHello out of `buf` without consuming the connection, so a hello
/// meant for the application (its own TLS) can still be passed through untouched.
pub(crate) fn peek_client_hello(buf: &[u8]) -> Hello {
    // A TLS record: handshake (22), major version 3.
    if buf.is_empty() || buf[0] != 0x16 || (buf.len() > 1 && buf[1] != 0x03) {
        return Hello::NotTls;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::NotTls,
        }
    }
    match acceptor.accept() {
        Ok(None) => Hello::Partial,
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Hello::Tls {
                sni: hello.server_name().map(str::to_owned),
                mesh_alpn: hello
                    .alpn()
                    .is_some_and(|mut offered| offered.any(|p| p == MESH_ALPN)),
            }
        }
        Err(_) => Hello::NotTls,
    }
}

/// The DNS-like name standing for `id` in SNI:
/// `spiffe://td/ns/NS/sa/SA` becomes `SA.NS.serviceaccount.identity.pymesh.td`.
pub(crate) fn sni_name(id: &str) -> String {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [td, "ns", ns, "sa", sa] => format!("{sa}.{ns}.serviceaccount.identity.pymesh.{td}")
            .replace('_', "-")
            .to_ascii_lowercase(),
        _ => rest.replace(['/', ':', '_'], "-").to_ascii_lowercase(),
    }
}

/// The SPIFFE id in the leaf's URI SAN: there must be exactly one.
pub(crate) fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Arc<str>, TlsError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(TlsError::NoIdentity)?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::ForeignIdentity(format!("the certificate does not parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or(TlsError::NoIdentity)?;
    let mut ids = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(*uri)
            }
            _ => None,
        });
    let id = ids.next().ok_or(TlsError::NoIdentity)?;
    if ids.next().is_some() {
        return Err(TlsError::ForeignIdentity(
            "it names more than one SPIFFE identity".into(),
        ));
    }
    Ok(Arc::from(id))
}

fn build(anchors: &[CertificateDer<'static>], certified: &Certified) -> Result<Configs, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(anchors)?);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certified.chain.clone(), certified.key.clone_key())?;
    let mut server_alpn = server.clone();
    server_alpn.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let server_verifier = Arc::new(MeshServerVerifier {
        roots,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_auth_cert(certified.chain.clone(), certified.key.clone_key())?;
    // No resumption: a resumed session would skip checking the peer's certificate (its
    // expiry, the current anchors). Connections are pooled, so full handshakes are rare.
    client.resumption = rustls::client::Resumption::disabled();
    client.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Ok(Configs {
        client: TlsConnector::from(Arc::new(client)),
        server: TlsAcceptor::from(Arc::new(server)),
        server_alpn: TlsAcceptor::from(Arc::new(server_alpn)),
    })
}

/// Checks that a server's chain ends at a trust anchor and is valid now. The name
/// is not checked here: mesh certificates carry SPIFFE URIs, not DNS names, and
/// [`MeshTls::connect`] compares the identity once the handshake is done.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is ever offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_stand_for_identities() {
        assert_eq!(
            sni_name("spiffe://cluster.local/ns/web/sa/api_v2"),
            "api-v2.web.serviceaccount.identity.pymesh.cluster.local"
        );
        assert!(ServerName::try_from(sni_name("spiffe://cluster.local/ns/a/sa/b")).is_ok());
    }

    fn leaf_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().expect("an IA5 URI")))
            .collect();
        params.self_signed(&key).expect("certificate").der().clone()
    }

    #[test]
    fn a_peer_has_exactly_one_mesh_identity_of_this_trust_domain() {
        let one = leaf_with_uris(&["spiffe://cluster.local/ns/shop/sa/web"]);
        let id = peer_identity(Some(&[one])).expect("one identity");
        assert_eq!(&*id, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(trust_domain_of(&id), "cluster.local");

        let two = leaf_with_uris(&[
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/ops/sa/admin",
        ]);
        assert!(
            peer_identity(Some(&[two])).is_err(),
            "two identities in one leaf"
        );
        assert!(peer_identity(Some(&[leaf_with_uris(&[])])).is_err());
        assert!(peer_identity(None).is_err());
        for shape in [
            "spiffe://cluster.local/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns//sa/web",
        ] {
            assert!(
                crate::config::security::check_spiffe_id(shape).is_err(),
                "{shape}"
            );
        }
        assert_ne!(
            trust_domain_of("spiffe://evil.example/ns/shop/sa/web"),
            "cluster.local"
        );
    }

    /// A proxy of identity `id`, certified by `ca`.
    fn proxy(
        id: &str,
        ca: &rcgen::CertifiedIssuer<'_, rcgen::KeyPair>,
        anchors: &[CertificateDer<'static>],
    ) -> MeshTls {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("an IA5 URI"))];
        let leaf = params.signed_by(&key, ca).expect("leaf");
        let mesh = MeshTls::new(Arc::from(id), anchors.to_vec());
        mesh.set_certificate(Certified {
            chain: vec![leaf.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).expect("a PKCS#8 key"),
            expires_at: u64::MAX,
        })
        .expect("certified");
        mesh
    }

    #[tokio::test]
    async fn proxies_negotiate_http1_over_http2_and_an_older_peer_does_not() {
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("CA");
        let anchors = vec![ca.der().clone()];
        let server_id = "spiffe://cluster.local/ns/shop/sa/server";
        let server = proxy(server_id, &ca, &anchors);
        let client = proxy("spiffe://cluster.local/ns/shop/sa/client", &ca, &anchors);

        // The client's hello offers the mark; the inbound sees it before the handshake.
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let connecting = tokio::spawn(async move {
            let _ = client
                .connect(ours, server_id, Duration::from_secs(5))
                .await;
            client
        });
        let mut hello = vec![0u8; 16 * 1024];
        let n = tokio::io::AsyncReadExt::read(&mut theirs, &mut hello)
            .await
            .expect("a hello");
        assert!(matches!(
            peek_client_hello(&hello[..n]),
            Hello::Tls { mesh_alpn: true, sni: Some(sni) } if sni == server.sni
        ));
        drop(theirs);
        let client = connecting.await.expect("client task");

        // A server that accepts it (this build), and one that has no ALPN at all (an
        // older pymesh): the handshake succeeds with both, and only the first carries.
        for offers in [true, false] {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let (accepted, connected) = tokio::join!(
                server.accept(s, Duration::from_secs(5), offers),
                client.connect(c, server_id, Duration::from_secs(5)),
            );
            let (inbound, client_id) = accepted.expect("accepted");
            let outbound = connected.expect("connected");
            assert_eq!(&*client_id, "spiffe://cluster.local/ns/shop/sa/client");
            let negotiated = outbound.get_ref().1.alpn_protocol();
            assert_eq!(negotiated == Some(MESH_ALPN), offers, "{negotiated:?}");
            assert_eq!(inbound.get_ref().1.alpn_protocol(), negotiated);
        }
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert_eq!(peek_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(peek_client_hello(b"\x16\x03\x01\x00"), Hello::Partial);
    }
}
