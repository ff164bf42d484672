//! Hop-by-hop header handling (RFC 9110 §7.6.1): headers that describe one connection
//! are removed before a message is forwarded on another.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that are hop-by-hop whether or not `Connection` names them.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// True for headers a client cannot have removed by naming them in `Connection`: what
/// the application or the mesh relies on end to end (who the client is, its credentials,
/// the path it came by). Listing them there would otherwise strip them silently.
fn is_protected(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "authorization" | "proxy-authorization" | "cookie" | "forwarded" | "host"
    ) || name.starts_with("x-forwarded-")
        || name.starts_with("pymesh-")
}

/// True when an HTTP/1 request asks to switch protocols (`Connection: upgrade`).
/// An upgrade to `h2c` is not passed on: the proxy speaks HTTP/2 itself, and a raw
/// tunnel would carry later requests past routing and authorization policy.
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    let Some(upgrade) = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let only_h2c = upgrade
        .split(',')
        .all(|p| p.trim().eq_ignore_ascii_case("h2c"));
    !only_h2c && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` is kept and
/// `Connection: upgrade` restored so the protocol switch reaches the next hop.
/// `TE: trailers` is kept: gRPC needs it end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.is_empty() {
        return;
    }
    // Headers named by Connection are hop-by-hop too (a fast path skips the common case).
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !is_protected(n) && (!keep_upgrade || n != header::UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in &HOP_BY_HOP {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2c_upgrades_are_not_passed_on() {
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(!wants_upgrade(&h2c));
        let ws = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&ws));
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn connection_cannot_name_away_protected_headers() {
        let mut h = map(&[
            (
                "connection",
                "close, X-Forwarded-For, Authorization, Cookie, pymesh-client-id, x-other",
            ),
            ("x-forwarded-for", "10.0.0.1"),
            ("authorization", "Bearer t"),
            ("cookie", "a=b"),
            ("pymesh-client-id", "spiffe://cluster.local/ns/a/sa/b"),
            ("x-other", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        for kept in [
            "x-forwarded-for",
            "authorization",
            "cookie",
            "pymesh-client-id",
        ] {
            assert!(h.contains_key(kept), "{kept} was removed: {h:?}");
        }
        assert!(!h.contains_key("x-other") && !h.contains_key("connection"));
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate"),
            ("host", "web"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["host"], "web");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }
}
