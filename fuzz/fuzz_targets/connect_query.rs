//! `connect_query`: see `targets::connect_query` (fuzz/targets.rs, shared with the corpus replay on stable).
#![no_main]

#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::connect_query(data));
