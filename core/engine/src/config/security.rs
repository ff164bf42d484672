//! Validation of the security part of a `ProxyConfig`: the proxy's mesh identity
//! (trust domain, trust anchors, CA) and the authorization policies of its INBOUND
//! listeners.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use http::Method;
use pymesh_api::config::v1 as api;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::{ConfigError, ControlPlaneSettings, Transport};

pub(crate) const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Who this proxy is in the mesh, and whom it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdentitySettings {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub(crate) id: Arc<str>,
    pub(crate) trust_domain: String,
    /// DER certificates every peer's chain must end at (old and new while rotating).
    pub(crate) trust_anchors: Vec<CertificateDer<'static>>,
    /// `http://host:port` of each CA replica.
    pub(crate) ca_addresses: Vec<String>,
    pub(crate) ca_transport: Transport,
    pub(crate) token_file: PathBuf,
}

impl IdentitySettings {
    /// Everything but the trust anchors, which may change on reload.
    pub(crate) fn same_except_anchors(&self, other: &Self) -> bool {
        self.id == other.id
            && self.trust_domain == other.trust_domain
            && self.ca_addresses == other.ca_addresses
            && self.ca_transport == other.ca_transport
            && self.token_file == other.token_file
    }
}

/// Mutual TLS on an INBOUND listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    Permissive,
    Strict,
    Disabled,
}

/// The fallback for a listener that no ALLOW policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DefaultPolicy {
    AllUnauthenticated,
    AllAuthenticated,
    Deny,
}

