//! The sidecar's memory allocator: mimalloc, set to give pages back to the kernel as soon
//! as they are empty.
//!
//! With glibc's malloc, each connection's long-lived small allocations (its task, its
//! socket's registration, its boxed future) sit between the 8 KiB buffers hyper holds
//! while a request is in flight. When an idle connection is parked and those buffers are
//! freed, only the whole pages inside them can be trimmed; the pages they share with the
//! small allocations stay resident, about 3 KiB per idle connection (heaptrack: 5.7 MB
//! live, 9 MB resident, for 1,000 idle clients). mimalloc keeps each size class in pages
//! of its own, so freed buffers leave whole pages empty. Its default is to purge them a
//! second later, but only from inside a later allocation, which an idle proxy never
//! makes; a purge delay of 0 purges at once. Arenas are not committed up front, so what
//! was never touched is never resident.
//!
//! The embedded engine (the Python module) keeps its host process's allocator, trimmed
//! by the engine's `memory` module.

use std::ffi::{c_int, c_long, CStr};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option numbers (`mi_option_e` in its v3 `mimalloc.h`), which the sys crate
/// exports no constants for; Cargo.toml pins the crate version they were read from.
const ARENA_EAGER_COMMIT: c_int = 4;
const PURGE_DELAY: c_int = 15;

/// The options are set from the executable's initialisers (`.init_array`), before `main`
/// and so before the first allocation reserves an arena: the eager-commit choice is made
/// then. An option given in the environment (`MIMALLOC_PURGE_DELAY`, ...) is left alone.
#[used]
#[link_section = ".init_array"]
static CONFIGURE: extern "C" fn() = configure;

extern "C" fn configure() {
    set_unless_given(c"MIMALLOC_ARENA_EAGER_COMMIT", ARENA_EAGER_COMMIT, 0);
    set_unless_given(c"MIMALLOC_PURGE_DELAY", PURGE_DELAY, 0);
}

fn set_unless_given(variable: &CStr, option: c_int, value: c_long) {
    // SAFETY: getenv reads the environment with a NUL-terminated name; before `main`
    // nothing else is running to change it.
    if !unsafe { libc::getenv(variable.as_ptr()) }.is_null() {
        return;
    }
    // SAFETY: mi_option_set writes one entry of mimalloc's option table (an index it
    // bounds-checks); it allocates nothing.
    unsafe { libmimalloc_sys::mi_option_set(option, value) };
}

#[cfg(test)]
mod tests {
    /// The process's resident bytes, from /proc.
    fn resident() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("a resident page count");
        pages * 4096
    }

    #[test]
    fn freed_buffers_leave_at_once_though_small_blocks_stay_between_them() {
        // What parked connections leave: 8 KiB buffers freed, small long-lived blocks
        // allocated between them kept. 32 MiB of buffers.
        let mut buffers = Vec::new();
        let mut small = Vec::new();
        for i in 0..4096u32 {
            buffers.push(vec![i as u8; 8192]);
            small.push(Box::new([i; 16]));
        }
        let held = resident();
        drop(buffers);
        let after = resident();
        assert!(
            held.saturating_sub(after) > 24 << 20,
            "{} KiB of 32 MiB freed came back",
            held.saturating_sub(after) >> 10
        );
        assert_eq!(small.len(), 4096);
    }
}
