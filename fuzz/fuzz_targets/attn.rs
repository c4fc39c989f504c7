#![no_main]
//! Fuzz target `attn`: see `altgrad::fuzzing::attn`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("attn", data));