impl DefaultPolicy {
    pub(crate) fn name(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "default:all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "default:all-authenticated",
            DefaultPolicy::Deny => "default:deny",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthorizationSettings {
    pub(crate) default: DefaultPolicy,
    pub(crate) policies: Vec<Arc<PolicySettings>>,
    /// Decision names made once, so deciding allocates nothing.
    pub(crate) default_name: Arc<str>,
    pub(crate) no_match_name: Arc<str>,
}

impl AuthorizationSettings {
    fn new(default: DefaultPolicy, policies: Vec<Arc<PolicySettings>>) -> Self {
        Self {
            default,
            policies,
            default_name: Arc::from(default.name()),
            no_match_name: Arc::from("default:no-matching-policy"),
        }
    }
}

impl Default for AuthorizationSettings {
    fn default() -> Self {
        Self::new(DefaultPolicy::AllUnauthenticated, Vec::new())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicySettings {
    pub(crate) name: Arc<str>,
    pub(crate) deny: bool,
    /// Listener names; empty means every INBOUND listener.
    pub(crate) listeners: Vec<String>,
    pub(crate) identities: Vec<IdentityMatch>,
    pub(crate) unauthenticated: bool,
    pub(crate) paths: Vec<PathMatch>,
    /// `paths` (stored lowercased) match the lowercased path.
    pub(crate) ignore_case: bool,
    /// An exact path also matches with a `/` at the end.
    pub(crate) ignore_trailing_slash: bool,
    pub(crate) methods: Vec<Method>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdentityMatch {
    Exact(String),
    /// A namespace or a trust domain: everything under `spiffe://td/ns/x/` or `spiffe://td/`.
    Prefix(String),
    AnyAuthenticated,
}

impl IdentityMatch {
    pub(crate) fn matches(&self, id: &str) -> bool {
        match self {
            IdentityMatch::Exact(exact) => exact == id,
            IdentityMatch::Prefix(prefix) => id.starts_with(prefix.as_str()),
            IdentityMatch::AnyAuthenticated => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathMatch {
    Exact(String),
    Prefix(String),
}

pub(crate) fn identity(
    config: Option<&api::Identity>,
    control_plane: Option<&ControlPlaneSettings>,
) -> Result<Option<IdentitySettings>, ConfigError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let trust_domain = match config.trust_domain.trim() {
        "" => DEFAULT_TRUST_DOMAIN.to_owned(),
        td if valid_name(td, true) => td.to_ascii_lowercase(),
        td => {
            return Err(ConfigError::new(
                "identity.trust_domain",
                format!(
                    "{td:?} is not a trust domain; expected a DNS-like name such as cluster.local"
                ),
            ))
        }
    };
    let namespace = pick(
        &config.namespace,
        control_plane.map(|c| c.namespace.as_str()),
    );
    let service_account = pick(
        &config.service_account,
        control_plane.map(|c| c.service_account.as_str()),
    );
    for (field, value) in [
        ("namespace", namespace),
        ("service_account", service_account),
    ] {
        if value.is_empty() {
            return Err(ConfigError::new(
                format!("identity.{field}"),
                "is required (here or in control_plane) to name the proxy's identity",
            ));
        }
        if !valid_name(value, false) {
            return Err(ConfigError::new(
                format!("identity.{field}"),
                format!("{value:?} may hold only letters, digits, '-', '.' and '_'"),
            ));
        }
    }
    let trust_anchors = trust_anchors(config)?;
    let (ca_addresses, ca_transport) = if config.ca_addresses.is_empty() {
        match control_plane {
            Some(cp) => (cp.addresses.clone(), cp.transport.clone()),
            None => return Err(ConfigError::new(
                "identity.ca_addresses",
                "at least one CA address (host:port) is required when there is no control_plane",
            )),
        }
    } else {
        let mut out = Vec::new();
        for (i, a) in config.ca_addresses.iter().enumerate() {
            out.push(super::host_port(a, &format!("identity.ca_addresses[{i}]"))?);
        }
        let identity = match config.ca_identity.trim() {
            "" => control_plane.and_then(|cp| match &cp.transport {
                Transport::Tls { identity } => Some(identity.to_string()),
                Transport::Plaintext => None,
            }),
            id => Some(id.to_owned()),
        };
        let transport = super::transport(
            config.ca_plaintext,
            identity.as_deref().unwrap_or(""),
            &trust_domain,
            "identity.ca_identity",
        )?;
        (out, transport)
    };
    if config.token_file.trim().is_empty() {
        return Err(ConfigError::new(
            "identity.token_file",
            "is required: the file holding this workload's proof of identity for the CA",
        ));
    }
    Ok(Some(IdentitySettings {
        id: Arc::from(format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        )),
        trust_domain,
        trust_anchors,
        ca_addresses,
        ca_transport,
        token_file: PathBuf::from(config.token_file.trim()),
    }))
}

fn pick<'a>(own: &'a str, fallback: Option<&'a str>) -> &'a str {
    match own.trim() {
        "" => fallback.unwrap_or("").trim(),
        own => own,
    }
}

fn valid_name(value: &str, dns: bool) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || (!dns && c == '_'))
}

fn trust_anchors(config: &api::Identity) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let (pem, field) = match (
        config.trust_anchors_pem.trim().is_empty(),
        config.trust_anchors_file.trim().is_empty(),
    ) {
        (false, true) => (
            config.trust_anchors_pem.clone().into_bytes(),
            "identity.trust_anchors_pem",
        ),
        (true, false) => {
            let path = config.trust_anchors_file.trim();
            let bytes = std::fs::read(path).map_err(|e| {
                ConfigError::new(
                    "identity.trust_anchors_file",
                    format!("cannot read {path:?}: {e}"),
                )
            })?;
            (bytes, "identity.trust_anchors_file")
        }
        (true, true) => return Err(ConfigError::new(
            "identity",
            "trust_anchors_pem or trust_anchors_file is required (the mesh's root certificates)",
        )),
        (false, false) => {
            return Err(ConfigError::new(
                "identity",
                "set only one of trust_anchors_pem and trust_anchors_file",
            ))
        }
    };
    let mut anchors = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| {
            ConfigError::new(field, format!("certificate {i} is not valid PEM: {e}"))
        })?;
        x509_parser::parse_x509_certificate(&cert).map_err(|e| {
            ConfigError::new(
                field,
                format!("certificate {i} is not an X.509 certificate: {e}"),
            )
        })?;
        // rustls only takes anchors it can parse; check now so a reload fails cleanly.
        webpki_anchor(&cert).map_err(|e| {
            ConfigError::new(
                field,
                format!("certificate {i} cannot be a trust anchor: {e}"),
            )
        })?;
        anchors.push(cert);
    }
    if anchors.is_empty() {
        return Err(ConfigError::new(
            field,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(anchors)
}

fn webpki_anchor(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let mut store = rustls::RootCertStore::empty();
    store.add(cert.clone())
}

pub(crate) fn tls_mode(value: i32, at: &str) -> Result<TlsMode, ConfigError> {
    match api::TlsMode::try_from(value) {
        Ok(api::TlsMode::Permissive) => Ok(TlsMode::Permissive),
        Ok(api::TlsMode::Strict) => Ok(TlsMode::Strict),
        Ok(api::TlsMode::Disabled) => Ok(TlsMode::Disabled),
        Err(_) => Err(ConfigError::new(
            format!("{at}.tls"),
            format!("unknown TLS mode {value}; expected PERMISSIVE, STRICT or DISABLED"),
        )),
    }
}

/// A SPIFFE id as the mesh spells it (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), or the reason it is not one.
pub(crate) fn check_spiffe_id(value: &str) -> Result<(), String> {
    let rest = value
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{value:?} is not a SPIFFE id; expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [td, "ns", ns, "sa", sa] if valid_name(td, true) && valid_name(ns, false) && valid_name(sa, false) => Ok(()),
        _ => Err(format!("{value:?} is not a SPIFFE id; expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")),
    }
}

/// The policies that apply to this proxy: those whose `servers` match its own
/// identity `own_id` (a proxy without one takes only policies with no `servers`).
/// Listener names are checked only when `check_listeners` (policies from the proxy's
/// own file; a control plane's mesh-wide ones may name listeners other proxies have).
pub(crate) fn authorization(
    config: Option<&api::Authorization>,
    listeners: &HashSet<String>,
    own_id: Option<&str>,
    check_listeners: bool,
) -> Result<AuthorizationSettings, ConfigError> {
    let Some(config) = config else {
        return Ok(AuthorizationSettings::default());
    };
    let default = match api::authorization::Default::try_from(config.default_policy) {
        Ok(api::authorization::Default::AllUnauthenticated) => DefaultPolicy::AllUnauthenticated,
        Ok(api::authorization::Default::AllAuthenticated) => DefaultPolicy::AllAuthenticated,
        Ok(api::authorization::Default::Deny) => DefaultPolicy::Deny,
        Err(_) => {
            return Err(ConfigError::new(
                "authorization.default_policy",
                format!(
                    "unknown default {}; expected ALL_UNAUTHENTICATED, ALL_AUTHENTICATED or DENY",
                    config.default_policy
                ),
            ))
        }
    };
    let mut names = HashSet::new();
    let mut policies = Vec::with_capacity(config.policies.len());
    for (i, p) in config.policies.iter().enumerate() {
        let at = format!("authorization.policies[{i}]");
        let name = p.name.trim();
        if name.is_empty() {
            return Err(ConfigError::new(format!("{at}.name"), "is required"));
        }
        if !names.insert(name.to_owned()) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate policy name {name:?}"),
            ));
        }
        let mut servers = Vec::new();
        for (j, id) in p.servers.iter().enumerate() {
            servers.push(identity_match(id.trim(), &format!("{at}.servers[{j}]"))?);
        }
        if !servers.is_empty() && !own_id.is_some_and(|id| servers.iter().any(|m| m.matches(id))) {
            continue; // for other proxies of the mesh
        }
        for (j, l) in p.listeners.iter().enumerate() {
            if check_listeners && servers.is_empty() && !listeners.contains(l) {
                return Err(ConfigError::new(
                    format!("{at}.listeners[{j}]"),
                    format!("no listener is named {l:?}"),
                ));
            }
        }
        let mut identities = Vec::new();
        for (j, id) in p.identities.iter().enumerate() {
            identities.push(identity_match(id.trim(), &format!("{at}.identities[{j}]"))?);
        }
        let mut paths = Vec::new();
        for (j, path) in p.paths.iter().enumerate() {
            let path = path.trim();
            if !path.starts_with('/') {
                return Err(ConfigError::new(
                    format!("{at}.paths[{j}]"),
                    format!("{path:?} is not a path; expected /exact or /prefix/*"),
                ));
            }
            let path = if p.ignore_case {
                path.to_lowercase()
            } else {
                path.to_owned()
            };
            paths.push(match path.strip_suffix('*') {
                Some(prefix) => PathMatch::Prefix(prefix.to_owned()),
                None => PathMatch::Exact(path.to_owned()),
            });
        }
        let mut methods = Vec::new();
        for (j, m) in p.methods.iter().enumerate() {
            let method =
                Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                    ConfigError::new(
                        format!("{at}.methods[{j}]"),
                        format!("{m:?} is not an HTTP method"),
                    )
                })?;
            methods.push(method);
        }
        let deny = match api::authorization_policy::Action::try_from(p.action) {
            Ok(api::authorization_policy::Action::Allow) => false,
            Ok(api::authorization_policy::Action::Deny) => true,
            Err(_) => {
                return Err(ConfigError::new(
                    format!("{at}.action"),
                    format!("unknown action {}; expected ALLOW or DENY", p.action),
                ))
            }
        };
        policies.push(Arc::new(PolicySettings {
            name: Arc::from(name),
            deny,
            listeners: p.listeners.clone(),
            identities,
            unauthenticated: p.unauthenticated,
            paths,
            ignore_case: p.ignore_case,
            ignore_trailing_slash: p.ignore_trailing_slash,
            methods,
        }));
    }
    Ok(AuthorizationSettings::new(default, policies))
}

