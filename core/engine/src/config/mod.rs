//! Reading and checking proxy configuration: a `ProxyConfig` (from a file or a control
//! plane) is parsed, and turned into validated settings with every default applied.
//!
//! Decoding follows the protobuf JSON mapping (pbjson) for both JSON and YAML text, and
//! every error names the field path where it was found, for example
//! `services[2].endpoints[0].address: not a socket address`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use pymesh_api::config::v1 as api;

pub(crate) mod policy;
pub(crate) mod security;

pub use api::ProxyConfig;
pub(crate) use policy::ServicePolicy;
pub(crate) use security::{AuthorizationSettings, IdentitySettings, TlsMode};

/// A configuration that was rejected, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The field path, such as `services[2].endpoints[0].address`; empty for the document.
    pub path: String,
    /// What is wrong there, and what would be valid.
    pub message: String,
}

impl ConfigError {
    /// An error at `path` (empty for the whole document).
    pub fn new(path: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            path: path.into(),
            message: message.to_string(),
        }
    }

    fn render(&self) -> String {
        if self.path.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        }
    }
}

/// Parses JSON or YAML text in the protobuf JSON mapping of `ProxyConfig`.
pub fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        let config = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
        de.end().map_err(|e| ConfigError::new("", e))?;
        Ok(config)
    } else if trimmed.is_empty() {
        Err(ConfigError::new("", "the configuration is empty"))
    } else {
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(path_error)
    }
}

fn path_error<E: fmt::Display>(err: serde_path_to_error::Error<E>) -> ConfigError {
    let path = err.path().to_string();
    let path = if path == "." { String::new() } else { path };
    ConfigError::new(path, err.inner())
}

/// Reads and parses a config file.
pub fn load_file(path: &std::path::Path) -> Result<ProxyConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
    parse(&text)
}

/// The config as the protobuf JSON mapping, as `/config` serves it.
pub fn to_json(config: &ProxyConfig) -> String {
    serde_json::to_string_pretty(config).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Checks a config as a proxy would before running it, without running it.
pub fn validate(config: &ProxyConfig) -> Result<(), ConfigError> {
    Settings::from_config(config.clone()).map(|_| ())
}

pub(crate) const DEFAULT_ADMIN: &str = "127.0.0.1:4191";
const MIN_HEADER_BYTES: u32 = 8 * 1024;

/// A validated configuration, with every default applied.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) source: ProxyConfig,
    pub(crate) listeners: Vec<Arc<ListenerSettings>>,
    pub(crate) services: Vec<Arc<ServiceSettings>>,
    pub(crate) admin: SocketAddr,
    /// The admin endpoint serves `PUT /config` and `POST /shutdown`.
    pub(crate) admin_mutations: bool,
    pub(crate) limits: Limits,
    /// Proxy-wide timeouts (detection uses these; services start from them).
    pub(crate) timeouts: Timeouts,
    pub(crate) control_plane: Option<ControlPlaneSettings>,
    pub(crate) identity: Option<IdentitySettings>,
    pub(crate) authorization: Arc<AuthorizationSettings>,
}

/// How the proxy reaches the control plane (Discovery and the CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transport {
    /// TLS 1.3, the server's chain checked against the trust anchors and its SPIFFE
    /// identity required to be `identity`.
    Tls { identity: Arc<str> },
    /// Plaintext, for local development only.
    Plaintext,
}

/// The control plane's identity when none is configured.
pub(crate) fn default_control_plane_identity(trust_domain: &str) -> Arc<str> {
    Arc::from(format!(
        "spiffe://{trust_domain}/ns/pymesh-system/sa/pymesh-control"
    ))
}

/// Where services and endpoints come from when a control plane is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ControlPlaneSettings {
    /// `http://host:port` of each replica (the scheme tonic dials; TLS is the transport's).
    pub(crate) addresses: Vec<String>,
    pub(crate) transport: Transport,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
    pub(crate) workload: String,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// How a listener decides what a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerProtocol {
    Detect,
    Http1,
    Http2,
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenerSettings {
    /// Unique; a reload keeps a listener running when its name and address stay.
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) direction: Direction,
    pub(crate) default_service: Option<String>,
    pub(crate) protocol: ListenerProtocol,
    pub(crate) tls: TlsMode,
    /// Connections arrive redirected by netfilter and are decided by their original
    /// destination (see `transparent`).
    pub(crate) transparent: bool,
    /// Original destination ports copied as opaque TCP without detection.
    pub(crate) opaque_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceSettings {
    pub(crate) name: String,
    /// Lower-cased `host` or `host:port` values, the name first.
    pub(crate) authorities: Vec<String>,
    pub(crate) endpoints: Vec<EndpointSettings>,
    /// The address applications dial for this service (transparent outbound).
    pub(crate) virtual_ip: Option<IpAddr>,
    pub(crate) timeouts: Timeouts,
    pub(crate) policy: ServicePolicy,
}

