//! The harness shared by the fuzz targets: runs one `altgrad::fuzzing` entry point under a
//! global allocator that records the largest single allocation, and turns every broken rule
//! into a panic (which libFuzzer reports as a crash): a panic inside altgrad, an internal
//! error, an empty error message, or an allocation above `altgrad::fuzzing::allocation_bound`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static MAX_ALLOC: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, recording the largest request (on every thread).
struct Recording;

// SAFETY: forwards every call to the system allocator; only records sizes in an atomic.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        MAX_ALLOC.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        MAX_ALLOC.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        MAX_ALLOC.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Recording = Recording;

/// Runs target `name` on `data` and checks the rules above.
pub fn run(name: &str, data: &[u8]) {
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(altgrad::fuzzing::warm_up);
    let (_, f) = altgrad::fuzzing::TARGETS.iter().find(|(n, _)| *n == name).expect("known target");
    MAX_ALLOC.store(0, Ordering::Relaxed);
    altgrad::fuzzing::check(name, *f, data);
    let max = MAX_ALLOC.load(Ordering::Relaxed);
    let bound = altgrad::fuzzing::allocation_bound(name, data.len());
    assert!(max <= bound, "{name}: an allocation of {max} bytes for a {}-byte input (bound {bound})", data.len());
}
