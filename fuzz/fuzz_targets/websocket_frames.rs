//! `websocket_frames`: see `targets::websocket_frames` (fuzz/targets.rs, shared with the corpus replay on stable).
//! Here, and only here (the replay on stable forbids `unsafe`), a counting allocator also checks that reading one
//! client's bytes never holds more memory at once than a bound set by the gateway's `max_frame_bytes`, whatever
//! lengths the frames declare.
#![no_main]

#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes allocated now, and the most at once since the last reset.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

impl Counting {
    fn grew(&self, bytes: usize) {
        let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

// SAFETY: every call goes to the system allocator unchanged; the counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            self.grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            self.grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            // Counted as if old and new were held at once, as a moving realloc does.
            self.grew(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    targets::websocket_frames(data);
    let held = PEAK.load(Ordering::Relaxed) - before;
    // A frame being read (up to max_frame_bytes) plus a fragmented message being assembled (a buffer grown by
    // doubling: up to twice max_frame_bytes), plus the small read buffer and bookkeeping. The corpus peaks at 81 KB.
    let max = parley_gateway::config::GatewayConfig::default().max_frame_bytes;
    let bound = 4 * max + 64 * 1024;
    assert!(held <= bound, "reading {} bytes held {held} bytes at once (bound {bound})", data.len());
});
