//! Active HTTP health checks: each endpoint of a service is asked for a path at an
//! interval, and leaves rotation after enough failed checks in a row (and comes
//! back after enough passed ones). Passive health (failure accrual) is in `balance`.

use std::collections::VecDeque;
use std::sync::Arc;

use http::{header, Request};
use tokio_util::sync::CancellationToken;

use crate::balance::Endpoint;
use crate::config::policy::HealthCheckSettings;
use crate::http::pool::Http1Pool;
use crate::http::replay::RequestBody;

/// Starts checking every endpoint until `stop` is cancelled.
pub(crate) fn spawn(
    service: &str,
    endpoints: &[Arc<Endpoint>],
    client: Http1Pool,
    settings: HealthCheckSettings,
    stop: CancellationToken,
) {
    for endpoint in endpoints {
        let checker = Checker {
            service: service.to_owned(),
            endpoint: endpoint.clone(),
            client: client.clone(),
            settings: settings.clone(),
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = checker.run() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

struct Checker {
    service: String,
    endpoint: Arc<Endpoint>,
    client: Http1Pool,
    settings: HealthCheckSettings,
}

impl Checker {
    async fn run(self) {
        let mut interval = tokio::time::interval(self.settings.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut failed, mut passed) = (0u32, 0u32);
        loop {
            interval.tick().await;
            if self.check().await {
                failed = 0;
                passed += 1;
                if passed >= self.settings.healthy_threshold && self.endpoint.set_unhealthy(false) {
                    tracing::info!(service = %self.service, endpoint = %self.endpoint.addr, "health check passing: back in rotation");
                }
            } else {
                passed = 0;
                failed += 1;
                if failed >= self.settings.unhealthy_threshold && self.endpoint.set_unhealthy(true)
                {
                    tracing::warn!(service = %self.service, endpoint = %self.endpoint.addr, "health check failing: out of rotation");
                }
            }
        }
    }

    async fn check(&self) -> bool {
        let uri = format!("http://{}{}", self.endpoint.addr, self.settings.path);
        let request = Request::get(uri)
            .header(header::HOST, self.service.as_str())
            .header(header::USER_AGENT, "pymesh-health-check")
            .body(RequestBody::Buffered {
                chunks: VecDeque::new(),
                trailers: None,
            });
        let Ok(request) = request else { return false };
        match tokio::time::timeout(
            self.settings.timeout,
            self.client.request(self.endpoint.addr, request),
        )
        .await
        {
            Ok(Ok(response)) => response.status().is_success(),
            _ => false,
        }
    }
}
