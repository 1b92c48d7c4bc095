//! The safetensors parser (see `cellfleet_shared::hostile::safetensors`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellfleet_shared::hostile::safetensors(data));
