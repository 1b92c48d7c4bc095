//! Corpus and checkpoint manifests and screen plans (see `cellfleet_shared::hostile::manifests`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cellfleet_shared::hostile::manifests(data));
