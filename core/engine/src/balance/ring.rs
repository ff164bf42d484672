//! A consistent-hash ring: a key maps to the same endpoint while the endpoint set
//! stays, and adding or removing one endpoint moves only the keys near it.

use std::hash::{Hash, Hasher};

/// Points on the ring per unit of endpoint weight.
const POINTS_PER_WEIGHT: u32 = 64;

pub(crate) struct Ring {
    points: Vec<(u64, u32)>,
}

fn hash(value: impl Hash) -> u64 {
    // SipHash with fixed keys: stable for a given build, which is what the ring needs.
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

impl Ring {
    /// `members` are (a stable identity, weight) per endpoint, in endpoint order.
    pub(crate) fn new<K: Hash>(members: &[(K, u32)]) -> Self {
        let mut points = Vec::new();
        for (index, (key, weight)) in members.iter().enumerate() {
            for i in 0..POINTS_PER_WEIGHT * (*weight).clamp(1, 64) {
                points.push((hash((key, i)), index as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// Endpoint indices in ring order starting at the key's position; the first is
    /// the key's owner, the rest are fallbacks.
    pub(crate) fn walk(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        let h = hash(key);
        let start = self.points.partition_point(|(p, _)| *p < h);
        let (before, after) = self.points.split_at(start.min(self.points.len()));
        after.iter().chain(before).map(|(_, i)| *i as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stick_and_mostly_stay_when_a_member_leaves() {
        let three = Ring::new(&[("a", 1), ("b", 1), ("c", 1)]);
        let two = Ring::new(&[("a", 1), ("b", 1)]);
        let mut moved = 0;
        let mut spread = [0; 3];
        for user in 0..1000 {
            let key = format!("user-{user}");
            let owner = three.walk(key.as_bytes()).next().unwrap();
            assert_eq!(owner, three.walk(key.as_bytes()).next().unwrap());
            spread[owner] += 1;
            let now = two.walk(key.as_bytes()).next().unwrap();
            if owner != 2 && now != owner {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "keys of the remaining members did not move");
        assert!(spread.iter().all(|n| *n > 200), "{spread:?}");
    }
}
