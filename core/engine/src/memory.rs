//! Gives memory that closed connections freed back to the operating system.
//!
//! glibc's allocator keeps freed memory in its arenas for reuse and returns only what
//! lies at the top of the main heap. After a burst (thousands of slow clients, each
//! holding its buffers) the proxy would otherwise stay at its peak size for good, most of
//! it free but resident. Every [`CHECK_EVERY`] this asks the allocator how much it holds
//! free and, past [`TRIM_ABOVE`] more than after the last trim, trims it (`malloc_trim`,
//! which also releases free pages inside the heaps). Both calls take the arenas' locks, so
//! they run on a thread of their own (`pymesh-memory`), never on a worker and never on the
//! request path; not on the runtime's blocking pool either, whose threads carry the
//! workers' name and would be counted as workers. Elsewhere (musl) this does nothing, and
//! where Rust's allocations do not go to glibc (the native sidecar's mimalloc, which
//! returns freed pages itself) it finds nothing to trim.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

/// How often the allocator is asked what it holds free: well inside the 10 s in which a
/// proxy should be back near its idle size after a burst.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Free memory the allocator may keep for reuse without being trimmed.
const TRIM_ABOVE: usize = 1 << 20;
/// The trimming thread's stack: it calls two libc functions and reads one /proc file.
const STACK_BYTES: usize = 64 * 1024;

/// Trims the allocator whenever it holds more than [`TRIM_ABOVE`] newly free, until
/// `shutdown`; `returned` counts the resident bytes each trim gave back.
pub(crate) async fn run(returned: Counter, shutdown: CancellationToken) {
    if !allocator::SUPPORTED {
        return;
    }
    // The thread sleeps on this channel; dropping the sender at shutdown wakes it to end.
    let (stop, stopped) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("pymesh-memory".into())
        .stack_size(STACK_BYTES)
        .spawn(move || trim_until_stopped(&returned, &stopped));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "memory is not handed back after bursts: no thread for it");
        return;
    }
    shutdown.cancelled().await;
    drop(stop);
}

fn trim_until_stopped(returned: &Counter, stopped: &mpsc::Receiver<()>) {
    let mut trimmer = Trimmer::default();
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECK_EVERY) {
        if let Some(bytes) = trimmer.trim_if_worth_it() {
            returned.inc_by(bytes);
            tracing::debug!(bytes, "returned freed memory to the operating system");
        }
    }
}

/// When a trim is worth its cost. `malloc_trim` hands pages back but leaves their chunks
/// counted as free, so the free total stays high after a trim; measured against what was
/// free right after the last one, a burst is trimmed once, not every [`CHECK_EVERY`] for
/// good (each trim walks every arena under its lock, which the worker then waits on).
#[derive(Debug, Default, Clone, Copy)]
struct Trimmer {
    /// Free bytes right after the last trim, lowered as the allocator reuses them.
    baseline: usize,
}

impl Trimmer {
    /// Trims when more than [`TRIM_ABOVE`] was freed since the last trim; the resident
    /// bytes that came back, if it did.
    fn trim_if_worth_it(&mut self) -> Option<u64> {
        let free = allocator::free_bytes();
        self.baseline = self.baseline.min(free);
        if free <= self.baseline.saturating_add(TRIM_ABOVE) {
            return None;
        }
        let before = resident_bytes()?;
        allocator::trim();
        self.baseline = allocator::free_bytes();
        Some(before.saturating_sub(resident_bytes()?))
    }
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
        let mut trimmer = Trimmer::default();
        let returned = trimmer
            .trim_if_worth_it()
            .expect("a trim, with this much free");
        assert!(returned > 16 << 20, "only {returned} bytes came back");
        assert_eq!(
            trimmer.trim_if_worth_it(),
            None,
            "trimmed again with nothing newly freed"
        );
        drop(pin);
    }
}