impl ServiceSettings {
    /// A service of one endpoint, `addr`, with the proxy-wide defaults: where a
    /// transparent listener sends a destination that no service claims, and how it
    /// reaches the local application inbound. Named by the address, for metrics.
    pub(crate) fn destination(addr: SocketAddr, timeouts: Timeouts) -> Self {
        let name = addr.to_string();
        Self {
            authorities: vec![name.clone()],
            name,
            endpoints: vec![EndpointSettings {
                addr,
                weight: 1,
                identity: None,
            }],
            virtual_ip: None,
            timeouts,
            policy: ServicePolicy::default(),
        }
    }

    /// This service narrowed to its endpoint `addr`, for an application that dialed that
    /// endpoint itself: the service's policy and identity, and no other endpoint.
    pub(crate) fn narrowed_to(&self, addr: SocketAddr) -> Option<Self> {
        let endpoint = self.endpoints.iter().find(|e| e.addr == addr)?;
        Some(Self {
            endpoints: vec![endpoint.clone()],
            ..self.clone()
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointSettings {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    /// The SPIFFE identity of a meshed endpoint: reached over mutual TLS.
    pub(crate) identity: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    /// `None` when disabled.
    pub(crate) request: Option<Duration>,
    pub(crate) idle: Duration,
    pub(crate) detect: Duration,
    /// One try of a request, when set.
    pub(crate) per_try: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            request: Some(Duration::from_secs(10)),
            idle: Duration::from_secs(90),
            detect: Duration::from_secs(1),
            per_try: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
        }
    }
}

impl Settings {
    /// Validates a config, returning the first problem found with its field path.
    pub(crate) fn from_config(config: ProxyConfig) -> Result<Self, ConfigError> {
        let defaults = timeouts(Timeouts::default(), config.timeouts.as_ref(), "timeouts")?;
        let limits = limits(config.limits.as_ref())?;
        let admin = match config.admin.as_ref().map(|a| a.address.as_str()) {
            None | Some("") => DEFAULT_ADMIN
                .parse()
                .expect("the default admin address parses"),
            Some(addr) => socket_addr(addr, "admin.address")?,
        };

        let mut services = Vec::with_capacity(config.services.len());
        let mut names = HashSet::new();
        let mut owners: HashMap<String, String> = HashMap::new();
        let mut virtual_ips: HashMap<IpAddr, String> = HashMap::new();
        for (i, svc) in config.services.iter().enumerate() {
            let at = format!("services[{i}]");
            let service = service(svc, &at, defaults)?;
            if let Some(ip) = service.virtual_ip {
                if let Some(other) = virtual_ips.insert(ip, service.name.clone()) {
                    return Err(ConfigError::new(
                        format!("{at}.virtual_ip"),
                        format!("{ip} is already the virtual IP of service {other:?}"),
                    ));
                }
            }
            if !names.insert(service.name.clone()) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!("duplicate service name {:?}", service.name),
                ));
            }
            for (j, authority) in service.authorities.iter().enumerate() {
                if let Some(other) = owners.insert(authority.clone(), service.name.clone()) {
                    if other != service.name {
                        let field = if j == 0 {
                            format!("{at}.name")
                        } else {
                            format!("{at}.authorities[{}]", j - 1)
                        };
                        return Err(ConfigError::new(
                            field,
                            format!("authority {authority:?} already routes to service {other:?}"),
                        ));
                    }
                }
            }
            services.push(Arc::new(service));
        }

