#![no_main]
//! Fuzz target `tokens`: see `altgrad::fuzzing::tokens`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("tokens", data));
