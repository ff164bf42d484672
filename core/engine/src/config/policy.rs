//! The reliability settings of a service (balancing, retries, failure accrual, limits,
//! rate limiting, health checks), validated, with safe defaults for all of them.

use std::time::Duration;

use http::HeaderName;
use pymesh_api::config::v1 as api;

use super::{duration, ConfigError};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServicePolicy {
    pub(crate) balancer: BalancerSettings,
    pub(crate) retries: RetrySettings,
    pub(crate) accrual: AccrualSettings,
    pub(crate) limits: ServiceLimits,
    pub(crate) rate_limit: Option<RateLimitSettings>,
    pub(crate) health_check: Option<HealthCheckSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BalancerKind {
    PeakEwma,
    RoundRobin,
    LeastRequest,
    RingHash,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BalancerSettings {
    pub(crate) kind: BalancerKind,
    pub(crate) hash_header: Option<HeaderName>,
    pub(crate) decay: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RetrySettings {
    pub(crate) max_attempts: u32,
    pub(crate) on_connect_failure: bool,
    pub(crate) on_5xx: bool,
    pub(crate) on_gateway_error: bool,
    pub(crate) on_reset: bool,
    pub(crate) grpc_codes: Vec<u32>,
    pub(crate) non_idempotent: bool,
    pub(crate) max_body_bytes: usize,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) budget: BudgetSettings,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BudgetSettings {
    pub(crate) ratio: f64,
    pub(crate) min_per_second: u32,
    pub(crate) window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AccrualSettings {
    pub(crate) consecutive_failures: u32,
    pub(crate) min_success_rate: f64,
    pub(crate) min_requests: u32,
    pub(crate) window: Duration,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection: Duration,
    pub(crate) max_ejection_percent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServiceLimits {
    pub(crate) max_concurrent: usize,
    pub(crate) max_pending: usize,
    pub(crate) max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateLimitSettings {
    pub(crate) per_second: f64,
    pub(crate) burst: u32,
    /// A bucket per client identity rather than one for the service.
    pub(crate) per_client: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthCheckSettings {
    pub(crate) path: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) unhealthy_threshold: u32,
    pub(crate) healthy_threshold: u32,
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A duration field with a default when unset.
fn or(
    d: Option<&pbjson_types::Duration>,
    default: Duration,
    path: String,
) -> Result<Duration, ConfigError> {
    match d {
        Some(d) => {
            let value = duration(d, &path)?;
            if value.is_zero() {
                Err(ConfigError::new(path, "must be greater than 0s"))
            } else {
                Ok(value)
            }
        }
        None => Ok(default),
    }
}

impl Default for ServicePolicy {
    /// What a service that sets no policy gets.
    fn default() -> Self {
        service_policy(&api::Service::default(), "services[]")
            .expect("an empty service's policy is the defaults, which are valid")
    }
}

pub(crate) fn service_policy(svc: &api::Service, at: &str) -> Result<ServicePolicy, ConfigError> {
    Ok(ServicePolicy {
        balancer: balancer(svc.balancer.as_ref(), &format!("{at}.balancer"))?,
        retries: retries(svc.retries.as_ref(), &format!("{at}.retries"))?,
        accrual: accrual(
            svc.failure_accrual.as_ref(),
            &format!("{at}.failure_accrual"),
        )?,
        limits: limits(svc.limits.as_ref()),
        rate_limit: rate_limit(svc.rate_limit.as_ref(), &format!("{at}.rate_limit"))?,
        health_check: health_check(svc.health_check.as_ref(), &format!("{at}.health_check"))?,
    })
}

fn balancer(b: Option<&api::Balancer>, at: &str) -> Result<BalancerSettings, ConfigError> {
    let default = BalancerSettings {
        kind: BalancerKind::PeakEwma,
        hash_header: None,
        decay: Duration::from_secs(10),
    };
    let Some(b) = b else { return Ok(default) };
    let kind = match api::balancer::Kind::try_from(b.kind) {
        Ok(api::balancer::Kind::PeakEwma) => BalancerKind::PeakEwma,
        Ok(api::balancer::Kind::RoundRobin) => BalancerKind::RoundRobin,
        Ok(api::balancer::Kind::LeastRequest) => BalancerKind::LeastRequest,
        Ok(api::balancer::Kind::RingHash) => BalancerKind::RingHash,
        Err(_) => {
            return Err(ConfigError::new(
                format!("{at}.kind"),
                "expected PEAK_EWMA, ROUND_ROBIN, LEAST_REQUEST or RING_HASH",
            ))
        }
    };
    let hash_header = if b.hash_header.is_empty() {
        None
    } else {
        Some(
            HeaderName::from_bytes(b.hash_header.trim().as_bytes()).map_err(|_| {
                ConfigError::new(
                    format!("{at}.hash_header"),
                    format!("{:?} is not a header name", b.hash_header),
                )
            })?,
        )
    };
    if kind == BalancerKind::RingHash && hash_header.is_none() {
        return Err(ConfigError::new(
            format!("{at}.hash_header"),
            "is required for RING_HASH (the header whose value picks the endpoint)",
        ));
    }
    Ok(BalancerSettings {
        kind,
        hash_header,
        decay: or(b.decay.as_ref(), default.decay, format!("{at}.decay"))?,
    })
}

fn retries(r: Option<&api::RetryPolicy>, at: &str) -> Result<RetrySettings, ConfigError> {
    let mut out = RetrySettings {
        max_attempts: 3,
        on_connect_failure: true,
        on_5xx: false,
        on_gateway_error: true,
        // Idempotent requests only: a keep-alive connection closed by a restarting
        // server just as a request went out is the common case.
        on_reset: true,
        grpc_codes: vec![14],
        non_idempotent: false,
        max_body_bytes: 64 * 1024,
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
        budget: BudgetSettings {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        },
    };
    let Some(r) = r else { return Ok(out) };
    if r.max_attempts != 0 {
        out.max_attempts = r.max_attempts.min(10);
    }
    if !r.retry_on.is_empty() {
        out.on_connect_failure = false;
        out.on_gateway_error = false;
        for (i, on) in r.retry_on.iter().enumerate() {
            match on.trim() {
                "connect-failure" => out.on_connect_failure = true,
                "5xx" => out.on_5xx = true,
                "gateway-error" => out.on_gateway_error = true,
                "reset" => out.on_reset = true,
                other => {
                    return Err(ConfigError::new(
                        format!("{at}.retry_on[{i}]"),
                        format!("{other:?}; expected connect-failure, 5xx, gateway-error or reset"),
                    ))
                }
            }
        }
    }
    if !r.retry_on_grpc.is_empty() {
        out.grpc_codes.clear();
        for (i, name) in r.retry_on_grpc.iter().enumerate() {
            let wanted = name.trim().to_ascii_uppercase().replace('-', "_");
            let code = GRPC_CODES
                .iter()
                .position(|c| *c == wanted)
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("{at}.retry_on_grpc[{i}]"),
                        format!("{name:?} is not a gRPC status name such as UNAVAILABLE"),
                    )
                })?;
            out.grpc_codes.push(code as u32);
        }
    }
    out.non_idempotent = r.retry_non_idempotent;
    if r.max_body_bytes != 0 {
        out.max_body_bytes = r.max_body_bytes as usize;
    }
    out.backoff_base = or(
        r.backoff_base.as_ref(),
        out.backoff_base,
        format!("{at}.backoff_base"),
    )?;
    out.backoff_max = or(
        r.backoff_max.as_ref(),
        out.backoff_max,
        format!("{at}.backoff_max"),
    )?;
    if out.backoff_max < out.backoff_base {
        return Err(ConfigError::new(
            format!("{at}.backoff_max"),
            "must not be shorter than backoff_base",
        ));
    }
    if let Some(b) = &r.budget {
        if !(0.0..=10.0).contains(&b.ratio) || b.ratio.is_nan() {
            return Err(ConfigError::new(
                format!("{at}.budget.ratio"),
                format!(
                    "{} is out of range; expected 0 to 10 (0.2 = 20% extra load)",
                    b.ratio
                ),
            ));
        }
        out.budget.ratio = b.ratio;
        out.budget.min_per_second = b.min_per_second;
        out.budget.window = or(
            b.window.as_ref(),
            out.budget.window,
            format!("{at}.budget.window"),
        )?;
    }
    Ok(out)
}

fn accrual(a: Option<&api::FailureAccrual>, at: &str) -> Result<AccrualSettings, ConfigError> {
    let mut out = AccrualSettings {
        consecutive_failures: 5,
        min_success_rate: 0.0,
        min_requests: 20,
        window: Duration::from_secs(10),
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(60),
        max_ejection_percent: 50,
    };
    let Some(a) = a else { return Ok(out) };
    out.consecutive_failures = a.consecutive_failures;
    if !(0.0..=1.0).contains(&a.min_success_rate) || a.min_success_rate.is_nan() {
        return Err(ConfigError::new(
            format!("{at}.min_success_rate"),
            format!("{} is out of range; expected 0 to 1", a.min_success_rate),
        ));
    }
    out.min_success_rate = a.min_success_rate;
    if a.min_requests != 0 {
        out.min_requests = a.min_requests;
    }
    out.window = or(a.window.as_ref(), out.window, format!("{at}.window"))?;
    out.base_ejection = or(
        a.base_ejection.as_ref(),
        out.base_ejection,
        format!("{at}.base_ejection"),
    )?;
    out.max_ejection = or(
        a.max_ejection.as_ref(),
        out.max_ejection,
        format!("{at}.max_ejection"),
    )?;
    if a.max_ejection_percent > 100 {
        return Err(ConfigError::new(
            format!("{at}.max_ejection_percent"),
            format!("{} is over 100", a.max_ejection_percent),
        ));
    }
    if a.max_ejection_percent != 0 {
        out.max_ejection_percent = a.max_ejection_percent;
    }
    Ok(out)
}

fn limits(l: Option<&api::ServiceLimits>) -> ServiceLimits {
    let pick = |v: u32, default: usize| if v == 0 { default } else { v as usize };
    let l = l.cloned().unwrap_or_default();
    ServiceLimits {
        max_concurrent: pick(l.max_concurrent, 10_000),
        max_pending: pick(l.max_pending, 1_000),
        max_connections: pick(l.max_connections, 1_000),
    }
}

fn rate_limit(
    r: Option<&api::RateLimit>,
    at: &str,
) -> Result<Option<RateLimitSettings>, ConfigError> {
    let Some(r) = r else { return Ok(None) };
    if r.requests_per_second.is_nan() || r.requests_per_second < 0.0 {
        return Err(ConfigError::new(
            format!("{at}.requests_per_second"),
            "must be 0 (no limit) or more",
        ));
    }
    if r.requests_per_second == 0.0 {
        return Ok(None);
    }
    let burst = if r.burst == 0 {
        r.requests_per_second.ceil().max(1.0) as u32
    } else {
        r.burst
    };
    Ok(Some(RateLimitSettings {
        per_second: r.requests_per_second,
        burst,
        per_client: r.per_client,
    }))
}

fn health_check(
    h: Option<&api::HealthCheck>,
    at: &str,
) -> Result<Option<HealthCheckSettings>, ConfigError> {
    let Some(h) = h else { return Ok(None) };
    if !h.path.starts_with('/') {
        return Err(ConfigError::new(
            format!("{at}.path"),
            format!("{:?} must be an absolute path such as /healthz", h.path),
        ));
    }
    Ok(Some(HealthCheckSettings {
        path: h.path.clone(),
        interval: or(
            h.interval.as_ref(),
            Duration::from_secs(5),
            format!("{at}.interval"),
        )?,
        timeout: or(
            h.timeout.as_ref(),
            Duration::from_secs(1),
            format!("{at}.timeout"),
        )?,
        unhealthy_threshold: if h.unhealthy_threshold == 0 {
            2
        } else {
            h.unhealthy_threshold
        },
        healthy_threshold: h.healthy_threshold.max(1),
    }))
}