        if config.listeners.is_empty() {
            return Err(ConfigError::new(
                "listeners",
                "at least one listener is required, for example {address: \"127.0.0.1:4140\"}",
            ));
        }
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut bound = HashSet::new();
        let mut listener_names = HashSet::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            let listener = listener(l, &at, i, &names)?;
            if !listener_names.insert(listener.name.clone()) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!("duplicate listener name {:?}", listener.name),
                ));
            }
            // Port 0 asks the OS for a free port, so it never collides.
            let fixed = listener.addr.port() != 0;
            if fixed && (!bound.insert(listener.addr) || listener.addr == admin) {
                return Err(ConfigError::new(
                    format!("{at}.address"),
                    format!(
                        "{} is already used by another listener or the admin endpoint",
                        listener.addr
                    ),
                ));
            }
            listeners.push(Arc::new(listener));
        }

        let trust_domain = config
            .identity
            .as_ref()
            .map(|i| i.trust_domain.trim().to_ascii_lowercase())
            .filter(|td| !td.is_empty())
            .unwrap_or_else(|| security::DEFAULT_TRUST_DOMAIN.to_owned());
        let control_plane = control_plane(config.control_plane.as_ref(), &trust_domain)?;
        let identity = security::identity(config.identity.as_ref(), control_plane.as_ref())?;
        if let (Some(cp), None) = (&control_plane, &identity) {
            if cp.transport != Transport::Plaintext {
                return Err(ConfigError::new(
                    "control_plane.plaintext",
                    "the control plane is reached over mutual TLS, which needs this proxy's `identity` (trust anchors and a certificate from the CA); set `plaintext: true` only for local development",
                ));
            }
        }
        if let Some(i) = listeners
            .iter()
            .position(|l| l.tls == TlsMode::Strict && l.direction == Direction::Outbound)
        {
            return Err(ConfigError::new(
                format!("listeners[{i}].tls"),
                "STRICT applies to INBOUND listeners (where mesh TLS is terminated)",
            ));
        }
        if identity.is_none() {
            if let Some(i) = listeners.iter().position(|l| l.tls == TlsMode::Strict) {
                return Err(ConfigError::new(
                    format!("listeners[{i}].tls"),
                    "STRICT needs the proxy to have an `identity` (mutual TLS); without one it could only serve plaintext",
                ));
            }
        }
        let authorization = Arc::new(security::authorization(
            config.authorization.as_ref(),
            &listener_names,
            identity.as_ref().map(|i| &*i.id),
            // With a control plane, policy may come from it, mesh-wide.
            control_plane.is_none(),
        )?);
        Ok(Self {
            listeners,
            services,
            admin,
            admin_mutations: config.admin.as_ref().is_some_and(|a| a.enable_mutations),
            limits,
            timeouts: defaults,
            control_plane,
            identity,
            authorization,
            source: config,
        })
    }
}

fn socket_addr(value: &str, path: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            path,
            format!("{value:?} is not a socket address; expected IP:port such as 127.0.0.1:8080 or [::1]:8080"),
        )
    })
}

fn listener(
    l: &api::Listener,
    at: &str,
    index: usize,
    services: &HashSet<String>,
) -> Result<ListenerSettings, ConfigError> {
    if l.address.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.address"),
            "is required (IP:port)",
        ));
    }
    let addr = socket_addr(&l.address, &format!("{at}.address"))?;
    let direction = match api::Direction::try_from(l.direction) {
        Ok(api::Direction::Inbound) => Direction::Inbound,
        Ok(api::Direction::Outbound | api::Direction::Unspecified) => Direction::Outbound,
        Err(_) => {
            return Err(ConfigError::new(
                format!("{at}.direction"),
                format!(
                    "unknown direction {}; expected INBOUND or OUTBOUND",
                    l.direction
                ),
            ))
        }
    };
    let protocol = match api::Protocol::try_from(l.protocol) {
        Ok(api::Protocol::Unspecified) => ListenerProtocol::Detect,
        Ok(api::Protocol::Http1) => ListenerProtocol::Http1,
        Ok(api::Protocol::Http2) => ListenerProtocol::Http2,
        Ok(api::Protocol::Opaque) => ListenerProtocol::Opaque,
        Err(_) => {
            return Err(ConfigError::new(
                format!("{at}.protocol"),
                format!(
                    "unknown protocol {}; expected HTTP1, HTTP2 or OPAQUE",
                    l.protocol
                ),
            ))
        }
    };
    let default_service = if l.default_service.is_empty() {
        None
    } else if services.contains(&l.default_service) {
        Some(l.default_service.clone())
    } else {
        return Err(ConfigError::new(
            format!("{at}.default_service"),
            format!("no service is named {:?}", l.default_service),
        ));
    };
    // A transparent listener takes its target from each connection's original destination.
    if default_service.is_none()
        && !l.transparent
        && (direction == Direction::Inbound || protocol == ListenerProtocol::Opaque)
    {
        return Err(ConfigError::new(
            format!("{at}.default_service"),
            "is required for INBOUND and OPAQUE listeners that are not transparent (the service that takes their traffic)",
        ));
    }
    let mut opaque_ports = Vec::with_capacity(l.opaque_ports.len());
    for (j, &port) in l.opaque_ports.iter().enumerate() {
        let path = format!("{at}.opaque_ports[{j}]");
        if !l.transparent {
            return Err(ConfigError::new(
                path,
                "applies to transparent listeners (ports of original destinations); set `transparent: true` or use `protocol: OPAQUE`",
            ));
        }
        match u16::try_from(port) {
            Ok(port) if port != 0 => opaque_ports.push(port),
            _ => {
                return Err(ConfigError::new(
                    path,
                    format!("{port} is not a port; expected 1 to 65535"),
                ))
            }
        }
    }
    Ok(ListenerSettings {
        // Listeners are matched by name across reloads; a port-0 address is not stable.
        name: match (l.name.is_empty(), addr.port()) {
            (false, _) => l.name.clone(),
            (true, 0) => format!("listener-{index}"),
            (true, _) => addr.to_string(),
        },
        addr,
        direction,
        default_service,
        protocol,
        tls: security::tls_mode(l.tls, at)?,
        transparent: l.transparent,
        opaque_ports,
    })
}

