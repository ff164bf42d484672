//! Config-file watching for the sidecar: decides, one poll at a time, when a changed file
//! is ready to be applied.
//!
//! A file written in place (`open(O_TRUNC)` then `write`) is briefly empty or half written.
//! Reloading the moment the stamp changes can read that partial file and reject it, so a
//! change is applied only once its stamp has held still for one whole poll interval.

use std::path::Path;
use std::time::SystemTime;

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    modified: SystemTime,
    len: u64,
}

impl Stamp {
    /// The file's stamp now, or `None` when it cannot be read (missing, no permission).
    pub fn of(path: &Path) -> Option<Stamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(Stamp {
            modified: metadata.modified().ok()?,
            len: metadata.len(),
        })
    }
}

/// Tracks the version applied last and the one seen at the previous poll.
#[derive(Debug)]
pub struct FileWatch {
    applied: Option<Stamp>,
    seen: Option<Stamp>,
}

impl FileWatch {
    /// Starts from the version the proxy was started with.
    pub fn new(applied: Option<Stamp>) -> FileWatch {
        FileWatch {
            applied,
            seen: applied,
        }
    }

    /// One poll: true when the file changed and has been still since the previous poll.
    pub fn poll(&mut self, now: Option<Stamp>) -> bool {
        let settled = now == self.seen;
        self.seen = now;
        if now == self.applied || !settled || now.is_none() {
            return false;
        }
        self.applied = now;
        true
    }

    /// The file was applied outside the watch (SIGHUP): don't apply the same version again.
    pub fn applied(&mut self, now: Option<Stamp>) {
        self.applied = now;
        self.seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stamp(seconds: u64, len: u64) -> Option<Stamp> {
        Some(Stamp {
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
            len,
        })
    }

    #[test]
    fn an_unchanged_file_is_never_applied() {
        let mut watch = FileWatch::new(stamp(1, 10));
        assert!(!watch.poll(stamp(1, 10)));
        assert!(!watch.poll(stamp(1, 10)));
    }

    #[test]
    fn a_change_is_applied_once_it_has_held_for_one_poll() {
        let mut watch = FileWatch::new(stamp(1, 10));
        assert!(
            !watch.poll(stamp(2, 0)),
            "truncated, the write is still going"
        );
        assert!(!watch.poll(stamp(3, 42)), "still changing");
        assert!(watch.poll(stamp(3, 42)));
        assert!(!watch.poll(stamp(3, 42)), "applied once only");
    }

    #[test]
    fn a_missing_file_is_not_applied_and_its_return_is() {
        let mut watch = FileWatch::new(stamp(1, 10));
        assert!(!watch.poll(None));
        assert!(!watch.poll(None));
        assert!(!watch.poll(stamp(1, 10)), "the same version came back");
        assert!(!watch.poll(stamp(5, 10)));
        assert!(watch.poll(stamp(5, 10)));
    }

    #[test]
    fn a_version_applied_by_signal_is_not_applied_again() {
        let mut watch = FileWatch::new(stamp(1, 10));
        assert!(!watch.poll(stamp(2, 20)));
        watch.applied(stamp(2, 20));
        assert!(!watch.poll(stamp(2, 20)));
    }
}
