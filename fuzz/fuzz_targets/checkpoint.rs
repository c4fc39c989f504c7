#![no_main]
//! Fuzz target `checkpoint`: see `altgrad::fuzzing::checkpoint`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("checkpoint", data));
