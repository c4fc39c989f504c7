#![no_main]
//! Fuzz target `gguf`: see `altgrad::fuzzing::gguf`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("gguf", data));
