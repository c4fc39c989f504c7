#![no_main]
//! Fuzz target `hf_model`: see `altgrad::fuzzing::hf_model`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("hf_model", data));
