#![no_main]
//! Fuzz target `tokenizer_json`: see `altgrad::fuzzing::tokenizer_json`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| altgrad_fuzz::run("tokenizer_json", data));
