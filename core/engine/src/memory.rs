//! Gives memory that closed connections freed back to the operating system.
//!
//! glibc's allocator keeps freed memory in its arenas for reuse and returns only what
//! lies at the top of the main heap. After a burst (thousands of slow clients, each
//! holding its buffers) the proxy would otherwise stay at its peak size for good, most of
//! it free but resident. Every [`CHECK_EVERY`] this asks the allocator how much it holds
//! free and, past [`TRIM_ABOVE`], trims it (`malloc_trim`, which also releases free pages
//! inside the heaps). Both calls take the arenas' locks, so they run on a blocking
//! thread, never on a worker, and never on the request path. Elsewhere (musl, or any
//! allocator that returns memory itself) this does nothing.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

/// How often the allocator is asked what it holds free: well inside the 10 s in which a
/// proxy should be back near its idle size after a burst.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Free memory the allocator may keep for reuse without being trimmed.
const TRIM_ABOVE: usize = 1 << 20;

/// Trims the allocator whenever it holds more than [`TRIM_ABOVE`] free, until `shutdown`;
/// `returned` counts the resident bytes each trim gave back.
pub(crate) async fn run(returned: Counter, shutdown: CancellationToken) {
    if !allocator::SUPPORTED {
        return;
    }
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match tokio::task::spawn_blocking(trim_if_worth_it).await {
            Ok(Some(bytes)) => {
                returned.inc_by(bytes);
                tracing::debug!(bytes, "returned freed memory to the operating system");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "the memory trim task failed"),
        }
    }
}

/// Trims when the allocator holds enough free; the resident bytes that came back, if any.
fn trim_if_worth_it() -> Option<u64> {
    if allocator::free_bytes() <= TRIM_ABOVE {
        return None;
    }
    let before = resident_bytes()?;
    allocator::trim();
    Some(before.saturating_sub(resident_bytes()?))
}

/// The process's resident memory, from /proc (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod allocator {
    pub(super) const SUPPORTED: bool = true;

    /// Bytes the allocator holds in free chunks, in every arena.
    pub(super) fn free_bytes() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's own bookkeeping (glibc ≥ 2.33).
        unsafe { libc::mallinfo2() }.fordblks
    }

    /// Hands free pages in every arena back to the kernel.
    pub(super) fn trim() {
        // SAFETY: malloc_trim is safe to call at any time from any thread.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod allocator {
    pub(super) const SUPPORTED: bool = false;

    pub(super) fn free_bytes() -> usize {
        0
    }

    pub(super) fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_burst_is_handed_back() {
        if !allocator::SUPPORTED {
            return;
        }
        // 32 MiB in blocks below the mmap threshold, so they live in the heap; freeing all
        // but the last leaves them free and resident (the last pins the heap's top).
        let mut blocks: Vec<Vec<u8>> = (0..1024).map(|_| vec![1u8; 32 * 1024]).collect();
        let pin = blocks.pop();
        drop(blocks);
        assert!(allocator::free_bytes() > TRIM_ABOVE);
        let returned = trim_if_worth_it().expect("a trim, with this much free");
        assert!(returned > 16 << 20, "only {returned} bytes came back");
        drop(pin);
    }
}
