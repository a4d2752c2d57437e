//! `bus_event_decode`: see `targets::bus_event_decode` (fuzz/targets.rs, shared with the corpus replay on stable).
#![no_main]

#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::bus_event_decode(data));
