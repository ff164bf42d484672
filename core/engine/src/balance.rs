//! Choosing an endpoint for each request or connection: weighted round-robin.
//!
//! The schedule is computed once per config (smooth weighted round-robin, so heavy
//! endpoints are interleaved rather than bunched); picking is one atomic increment.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The most slots a schedule may have; larger weights are scaled down to fit.
const MAX_SLOTS: u64 = 4096;

pub struct Balancer<E> {
    endpoints: Vec<Arc<E>>,
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl<E> Balancer<E> {
    pub fn new(endpoints: Vec<(Arc<E>, u32)>) -> Self {
        let schedule = smooth_schedule(&endpoints.iter().map(|(_, w)| *w).collect::<Vec<_>>());
        Self {
            endpoints: endpoints.into_iter().map(|(e, _)| e).collect(),
            schedule,
            next: AtomicUsize::new(0),
        }
    }

    pub fn endpoints(&self) -> &[Arc<E>] {
        &self.endpoints
    }

    /// The next endpoint, or `None` when there are none.
    pub fn pick(&self) -> Option<&Arc<E>> {
        if self.schedule.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.endpoints.get(self.schedule[i] as usize)
    }
}

fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let total: u64 = weights.iter().map(|w| u64::from((*w).max(1))).sum();
    let scale = total.div_ceil(MAX_SLOTS).max(1);
    let weights: Vec<i64> = weights
        .iter()
        .map(|w| (u64::from((*w).max(1)) / scale).max(1) as i64)
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_honoured_and_interleaved() {
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert!(smooth_schedule(&[]).is_empty());
        assert!(smooth_schedule(&[u32::MAX, 1]).len() as u64 <= MAX_SLOTS + 1);
    }

    #[test]
    fn picks_cycle_through_endpoints() {
        let b = Balancer::new(vec![(Arc::new("a"), 1), (Arc::new("b"), 1)]);
        let picks: Vec<&str> = (0..4).map(|_| **b.pick().unwrap()).collect();
        assert_eq!(picks, vec!["a", "b", "a", "b"]);
        assert!(Balancer::<&str>::new(vec![]).pick().is_none());
    }
}
