//! Local rate limiting: a token bucket per service, or one per client identity.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use tokio::time::Instant;

use crate::config::policy::RateLimitSettings;

pub(crate) struct TokenBucket {
    settings: RateLimitSettings,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub(crate) fn new(settings: RateLimitSettings) -> Self {
        Self {
            settings,
            state: Mutex::new((f64::from(settings.burst), Instant::now())),
        }
    }

    /// Takes a token if one is left.
    pub(crate) fn try_take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill =
            now.saturating_duration_since(state.1).as_secs_f64() * self.settings.per_second;
        state.0 = (state.0 + refill).min(f64::from(self.settings.burst));
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Buckets beyond this many clients: later clients share one (a bound on memory, since
/// identities come from certificates the mesh CA issued, not from the request).
const MAX_CLIENT_BUCKETS: usize = 10_000;

type ClientKey = Option<Arc<str>>;

/// A service's rate limit, as configured.
pub(crate) enum RateLimiter {
    Service(TokenBucket),
    /// Read from a lock-free snapshot; a client's first request adds its bucket.
    PerClient {
        settings: RateLimitSettings,
        buckets: ArcSwap<HashMap<ClientKey, Arc<TokenBucket>>>,
        overflow: TokenBucket,
    },
}

impl RateLimiter {
    pub(crate) fn new(settings: RateLimitSettings) -> Self {
        if settings.per_client {
            RateLimiter::PerClient {
                settings,
                buckets: ArcSwap::from_pointee(HashMap::new()),
                overflow: TokenBucket::new(settings),
            }
        } else {
            RateLimiter::Service(TokenBucket::new(settings))
        }
    }

    /// Takes a token for a request from `client` (its mesh identity, if any).
    pub(crate) fn try_take(&self, client: Option<&Arc<str>>) -> bool {
        let (settings, buckets, overflow) = match self {
            RateLimiter::Service(bucket) => return bucket.try_take(),
            RateLimiter::PerClient {
                settings,
                buckets,
                overflow,
            } => (settings, buckets, overflow),
        };
        let key: ClientKey = client.cloned();
        if let Some(bucket) = buckets.load().get(&key) {
            return bucket.try_take();
        }
        if buckets.load().len() >= MAX_CLIENT_BUCKETS {
            return overflow.try_take();
        }
        let fresh = Arc::new(TokenBucket::new(*settings));
        buckets.rcu(|old| {
            let mut map = HashMap::clone(old);
            map.entry(key.clone()).or_insert_with(|| fresh.clone());
            map
        });
        buckets
            .load()
            .get(&key)
            .map_or_else(|| overflow.try_take(), |bucket| bucket.try_take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tokio's clock, paused: time moves only when the test says so.
    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let bucket = TokenBucket::new(RateLimitSettings {
            per_second: 1000.0,
            burst: 10,
            per_client: false,
        });
        let granted = |n| (0..n).filter(|_| bucket.try_take()).count();
        assert_eq!(granted(50), 10, "the burst");
        tokio::time::advance(std::time::Duration::from_millis(3)).await;
        assert_eq!(granted(50), 3, "1,000 a second");
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!(granted(50), 10, "never more than the burst");
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let limiter = RateLimiter::new(RateLimitSettings {
            per_second: 0.001,
            burst: 2,
            per_client: true,
        });
        let a: Arc<str> = Arc::from("spiffe://cluster.local/ns/a/sa/a");
        let b: Arc<str> = Arc::from("spiffe://cluster.local/ns/b/sa/b");
        let granted =
            |client: Option<&Arc<str>>| (0..5).filter(|_| limiter.try_take(client)).count();
        assert_eq!(granted(Some(&a)), 2);
        assert_eq!(granted(Some(&b)), 2);
        assert_eq!(granted(None), 2);
        assert_eq!(granted(Some(&a)), 0);
    }
}