fn service(
    svc: &api::Service,
    at: &str,
    defaults: Timeouts,
) -> Result<ServiceSettings, ConfigError> {
    let name = svc.name.trim();
    if name.is_empty() {
        return Err(ConfigError::new(format!("{at}.name"), "is required"));
    }
    let mut authorities = vec![name.to_ascii_lowercase()];
    for (j, a) in svc.authorities.iter().enumerate() {
        let a = a.trim();
        if a.is_empty() || a.contains(['/', ' ', '@']) {
            return Err(ConfigError::new(
                format!("{at}.authorities[{j}]"),
                format!("{a:?} is not an authority; expected host or host:port"),
            ));
        }
        let a = a.to_ascii_lowercase();
        if !authorities.contains(&a) {
            authorities.push(a);
        }
    }
    let mut endpoints = Vec::with_capacity(svc.endpoints.len());
    for (j, e) in svc.endpoints.iter().enumerate() {
        let addr = socket_addr(&e.address, &format!("{at}.endpoints[{j}].address"))?;
        let identity = match e.identity.trim() {
            "" => None,
            id => {
                security::check_spiffe_id(id)
                    .map_err(|m| ConfigError::new(format!("{at}.endpoints[{j}].identity"), m))?;
                Some(Arc::from(id))
            }
        };
        endpoints.push(EndpointSettings {
            addr,
            weight: e.weight.max(1),
            identity,
        });
    }
    let virtual_ip = match svc.virtual_ip.trim() {
        "" => None,
        ip => Some(ip.parse::<IpAddr>().map_err(|_| {
            ConfigError::new(
                format!("{at}.virtual_ip"),
                format!("{ip:?} is not an IP address; expected one such as 10.240.0.7 (no port)"),
            )
        })?),
    };
    Ok(ServiceSettings {
        name: name.to_string(),
        authorities,
        endpoints,
        virtual_ip,
        timeouts: timeouts(defaults, svc.timeouts.as_ref(), &format!("{at}.timeouts"))?,
        policy: policy::service_policy(svc, at)?,
    })
}

fn duration(d: &pbjson_types::Duration, path: &str) -> Result<Duration, ConfigError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ConfigError::new(path, "must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn timeouts(base: Timeouts, t: Option<&api::Timeouts>, at: &str) -> Result<Timeouts, ConfigError> {
    let Some(t) = t else { return Ok(base) };
    let mut out = base;
    let positive = |d: &pbjson_types::Duration, field: &str| {
        let path = format!("{at}.{field}");
        let value = duration(d, &path)?;
        if value.is_zero() {
            return Err(ConfigError::new(path, "must be greater than 0s"));
        }
        Ok(value)
    };
    if let Some(d) = &t.connect {
        out.connect = positive(d, "connect")?;
    }
    if let Some(d) = &t.idle {
        out.idle = positive(d, "idle")?;
    }
    if let Some(d) = &t.detect {
        out.detect = positive(d, "detect")?;
    }
    if let Some(d) = &t.per_try {
        out.per_try = Some(positive(d, "per_try")?);
    }
    if let Some(d) = &t.request {
        let value = duration(d, &format!("{at}.request"))?;
        out.request = (!value.is_zero()).then_some(value);
    }
    Ok(out)
}

