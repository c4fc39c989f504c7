#![no_main]
//! Fuzz target `hf_config`: see `altgrad::fuzzing::hf_config`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("hf_config", data));
