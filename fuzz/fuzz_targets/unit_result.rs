//! A screen unit result, stored bytes and payload (see `cellfleet_shared::hostile::unit_result`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellfleet_shared::hostile::unit_result(data));
