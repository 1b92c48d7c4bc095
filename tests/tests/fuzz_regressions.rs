//! Replays every input a fuzz target once failed on (`fuzz/regressions/TARGET/*`) through the same entry
//! point (`cellfleet_shared::hostile`), in the ordinary test build: a fixed decoder stays fixed without
//! the instrumented fuzz build. See `scripts/fuzz.sh`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use cellfleet_shared::hostile;

/// The `configs` target: screen specifications (JSON and TOML) and training job specifications.
fn configs(data: &[u8]) {
    hostile::screen_spec_json(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = toml::from_str::<cellfleet_shared::screen::ScreenSpec>(text) {
            let _ = spec.validate();
        }
        let _ = cellfleet_coordinator::spec::JobSpec::parse(text);
    }
}

/// A target's entry point: takes any bytes, must not panic.
type Replay = fn(&[u8]);

#[test]
fn every_input_a_fuzz_target_once_failed_on_is_handled() {
    let targets: [(&str, Replay); 5] = [
        ("shard", hostile::shard),
        ("unit_result", hostile::unit_result),
        ("manifests", hostile::manifests),
        ("safetensors", hostile::safetensors),
        ("configs", configs),
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    let mut failures = Vec::new();
    for (target, run) in targets {
        let dir = root.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            replayed += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    println!("replayed {replayed} regression inputs");
    assert!(
        replayed > 0,
        "no regression inputs under {}",
        root.display()
    );
    assert!(failures.is_empty(), "panicked on: {failures:#?}");
}