/// `host:port` (an `http://` or `https://` prefix allowed) as the `http://host:port`
/// tonic dials: whether TLS is used is the transport's setting, not the scheme's.
fn host_port(value: &str, path: &str) -> Result<String, ConfigError> {
    let a = value.trim();
    let a = a
        .strip_prefix("https://")
        .or_else(|| a.strip_prefix("http://"))
        .unwrap_or(a);
    let valid = a
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !valid {
        return Err(ConfigError::new(path, format!("{a:?} is not host:port")));
    }
    Ok(format!("http://{a}"))
}

/// How a control plane (or CA) is reached: plaintext, or TLS expecting `identity`
/// (else the default control-plane identity in `trust_domain`).
pub(crate) fn transport(
    plaintext: bool,
    identity: &str,
    trust_domain: &str,
    path: &str,
) -> Result<Transport, ConfigError> {
    if plaintext {
        return Ok(Transport::Plaintext);
    }
    let identity = match identity.trim() {
        "" => default_control_plane_identity(trust_domain),
        id => {
            security::check_spiffe_id(id).map_err(|e| ConfigError::new(path, e))?;
            Arc::from(id)
        }
    };
    Ok(Transport::Tls { identity })
}

fn control_plane(
    cp: Option<&api::ControlPlane>,
    trust_domain: &str,
) -> Result<Option<ControlPlaneSettings>, ConfigError> {
    let Some(cp) = cp else { return Ok(None) };
    if cp.addresses.is_empty() {
        return Err(ConfigError::new(
            "control_plane.addresses",
            "at least one address is required, for example 127.0.0.1:8086",
        ));
    }
    let mut addresses = Vec::with_capacity(cp.addresses.len());
    for (i, a) in cp.addresses.iter().enumerate() {
        addresses.push(host_port(a, &format!("control_plane.addresses[{i}]"))?);
    }
    let bound = |d: Option<&pbjson_types::Duration>, default: Duration, field: &str| match d {
        Some(d) => duration(d, &format!("control_plane.{field}")).map(|v| {
            if v.is_zero() {
                default
            } else {
                v
            }
        }),
        None => Ok(default),
    };
    let backoff_base = bound(
        cp.backoff_base.as_ref(),
        Duration::from_millis(100),
        "backoff_base",
    )?;
    let backoff_max = bound(
        cp.backoff_max.as_ref(),
        // Short enough that a returning control plane is back in use within seconds.
        Duration::from_secs(3),
        "backoff_max",
    )?;
    Ok(Some(ControlPlaneSettings {
        addresses,
        transport: transport(
            cp.plaintext,
            &cp.identity,
            trust_domain,
            "control_plane.identity",
        )?,
        namespace: if cp.namespace.is_empty() {
            "default".into()
        } else {
            cp.namespace.clone()
        },
        service_account: if cp.service_account.is_empty() {
            "default".into()
        } else {
            cp.service_account.clone()
        },
        workload: cp.workload.clone(),
        backoff_base,
        backoff_max: backoff_max.max(backoff_base),
    }))
}

