#![no_main]
//! Fuzz target `safetensors`: see `altgrad::fuzzing::safetensors`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("safetensors", data));
