//! The screen specification (TOML and JSON) and the training job specification (JSON) parsers with their
//! validation, as `screen run|submit` and the coordinator's SubmitJob apply them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cellfleet_shared::hostile::screen_spec_json(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = toml::from_str::<cellfleet_shared::screen::ScreenSpec>(text) {
            let _ = spec.validate();
        }
        let _ = cellfleet_coordinator::spec::JobSpec::parse(text);
    }
});