fn identity_match(value: &str, at: &str) -> Result<IdentityMatch, ConfigError> {
    if value == "*" {
        return Ok(IdentityMatch::AnyAuthenticated);
    }
    if let Some(prefix) = value.strip_suffix('*') {
        let rest = prefix.strip_prefix("spiffe://").unwrap_or("");
        let parts: Vec<&str> = rest.split('/').collect();
        let valid = match parts.as_slice() {
            [td, ""] => valid_name(td, true),
            [td, "ns", ns, ""] => valid_name(td, true) && valid_name(ns, false),
            _ => false,
        };
        if !valid {
            return Err(ConfigError::new(
                at,
                format!("{value:?} is not an identity pattern; expected spiffe://<trust-domain>/* or spiffe://<trust-domain>/ns/<namespace>/*"),
            ));
        }
        return Ok(IdentityMatch::Prefix(prefix.to_owned()));
    }
    check_spiffe_id(value).map_err(|e| ConfigError::new(at, e))?;
    Ok(IdentityMatch::Exact(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError, Settings};

    fn settings(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_config(parse(text)?)
    }

    // A real self-signed certificate, so the anchor parses like a mesh's would.
    fn anchor_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("certificate").pem()
    }

    fn meshed(extra: &str) -> String {
        let anchor = anchor_pem().replace('\n', "\\n");
        format!(
            r#"{{"listeners": [{{"name": "in", "address": "127.0.0.1:0", "direction": "INBOUND", "defaultService": "app", "tls": "STRICT"}}],
               "services": [{{"name": "app", "endpoints": [{{"address": "127.0.0.1:8080", "identity": "spiffe://cluster.local/ns/a/sa/b"}}]}}],
               "identity": {{"trustAnchorsPem": "{anchor}", "caAddresses": ["127.0.0.1:4200"], "tokenFile": "/t",
                            "namespace": "shop", "serviceAccount": "web"}}{extra}}}"#
        )
    }

    #[test]
    fn an_identity_is_named_from_its_parts() {
        let s = settings(&meshed("")).unwrap();
        let id = s.identity.unwrap();
        assert_eq!(&*id.id, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.trust_anchors.len(), 1);
        assert_eq!(s.listeners[0].tls, super::TlsMode::Strict);
        assert_eq!(
            s.services[0].endpoints[0].identity.as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/b")
        );
    }

    #[test]
    fn mesh_wide_policies_apply_to_their_servers_only() {
        let s = settings(&meshed(
            r#", "authorization": {"policies": [
                {"name": "ours", "servers": ["spiffe://cluster.local/ns/shop/*"], "listeners": ["elsewhere"]},
                {"name": "theirs", "servers": ["spiffe://cluster.local/ns/other/sa/x"]},
                {"name": "everyone"}]}"#,
        ))
        .unwrap();
        let names: Vec<&str> = s.authorization.policies.iter().map(|p| &*p.name).collect();
        assert_eq!(names, ["ours", "everyone"]);
    }

    #[test]
    fn bad_security_settings_name_their_path() {
        let cases = [
            (
                meshed("").replace("spiffe://cluster.local/ns/a/sa/b", "web"),
                "services[0].endpoints[0].identity",
                "not a SPIFFE id",
            ),
            (
                meshed("").replace("CERTIFICATE", "NONSENSE"),
                "identity.trust_anchors_pem",
                "no PEM certificate",
            ),
            (
                meshed(
                    r#", "authorization": {"policies": [{"name": "p", "listeners": ["nope"]}]}"#,
                ),
                "authorization.policies[0].listeners[0]",
                "no listener",
            ),
            (
                meshed(
                    r#", "authorization": {"policies": [{"name": "p", "identities": ["spiffe://x/ns/*/sa"]}]}"#,
                ),
                "authorization.policies[0].identities[0]",
                "not a SPIFFE id",
            ),
            (
                meshed(r#", "authorization": {"policies": [{"name": "p"}, {"name": "p"}]}"#),
                "authorization.policies[1].name",
                "duplicate",
            ),
            (
                meshed("").replace(r#""tokenFile": "/t","#, ""),
                "identity.token_file",
                "is required",
            ),
        ];
        for (text, path, message) in cases {
            let err = settings(&text).unwrap_err();
            assert_eq!(err.path, path, "{err}");
            assert!(err.message.contains(message), "{err}");
        }
    }
}
