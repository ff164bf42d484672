//! Authorization of inbound traffic: who may use an
//! INBOUND listener, by client identity, by authenticated-or-not, and for HTTP by
//! path and method. DENY policies are checked first; then if any ALLOW policy
//! applies to the listener, the request must match one; otherwise the mesh-wide
//! default decides. Every decision is counted with the name of the policy that made it.

use std::sync::Arc;

use http::Method;
use prometheus_client::metrics::counter::Counter;

use crate::config::security::{AuthorizationSettings, DefaultPolicy, PathMatch, PolicySettings};
use crate::metrics::{tls_label, AuthzLabels, HandleCache, Label, Metrics};
use crate::state::State;

/// What a request (or, for opaque TCP, a connection) is checked on.
pub(crate) struct Subject<'a> {
    pub(crate) listener: &'a str,
    /// The client's mesh identity, when it came over mesh TLS.
    pub(crate) client: Option<&'a str>,
    /// Method and path, for HTTP.
    pub(crate) request: Option<(&'a Method, &'a str)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) allowed: bool,
    pub(crate) policy: Arc<str>,
}

/// Decides whether `client` may use `listener` (for HTTP: make `request`), and counts
/// the decision. HTTP and opaque TCP are both authorized here.
pub(crate) fn authorize(
    state: &State,
    settings: &AuthorizationSettings,
    listener: &Arc<str>,
    client: Option<&Arc<str>>,
    request: Option<(&Method, &str)>,
) -> Decision {
    let subject = Subject {
        listener,
        client: client.map(|c| &**c),
        request,
    };
    let decision = decide(settings, &subject);
    let protocol = if request.is_some() { "http" } else { "tcp" };
    state
        .authz_counters
        .record(&state.metrics, listener, protocol, client, &decision);
    decision
}

pub(crate) fn decide(settings: &AuthorizationSettings, subject: &Subject<'_>) -> Decision {
    let applicable = || {
        settings
            .policies
            .iter()
            .filter(|p| p.listeners.is_empty() || p.listeners.iter().any(|l| l == subject.listener))
    };
    // Paths are matched as an application would read them, not as sent: `/a/../admin`,
    // `//admin` and `/%61dmin` are all `/admin`. Only worked out when a policy looks at paths.
    let by_path = applicable().any(|p| !p.paths.is_empty());
    let normalised = subject.request.map(|(method, path)| {
        let path = if by_path {
            normalise_path(path)
        } else {
            String::new()
        };
        (method, path)
    });
    let request = normalised.as_ref().map(|(m, p)| (*m, p.as_str()));
    if let Some(p) = applicable().find(|p| p.deny && matches(p, subject.client, request, true)) {
        return Decision {
            allowed: false,
            policy: p.name.clone(),
        };
    }
    let mut allows = applicable().filter(|p| !p.deny).peekable();
    if allows.peek().is_some() {
        return match allows.find(|p| matches(p, subject.client, request, false)) {
            Some(p) => Decision {
                allowed: true,
                policy: p.name.clone(),
            },
            None => Decision {
                allowed: false,
                policy: settings.no_match_name.clone(),
            },
        };
    }
    let allowed = match settings.default {
        DefaultPolicy::AllUnauthenticated => true,
        DefaultPolicy::AllAuthenticated => subject.client.is_some(),
        DefaultPolicy::Deny => false,
    };
    Decision {
        allowed,
        policy: settings.default_name.clone(),
    }
}

/// Whether `policy` covers this client and request. Opaque TCP (no request) can't be
/// checked against paths or methods: such a DENY counts as matching and such an ALLOW
/// as not (`deny` says which is being asked), so a client that makes detection give up
/// (by staying silent) gains nothing.
fn matches(
    policy: &PolicySettings,
    client: Option<&str>,
    request: Option<(&Method, &str)>,
    deny: bool,
) -> bool {
    let client_matches = if policy.identities.is_empty() && !policy.unauthenticated {
        true
    } else {
        match client {
            Some(id) => policy.identities.iter().any(|m| m.matches(id)),
            None => policy.unauthenticated,
        }
    };
    if !client_matches {
        return false;
    }
    let Some((method, path)) = request else {
        return deny || (policy.paths.is_empty() && policy.methods.is_empty());
    };
    (policy.methods.is_empty()
        || policy
            .methods
            .iter()
            .any(|m| m.as_str().eq_ignore_ascii_case(method.as_str())))
        && (policy.paths.is_empty() || path_matches(policy, path))
}

