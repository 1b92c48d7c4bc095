//! Checkpoints in real object stores: a Garage S3 server (started here, killed and restarted mid-upload)
//! and a local directory. Garage missing fails these tests; nothing is skipped.

use std::sync::mpsc;
use std::time::Duration;

use cellfleet_e2e::GarageServer;
use cellfleet_shared::checkpoint::{Checkpoints, WriteOptions, MANIFEST_FILE};
use cellfleet_shared::storage::{S3Options, Store};

/// Bytes zstd barely shrinks, like optimizer moments (a third is a compressible run, so the stored size
/// differs from the raw size and both are checked).
fn moments_like(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    bytes[len / 3..len * 2 / 3].fill(0);
    bytes
}

fn small_commit(checkpoints: &Checkpoints, step: u64) {
    checkpoints
        .commit(
            step,
            &[("weights", &vec![step as u8; 50_000]), ("state", b"{}")],
            serde_json::json!({"step": step}),
            &WriteOptions::default(),
        )
        .unwrap_or_else(|e| panic!("commit of step {step} at {}: {e}", checkpoints.url()));
}

/// Round trip with an object of several parts, then a flipped byte in it: `verify` names the object and
/// `newest_valid` falls back to the checkpoint before.
fn round_trip_and_corruption(url: &str, s3: &S3Options) {
    let checkpoints = Checkpoints::new(Store::open(url, s3).unwrap());
    small_commit(&checkpoints, 100);
    let optimizer = moments_like(24 << 20, 1);
    let weights = moments_like(3 << 20, 2);
    let options = WriteOptions {
        part_bytes: 8 << 20,
        ..WriteOptions::default()
    };
    let manifest = checkpoints
        .commit(
            200,
            &[("weights", &weights), ("optimizer", &optimizer)],
            serde_json::json!({"world": 2}),
            &options,
        )
        .unwrap();
    let entry = manifest.object("optimizer").unwrap();
    assert_eq!(entry.raw_bytes, optimizer.len() as u64);
    assert!(
        entry.stored_bytes > 2 * options.part_bytes as u64 && entry.stored_bytes < entry.raw_bytes,
        "{entry:?}"
    );
    assert_eq!(checkpoints.latest_pointer().unwrap(), Some(200));
    assert_eq!(checkpoints.manifest(200).unwrap().unwrap(), manifest);
    assert_eq!(
        checkpoints.read(&manifest, "optimizer").unwrap().unwrap(),
        optimizer
    );
    assert_eq!(
        checkpoints.read(&manifest, "weights").unwrap().unwrap(),
        weights
    );
    assert!(checkpoints.verify(200).unwrap().is_empty());

    // The stored object, as any client of the store could damage it.
    let store = Store::open(url, s3).unwrap();
    let name = "step-000000000200/optimizer.zst";
    let stored = store.get(name).unwrap();
    assert_eq!(stored.len() as u64, entry.stored_bytes);
    let mut damaged = stored.to_vec();
    damaged[stored.len() * 3 / 4] ^= 0x10;
    store.put(name, damaged.into()).unwrap();
    let problems = checkpoints.verify(200).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, "optimizer");
    assert!(
        problems[0].to_string().contains("content hash"),
        "{}",
        problems[0]
    );
    let (newest, skipped) = checkpoints.newest_valid().unwrap();
    assert_eq!(newest.map(|m| m.step), Some(100));
    assert_eq!(skipped, problems);

    // A truncated copy is caught by its size.
    store.put(name, stored.slice(..stored.len() - 1)).unwrap();
    let problems = checkpoints.verify(200).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].to_string().contains("bytes stored"),
        "{}",
        problems[0]
    );
}

#[test]
fn s3_checkpoints_round_trip_in_parts_and_a_corrupt_object_is_named() {
    let garage = GarageServer::start_without_cellfleet();
    round_trip_and_corruption(&garage.url("runs/round-trip"), &garage.s3_options());
}

#[test]
fn local_checkpoints_round_trip_in_parts_and_a_corrupt_object_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    round_trip_and_corruption(&url, &S3Options::default());
}

