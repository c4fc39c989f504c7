#![no_main]
//! Fuzz target `dequant`: see `altgrad::fuzzing::dequant`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("dequant", data));
