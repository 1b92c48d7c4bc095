//! A shard's bytes with the manifest's hash check bypassed (see `cellfleet_shared::hostile::shard`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellfleet_shared::hostile::shard(data));