fn limits(l: Option<&api::Limits>) -> Result<Limits, ConfigError> {
    let mut out = Limits::default();
    let Some(l) = l else { return Ok(out) };
    if l.max_header_bytes != 0 {
        if l.max_header_bytes < MIN_HEADER_BYTES {
            return Err(ConfigError::new(
                "limits.max_header_bytes",
                format!(
                    "{} is too small; the minimum is {MIN_HEADER_BYTES}",
                    l.max_header_bytes
                ),
            ));
        }
        out.max_header_bytes = l.max_header_bytes as usize;
    }
    if l.max_headers != 0 {
        out.max_headers = l.max_headers as usize;
    }
    if l.max_connections != 0 {
        out.max_connections = l.max_connections as usize;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_config(parse(text)?)
    }

    const GOOD: &str = r#"
listeners:
  - address: 127.0.0.1:4140
services:
  - name: web
    authorities: ["web.local:80"]
    endpoints: [{address: "127.0.0.1:8080"}]
    timeouts: {connect: 0.25s}
"#;

    #[test]
    fn yaml_and_json_decode_to_the_same_settings() {
        let yaml = settings(GOOD).unwrap();
        let json = serde_json::to_string(&yaml.source).unwrap();
        let again = settings(&json).unwrap();
        assert_eq!(yaml.services, again.services);
        assert_eq!(
            yaml.services[0].timeouts.connect,
            Duration::from_millis(250)
        );
        assert_eq!(yaml.services[0].authorities, vec!["web", "web.local:80"]);
        assert_eq!(yaml.admin.to_string(), DEFAULT_ADMIN);
    }

    #[test]
    fn bad_endpoint_address_names_its_path() {
        let err = settings(&GOOD.replace("127.0.0.1:8080", "nope")).unwrap_err();
        assert_eq!(err.path, "services[0].endpoints[0].address");
        assert!(err.message.contains("not a socket address"), "{err}");
    }

    #[test]
    fn unknown_field_names_its_path() {
        let err = settings(&GOOD.replace("timeouts: {connect", "timeouts: {conect")).unwrap_err();
        assert_eq!(err.path, "services[0].timeouts.conect");
        assert!(err.message.contains("unknown field `conect`"), "{err}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let err = settings(r#"{"listeners": [{"address": 5}]}"#).unwrap_err();
        assert_eq!(err.path, "listeners[0].address");
    }

    #[test]
    fn unknown_default_service_is_rejected() {
        let text = GOOD.replace(
            "- address: 127.0.0.1:4140",
            "- {address: 127.0.0.1:4140, defaultService: nope}",
        );
        let err = settings(&text).unwrap_err();
        assert_eq!(err.path, "listeners[0].default_service");
    }

    #[test]
    fn transparent_listener_fields_are_checked() {
        let listener = |fields: &str| {
            settings(&format!(
                "listeners: [{{address: 127.0.0.1:4143, {fields}}}]\n"
            ))
        };
        // Inbound and opaque transparent listeners need no default service.
        let ok = listener("direction: INBOUND, transparent: true, opaquePorts: [3306]").unwrap();
        assert_eq!(ok.listeners[0].opaque_ports, [3306]);
        assert!(listener("protocol: OPAQUE, transparent: true").is_ok());
        let err = listener("direction: INBOUND").unwrap_err();
        assert_eq!(err.path, "listeners[0].default_service");
        let err = listener("opaquePorts: [3306]").unwrap_err();
        assert_eq!(err.path, "listeners[0].opaque_ports[0]");
        assert!(err.message.contains("transparent"), "{err}");
        let err = listener("transparent: true, opaquePorts: [25, 70000]").unwrap_err();
        assert_eq!(err.path, "listeners[0].opaque_ports[1]");
        let err = listener("transparent: true, opaquePorts: [0]").unwrap_err();
        assert_eq!(err.path, "listeners[0].opaque_ports[0]");
    }

    #[test]
    fn virtual_ips_are_checked() {
        let with = |a: &str, b: &str| {
            settings(&format!(
                "listeners: [{{address: 127.0.0.1:4140}}]\nservices:\n  - {{name: a, virtualIp: \"{a}\"}}\n  - {{name: b, virtualIp: \"{b}\"}}\n"
            ))
        };
        let ok = with("10.240.0.1", "fd00::1").unwrap();
        assert_eq!(ok.services[1].virtual_ip, Some("fd00::1".parse().unwrap()));
        let err = with("10.240.0.1", "10.240.0.1").unwrap_err();
        assert_eq!(err.path, "services[1].virtual_ip");
        assert!(err.message.contains("\"a\""), "{err}");
        let err = with("10.240.0.1:80", "10.240.0.2").unwrap_err();
        assert_eq!(err.path, "services[0].virtual_ip");
    }

    #[test]
    fn conflicting_authorities_are_rejected() {
        let text = format!("{GOOD}  - name: api\n    authorities: [WEB]\n");
        let err = settings(&text).unwrap_err();
        assert_eq!(err.path, "services[1].authorities[0]");
        assert!(
            err.message.contains("already routes to service \"web\""),
            "{err}"
        );
    }

    #[test]
    fn header_limit_has_a_floor() {
        let text = format!("{GOOD}limits: {{maxHeaderBytes: 100}}\n");
        let err = settings(&text).unwrap_err();
        assert_eq!(err.path, "limits.max_header_bytes");
    }
}