#[test]
fn a_server_killed_mid_upload_fails_the_commit_and_leaves_the_previous_checkpoint() {
    let mut garage = GarageServer::start_without_cellfleet();
    let url = garage.url("runs/killed");
    let s3 = S3Options {
        retry_timeout: Some(Duration::from_secs(2)),
        ..garage.s3_options()
    };
    let checkpoints = Checkpoints::new(Store::open(&url, &s3).unwrap());
    // Large enough that Garage keeps it in data blocks rather than inline in its metadata.
    let weights = moments_like(2 << 20, 5);
    let before_kill = checkpoints
        .commit(
            100,
            &[("weights", &weights)],
            serde_json::Value::Null,
            &WriteOptions::default(),
        )
        .unwrap();

    // About four seconds of upload at the cap, in parts of 5 MiB (S3's minimum).
    let before = garage.data_bytes();
    let (done_tx, done) = mpsc::channel();
    let writer = {
        let (url, s3) = (url.clone(), s3.clone());
        std::thread::spawn(move || {
            let checkpoints = Checkpoints::new(Store::open(&url, &s3).unwrap());
            let optimizer = moments_like(32 << 20, 3);
            let result = checkpoints.commit(
                200,
                &[("state", b"{}"), ("optimizer", &optimizer)],
                serde_json::Value::Null,
                &WriteOptions {
                    part_bytes: 8 << 20,
                    max_bytes_per_sec: Some(6 << 20),
                    ..WriteOptions::default()
                },
            );
            let _ = done_tx.send(result.map(|m| m.step));
        })
    };
    // Kill once the first part is stored, so the upload is really under way.
    cellfleet_e2e::wait_for(
        "Garage to store the first part of the upload",
        Duration::from_secs(60),
        || garage.data_bytes() >= before + (4 << 20),
    );
    assert!(
        done.try_recv().is_err(),
        "the capped upload finished before the server was killed; raise the size"
    );
    garage.kill();
    let outcome = done
        .recv_timeout(Duration::from_secs(60))
        .expect("the commit gives up within the retry timeout, it does not hang");
    writer.join().unwrap();
    let error = outcome.expect_err("a commit whose server died must fail");
    assert!(
        error.to_string().contains("optimizer.zst"),
        "the error names the object: {error}"
    );

    garage.restart();
    let problem = checkpoints.manifest(200).unwrap().unwrap_err();
    assert_eq!(problem.object, MANIFEST_FILE);
    assert_eq!(checkpoints.latest_pointer().unwrap(), Some(100));
    let (newest, _) = checkpoints.newest_valid().unwrap();
    assert_eq!(newest.map(|m| m.step), Some(100));

    // The server keeps what it had and takes the next save.
    let optimizer = moments_like(12 << 20, 4);
    let manifest = checkpoints
        .commit(
            200,
            &[("state", b"{}"), ("optimizer", &optimizer)],
            serde_json::Value::Null,
            &WriteOptions {
                part_bytes: 5 << 20,
                ..WriteOptions::default()
            },
        )
        .unwrap();
    assert_eq!(checkpoints.latest_pointer().unwrap(), Some(200));
    assert_eq!(
        checkpoints.read(&manifest, "optimizer").unwrap().unwrap(),
        optimizer
    );
    // What was stored before the crash survived it.
    assert_eq!(
        checkpoints.read(&before_kill, "weights").unwrap().unwrap(),
        weights
    );

    // Retention on S3: the newest two stay, every object of the others goes.
    small_commit(&checkpoints, 300);
    small_commit(&checkpoints, 400);
    assert_eq!(checkpoints.retain(2, 0).unwrap(), [100, 200]);
    assert_eq!(checkpoints.steps().unwrap(), [300, 400]);
    let store = Store::open(&url, &s3).unwrap();
    assert!(store.list_objects("step-000000000200").unwrap().is_empty());
    assert_eq!(
        checkpoints.newest_valid().unwrap().0.map(|m| m.step),
        Some(400)
    );
}
