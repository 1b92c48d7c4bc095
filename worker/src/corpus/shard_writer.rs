//! Parallel shard writing shared by `ingest` and `synth`: jobs become shards on worker threads, are hashed
//! and stored; the manifest is written by the caller only after every shard is in place.

use bytes::Bytes;
use cellfleet_shared::corpus::manifest::ShardEntry;
use cellfleet_shared::corpus::shard::ShardBuilder;
use cellfleet_shared::storage::Store;
use crossbeam_channel::bounded;
use indicatif::ProgressBar;

/// Object name of shard `index`.
pub fn shard_name(index: usize) -> String {
    format!("shards/shard-{index:06}.cfs")
}

/// Runs `build` on every job over `threads` threads and stores each result as a shard.
///
/// Returns the manifest entries in job order. On error the shards written so far are deleted (best
/// effort), so a failed run leaves neither a manifest nor a half-corpus that looks usable.
pub fn write_shards<J: Send>(
    store: &Store,
    jobs: impl Iterator<Item = anyhow::Result<J>>,
    threads: usize,
    block_cells: usize,
    progress: &ProgressBar,
    build: impl Fn(J) -> anyhow::Result<ShardBuilder> + Sync,
) -> anyhow::Result<Vec<ShardEntry>> {
    let threads = threads.max(1);
    let (job_tx, job_rx) = bounded::<(usize, J)>(threads);
    let (out_tx, out_rx) = bounded::<anyhow::Result<(usize, ShardEntry)>>(threads * 2);
    let written = std::sync::Mutex::new(Vec::<String>::new());
    let result: anyhow::Result<Vec<ShardEntry>> = std::thread::scope(|scope| {
        for _ in 0..threads {
            let (job_rx, out_tx, build, written) =
                (job_rx.clone(), out_tx.clone(), &build, &written);
            scope.spawn(move || {
                for (index, job) in job_rx.iter() {
                    let outcome = build(job).and_then(|builder| {
                        let cells = builder.cells();
                        let encoded = builder.encode(block_cells)?;
                        let name = shard_name(index);
                        let entry = ShardEntry {
                            name: name.clone(),
                            cells: cells as u32,
                            bytes: encoded.len() as u64,
                            blake3: blake3::hash(&encoded).to_hex().to_string(),
                        };
                        written.lock().unwrap().push(name.clone());
                        store.put(&name, Bytes::from(encoded))?;
                        Ok((index, entry))
                    });
                    let failed = outcome.is_err();
                    if out_tx.send(outcome).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(out_tx);
        drop(job_rx);
        let collector = scope.spawn(move || -> anyhow::Result<Vec<ShardEntry>> {
            let mut entries = Vec::new();
            for outcome in out_rx.iter() {
                let (index, entry) = outcome?;
                progress.inc(u64::from(entry.cells));
                entries.push((index, entry));
            }
            entries.sort_by_key(|(i, _)| *i);
            Ok(entries.into_iter().map(|(_, e)| e).collect())
        });
        let mut feed_error = None;
        for (index, job) in jobs.enumerate() {
            match job {
                Ok(job) => {
                    if job_tx.send((index, job)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    feed_error = Some(e);
                    break;
                }
            }
        }
        drop(job_tx);
        let collected = collector.join().expect("shard collector panicked");
        match feed_error {
            Some(e) => Err(e),
            None => collected,
        }
    });
    if result.is_err() {
        for name in written.lock().unwrap().iter() {
            let _ = store.delete(name);
        }
    }
    result
}
