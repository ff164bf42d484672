//! The proxy's mesh identity: it makes its own private key (which never leaves the
//! process), asks the CA (the control plane's Identity service) for a certificate
//! with a CSR and its workload token, and renews after about 70% of the time the
//! certificate has left, with jitter. While renewal fails it keeps the certificate it has and
//! tries again with backoff, rotating over the CA replicas.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pymesh_api::mesh::v1::identity_client::IdentityClient;
use pymesh_api::mesh::v1::CertifyRequest;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{IdentitySettings, Transport};
use crate::control_channel::{self, ChannelError};
use crate::metrics::{IdentityMetrics, IdentityRefreshLabels};
use crate::tls::{Certified, MeshTls};

const RETRY_BASE: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum CertifyError {
    #[error("cannot make a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("cannot read the token file {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot reach the CA: {0}")]
    Connect(#[from] ChannelError),
    #[error("the CA at {address} refused: {status}")]
    Refused {
        address: String,
        status: Box<tonic::Status>,
    },
    #[error("the CA's certificate is unusable: {0}")]
    BadCertificate(String),
}

/// The key pair a proxy keeps for its lifetime; only CSRs leave the process.
pub(crate) struct Keys {
    key_pair: rcgen::KeyPair,
    csr: Vec<u8>,
}

impl Keys {
    pub(crate) fn generate(id: &str) -> Result<Self, CertifyError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
            id.to_owned(),
        )?)];
        let csr = params.serialize_request(&key_pair)?.der().to_vec();
        Ok(Self { key_pair, csr })
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pair.serialize_der()))
    }
}

/// Keeps `tls` holding a valid certificate until `stop`.
pub(crate) async fn run(
    tls: Arc<MeshTls>,
    settings: IdentitySettings,
    metrics: IdentityMetrics,
    stop: CancellationToken,
) {
    let keys = match Keys::generate(&settings.id) {
        Ok(keys) => keys,
        Err(e) => {
            tracing::error!(error = %e, "no mesh identity: cannot make a key");
            return;
        }
    };
    let mut replica = 0usize;
    let backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut failures = 0u32;
    control_channel::warn_if_plaintext(&settings.ca_transport, "the mesh CA");
    loop {
        let address = &settings.ca_addresses[replica % settings.ca_addresses.len()];
        // A renewal is proven by the current certificate, so the bearer token stays off
        // the wire; after a failed try (the certificate may have expired) the token is
        // used again.
        let by_certificate =
            settings.ca_transport != Transport::Plaintext && tls.is_certified() && failures == 0;
        let wait = match certify(&settings, &keys, address, &tls, by_certificate).await {
            Ok(certified) => {
                let expires = certified.expires_at;
                match tls.set_certificate(certified) {
                    Ok(()) => {
                        failures = 0;
                        count(&metrics, "ok");
                        metrics.expiry.set(expires as i64);
                        let wait = renew_after(expires);
                        tracing::info!(identity = %settings.id, expires_at = expires, renew_in = ?wait, "certified");
                        wait
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the CA's certificate cannot be used");
                        count(&metrics, "failed");
                        retry_later(&backoff, &mut failures, &mut replica)
                    }
                }
            }
            Err(e) => {
                tracing::warn!(ca = %address, error = %e, "certificate renewal failed; keeping the current one");
                count(&metrics, "failed");
                retry_later(&backoff, &mut failures, &mut replica)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

fn count(metrics: &IdentityMetrics, result: &'static str) {
    metrics
        .refreshes
        .get_or_create(&IdentityRefreshLabels { result })
        .inc();
}

/// The next try goes to the next CA replica, after a backoff.
fn retry_later(backoff: &Backoff, failures: &mut u32, replica: &mut usize) -> Duration {
    *replica += 1;
    *failures = failures.saturating_add(1);
    backoff.pause(*failures)
}

/// 70% of the time left on a certificate just received, ±5% so proxies don't renew in
/// step. (Not from its notBefore: CAs backdate that for clock skew.)
fn renew_after(expires: u64) -> Duration {
    let left = expires.saturating_sub(unix_now()) as f64;
    Duration::from_secs_f64((left * (0.65 + fastrand::f64() * 0.1)).max(1.0))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One exchange with the CA: with the token, or (`by_certificate`) over TLS with the
/// current certificate alone.
async fn certify(
    settings: &IdentitySettings,
    keys: &Keys,
    address: &str,
    tls: &Arc<MeshTls>,
    by_certificate: bool,
) -> Result<Certified, CertifyError> {
    let token = if by_certificate {
        String::new()
    } else {
        tokio::fs::read_to_string(&settings.token_file)
            .await
            .map_err(|source| CertifyError::Token {
                path: settings.token_file.display().to_string(),
                source,
            })?
    };
    let channel = control_channel::connect(
        address,
        &settings.ca_transport,
        Some(tls),
        by_certificate,
        |e| e.timeout(CALL_TIMEOUT),
    )
    .await?;
    let response = IdentityClient::new(channel)
        .certify(CertifyRequest {
            identity: settings.id.to_string(),
            token: token.trim().to_owned(),
            certificate_signing_request: keys.csr.clone(),
        })
        .await
        .map_err(|status| CertifyError::Refused {
            address: address.to_owned(),
            status: Box::new(status),
        })?
        .into_inner();
    let leaf = CertificateDer::from(response.leaf_certificate);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| CertifyError::BadCertificate(e.to_string()))?;
    let expires = parsed.validity().not_after.timestamp().max(0) as u64;
    let named = crate::tls::peer_identity(Some(std::slice::from_ref(&leaf))).ok();
    if named.as_deref() != Some(&*settings.id) {
        return Err(CertifyError::BadCertificate(format!(
            "it names {named:?}, not {}",
            settings.id
        )));
    }
    let mut chain = vec![leaf];
    chain.extend(
        response
            .intermediate_certificates
            .into_iter()
            .map(CertificateDer::from),
    );
    // Installed only once it chains to the trust anchors: an answer from anyone else
    // (or a CA under another anchor) is refused.
    tls.check_issued(&chain)
        .map_err(|e| CertifyError::BadCertificate(e.to_string()))?;
    Ok(Certified {
        chain,
        key: keys.private_key(),
        expires_at: expires,
    })
}
