//! Local rate limiting: a token bucket per service.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::config::policy::RateLimitSettings;

pub struct TokenBucket {
    settings: RateLimitSettings,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(settings: RateLimitSettings) -> Self {
        Self {
            settings,
            state: Mutex::new((f64::from(settings.burst), Instant::now())),
        }
    }

    /// Takes a token if one is left.
    pub fn try_take(&self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let bucket = TokenBucket::new(RateLimitSettings {
            per_second: 1000.0,
            burst: 10,
        });
        let granted = (0..50).filter(|_| bucket.try_take()).count();
        assert!((10..=12).contains(&granted), "{granted}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(bucket.try_take());
    }
}
