//! Letting go of start-up code: once the sidecar is serving, the code pages that only
//! start-up touched (command line and config parsing, TLS and logging set-up, the protobuf
//! and JSON schemas in the binary; the dynamic loader's and libc's start-up paths, libm's
//! tables) stay mapped for nothing, and they are most of an idle proxy's RSS. They are
//! dropped from the process once, after start: clean file pages (`madvise(MADV_DONTNEED)`
//! on read-only, never-written mappings of the binary and of its shared libraries), which
//! the kernel maps again from the page cache (a minor fault, no I/O) if they are ever
//! needed. What stays resident is the request path's working set. The page cache itself
//! is untouched: a shared library's pages stay there for every other process using them.
//!
//! Only file mappings with no write permission and no anonymous (copied on write) pages
//! are touched: the relocated read-only data (RELRO) of the binary and of each library
//! holds private copies that must never be thrown away.

use std::fs;

/// One mapping in `/proc/self/smaps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    writable: bool,
    path: String,
    anonymous_kib: Option<u64>,
}

/// Drops the clean pages of the binary and its libraries from this process; returns the
/// bytes it asked to drop.
pub(crate) fn release() -> std::io::Result<usize> {
    let smaps = fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for (start, end) in releasable(&smaps) {
        let len = end - start;
        // SAFETY: the range is a whole read-only mapping of a file with no private copies:
        // dropping its pages only means mapping them again from the page cache on next use.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if rc == 0 {
            released += len;
        }
    }
    Ok(released)
}

/// The ranges of the read-only file mappings that hold no private copies. A file is an
/// absolute path still on disk: not the kernel's `[vdso]`/`[vvar]`, not anonymous memory,
/// not a file deleted since it was mapped.
fn releasable(smaps: &str) -> Vec<(usize, usize)> {
    parse(smaps)
        .into_iter()
        .filter(|m| {
            m.path.starts_with('/')
                && !m.path.ends_with(" (deleted)")
                && !m.writable
                && m.anonymous_kib == Some(0)
        })
        .map(|m| (m.start, m.end))
        .collect()
}

fn parse(smaps: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        if let Some(mapping) = header(line) {
            mappings.push(mapping);
        } else if let (Some(last), Some(rest)) =
            (mappings.last_mut(), line.strip_prefix("Anonymous:"))
        {
            last.anonymous_kib = rest.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    mappings
}

/// `start-end perms offset dev inode path`, the line that opens a mapping's entry.
fn header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    // The path is the rest of the line, spaces and a " (deleted)" mark included.
    let path = fields.nth(3).map_or_else(String::new, |first| {
        let rest: Vec<&str> = fields.collect();
        if rest.is_empty() {
            first.to_owned()
        } else {
            format!("{first} {}", rest.join(" "))
        }
    });
    Some(Mapping {
        start,
        end,
        writable: perms.as_bytes()[1] == b'w',
        path,
        anonymous_kib: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_read_only_file_mappings_are_chosen() {
        let smaps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fe:00 123 /usr/bin/pymesh-proxy
Rss:                 700 kB
Anonymous:             0 kB
55d0a0100000-55d0a0500000 r-xp 00100000 fe:00 123 /usr/bin/pymesh-proxy
Anonymous:             0 kB
55d0a0500000-55d0a0520000 r--p 00500000 fe:00 123 /usr/bin/pymesh-proxy
Anonymous:            96 kB
55d0a0520000-55d0a0530000 rw-p 00520000 fe:00 123 /usr/bin/pymesh-proxy
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 fe:00 456 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000100000-7f0000110000 r--p 00100000 fe:00 456 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:            16 kB
7f0000200000-7f0000210000 r--p 00000000 fe:00 789 /tmp/gone.so (deleted)
Anonymous:             0 kB
7f0000300000-7f0000320000 rw-p 00000000 00:00 0
Anonymous:           128 kB
7ffd00000000-7ffd00002000 r--p 00000000 00:00 0 [vvar]
Anonymous:             0 kB
7ffd00002000-7ffd00004000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
";
        assert_eq!(
            releasable(smaps),
            vec![
                (0x55d0a0000000, 0x55d0a0100000),
                (0x55d0a0100000, 0x55d0a0500000),
                (0x7f0000000000, 0x7f0000100000)
            ],
            "RELRO copies, writable data, deleted files, anonymous memory and the kernel's \
             pages are left alone"
        );
    }

    #[test]
    fn the_running_binary_survives_losing_its_pages() {
        let released = release().expect("smaps readable");
        assert!(released > 0);
        // Code and constants are read back on use.
        assert!(releasable("").is_empty());
        assert_eq!(format!("{}", 6 * 7), "42");
    }
}