fn path_matches(policy: &PolicySettings, path: &str) -> bool {
    let lowered;
    let path = if policy.ignore_case {
        lowered = path.to_lowercase();
        lowered.as_str()
    } else {
        path
    };
    let unslashed = match path.strip_suffix('/') {
        Some(p) if policy.ignore_trailing_slash && !p.is_empty() => p,
        _ => path,
    };
    policy.paths.iter().any(|p| match p {
        PathMatch::Exact(exact) => exact == path || exact == unslashed,
        PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
    })
}

/// Whether any policy for `listener` reads paths: then paths must be unambiguous.
pub(crate) fn reads_paths(settings: &AuthorizationSettings, listener: &str) -> bool {
    settings.policies.iter().any(|p| {
        !p.paths.is_empty() && (p.listeners.is_empty() || p.listeners.iter().any(|l| l == listener))
    })
}

/// What makes `path` readable in more than one way, if anything. Path policies decide on
/// one reading, and the application may resolve another (Werkzeug `/admin/..%2fx`, Tomcat
/// `/static/..;/admin`, Windows `/admin.`), so such a path is refused, not forwarded.
pub(crate) fn ambiguous_path(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    let checks: [(bool, &'static str); 8] = [
        (path.contains('\\'), "a backslash"),
        (path.contains(';'), "a `;` (path parameters)"),
        (lower.contains("%2e"), "an encoded `.`"),
        (
            lower.contains("%2f") || lower.contains("%5c"),
            "an encoded slash",
        ),
        (lower.contains("%00"), "an encoded NUL"),
        (path.contains("//"), "an empty segment (`//`)"),
        (
            path.split('/').any(|s| s == "." || s == ".."),
            "a dot segment",
        ),
        (
            path.split('/').any(|s| s.len() > 1 && s.ends_with('.')),
            "a segment ending in `.`",
        ),
    ];
    if let Some((_, what)) = checks.iter().find(|(found, _)| *found) {
        return Some(what);
    }
    let decoded = percent_decode(path);
    if decoded.iter().any(|b| b.is_ascii_control()) {
        return Some("a control character");
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Some("bytes that are not UTF-8");
    }
    None
}

fn percent_decode(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                decoded.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    decoded
}

/// The path as an application would resolve it: percent-decoded (`%2F` and `%5C`
/// included), backslashes as slashes, repeated slashes merged, `.` and `..` resolved.
pub(crate) fn normalise_path(path: &str) -> String {
    let decoded = percent_decode(path);
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    out
}

type CounterKey = (Arc<str>, &'static str, Arc<str>, bool, Option<Arc<str>>);

/// Counts decisions without taking the metric family's lock on the request path.
#[derive(Default)]
pub(crate) struct DecisionCounters {
    cache: HandleCache<CounterKey, Counter>,
}

impl DecisionCounters {
    pub(crate) fn record(
        &self,
        metrics: &Metrics,
        listener: &Arc<str>,
        protocol: &'static str,
        client: Option<&Arc<str>>,
        decision: &Decision,
    ) {
        let key = (
            listener.clone(),
            protocol,
            decision.policy.clone(),
            decision.allowed,
            client.cloned(),
        );
        let make = || {
            metrics
                .authz
                .get_or_create(&AuthzLabels {
                    listener: Label(listener.clone()),
                    protocol,
                    policy: Label(decision.policy.clone()),
                    decision: if decision.allowed { "allow" } else { "deny" },
                    tls: tls_label(client.is_some()),
                    client_id: client.map(|c| Label(c.clone())),
                })
                .clone()
        };
        self.cache.with(&key, make, |c| {
            c.inc();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::security::authorization;
    use pymesh_api::config::v1 as api;

    fn settings(default: i32, policies: Vec<api::AuthorizationPolicy>) -> AuthorizationSettings {
        let listeners = ["in".to_owned()].into_iter().collect();
        authorization(
            Some(&api::Authorization {
                default_policy: default,
                policies,
            }),
            &listeners,
            None,
            true,
        )
        .expect("valid")
    }

    fn http<'a>(client: Option<&'a str>, method: &'a Method, path: &'a str) -> Subject<'a> {
        Subject {
            listener: "in",
            client,
            request: Some((method, path)),
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/web/sa/api";
    const OPS: &str = "spiffe://cluster.local/ns/ops/sa/admin";

    #[test]
    fn ambiguous_paths_are_named_and_plain_ones_pass() {
        for path in [
            "/admin/../x",
            "/admin/%2E%2e/x",
            "/admin/..%2fx",
            "/a;b",
            "/x\\admin",
            "//admin",
            "/internal.",
            "/internal%00",
            "/%ff",
            "/a/./b",
        ] {
            assert!(ambiguous_path(path).is_some(), "{path}");
        }
        for path in [
            "/",
            "/admin",
            "/files/my%20doc",
            "/v1.2/x",
            "/%61dmin",
            "/a-b_c~d",
        ] {
            assert_eq!(ambiguous_path(path), None, "{path}");
        }
    }

    #[test]
    fn case_and_trailing_slash_options_widen_exact_paths() {
        let get = Method::GET;
        let policy = |ignore: bool| api::AuthorizationPolicy {
            name: "no-internal".into(),
            action: 1,
            paths: vec!["/Internal".into()],
            ignore_case: ignore,
            ignore_trailing_slash: ignore,
            ..Default::default()
        };
        let exact = settings(0, vec![policy(false)]);
        let wide = settings(0, vec![policy(true)]);
        for path in ["/internal", "/INTERNAL/", "/Internal/"] {
            assert!(decide(&exact, &http(None, &get, path)).allowed, "{path}");
            assert!(!decide(&wide, &http(None, &get, path)).allowed, "{path}");
        }
        assert!(!decide(&exact, &http(None, &get, "/Internal")).allowed);
        assert!(decide(&wide, &http(None, &get, "/internal/x")).allowed);
        assert!(reads_paths(&wide, "in") && !reads_paths(&settings(0, vec![]), "in"));
    }

    #[test]
    fn defaults_decide_without_policies() {
        let get = Method::GET;
        let open = settings(0, vec![]);
        assert!(decide(&open, &http(None, &get, "/")).allowed);
        let authenticated = settings(1, vec![]);
        assert!(!decide(&authenticated, &http(None, &get, "/")).allowed);
        assert!(decide(&authenticated, &http(Some(WEB), &get, "/")).allowed);
        let deny = settings(2, vec![]);
        let d = decide(&deny, &http(Some(WEB), &get, "/"));
        assert!(!d.allowed);
        assert_eq!(&*d.policy, "default:deny");
    }

    #[test]
    fn deny_first_then_allow_lists() {
        let get = Method::GET;
        let post = Method::POST;
        let s = settings(
            0,
            vec![
                api::AuthorizationPolicy {
                    name: "no-ops-writes".into(),
                    action: 1,
                    identities: vec!["spiffe://cluster.local/ns/ops/*".into()],
                    methods: vec!["POST".into()],
                    ..Default::default()
                },
                api::AuthorizationPolicy {
                    name: "mesh-only".into(),
                    identities: vec!["spiffe://cluster.local/*".into()],
                    ..Default::default()
                },
                api::AuthorizationPolicy {
                    name: "public-health".into(),
                    unauthenticated: true,
                    paths: vec!["/health*".into()],
                    ..Default::default()
                },
            ],
        );
        assert_eq!(
            decide(&s, &http(Some(OPS), &post, "/x")),
            Decision {
                allowed: false,
                policy: Arc::from("no-ops-writes")
            }
        );
        assert_eq!(
            &*decide(&s, &http(Some(OPS), &get, "/x")).policy,
            "mesh-only"
        );
        assert!(decide(&s, &http(Some(WEB), &post, "/x")).allowed);
        // Methods match whatever their case.
        let lower = Method::from_bytes(b"post").unwrap();
        assert!(!decide(&s, &http(Some(OPS), &lower, "/x")).allowed);
        assert_eq!(
            &*decide(&s, &http(None, &get, "/healthz")).policy,
            "public-health"
        );
        let d = decide(&s, &http(None, &get, "/x"));
        assert!(!d.allowed);
        // Opaque TCP: path policies don't apply, the identity one does.
        let tcp = Subject {
            listener: "in",
            client: None,
            request: None,
        };
        assert!(!decide(&s, &tcp).allowed);
        let tcp = Subject {
            listener: "in",
            client: Some(WEB),
            request: None,
        };
        assert!(decide(&s, &tcp).allowed);
    }
}
