//! `cellfleet bench ckpt`: checkpoint save and restore of a model's weights and AdamW moments (zstd,
//! blake3, manifest, multipart uploads and ranged reads) against raw PUTs and GETs of the same bytes in
//! the same store, alternating which side goes first.

use std::time::Instant;

use cellfleet_shared::storage::S3Options;

/// A checkpoint's file images as training writes them: the model's parameters, and AdamW moments of the
/// same shapes (`exp_avg` small and random like a gradient average, `exp_avg_sq` its square).
fn checkpoint_images(config: crate::model::ModelConfig) -> anyhow::Result<(i64, Vec<u8>, Vec<u8>)> {
    use crate::train::checkpoint_state::safetensors_image;
    use tch::{Device, Tensor};
    tch::manual_seed(7);
    let model = crate::model::CellModel::new(config, Device::Cpu)?;
    let params = model.named_parameters();
    let mut moments = Vec::with_capacity(2 * params.len());
    for (name, param) in &params {
        let exp_avg = param.randn_like() * 1e-3;
        let exp_avg_sq = exp_avg.square();
        moments.push((format!("exp_avg.{name}"), exp_avg));
        moments.push((format!("exp_avg_sq.{name}"), exp_avg_sq));
    }
    fn refs(named: &[(String, Tensor)]) -> Vec<(String, &Tensor)> {
        named.iter().map(|(n, t)| (n.clone(), t)).collect()
    }
    Ok((
        model.parameter_count(),
        safetensors_image(&refs(&params))?,
        safetensors_image(&refs(&moments))?,
    ))
}

/// The four sides of `bench ckpt`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CkptSide {
    RawPut,
    Save,
    RawGet,
    Restore,
}

pub(crate) fn bench_ckpt(
    url: &str,
    config: crate::model::ModelConfig,
    rounds: usize,
    options: &cellfleet_shared::checkpoint::WriteOptions,
) -> anyhow::Result<()> {
    use bytes::Bytes;
    use cellfleet_shared::checkpoint::{
        Checkpoints, PARTS_IN_FLIGHT, RANGES_IN_FLIGHT, READ_RANGE_BYTES,
    };
    use cellfleet_shared::storage::{RangedRead, Store};
    let (parameters, model, optimizer) = checkpoint_images(config)?;
    let objects: [(&str, &[u8]); 2] = [
        ("model.safetensors", &model),
        ("optimizer.safetensors", &optimizer),
    ];
    // The raw side sends the same bytes without copies: parts are slices of one buffer.
    let raw_objects: Vec<(&str, Bytes)> = objects
        .iter()
        .map(|(name, bytes)| (*name, Bytes::copy_from_slice(bytes)))
        .collect();
    let raw_bytes: usize = objects.iter().map(|(_, b)| b.len()).sum();
    let scratch = format!(
        "{}/cellfleet-bench-ckpt-{}",
        url.trim_end_matches('/'),
        std::process::id()
    );
    let s3 = S3Options::default();
    let raw_store = Store::open(&format!("{scratch}/raw"), &s3)?;
    let checkpoints = Checkpoints::new(Store::open(&format!("{scratch}/ckpt"), &s3)?);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "checkpoint benchmark: {parameters} parameters; model {:.1} MB + optimizer {:.1} MB raw; store {url}; \
         {cores} cores; zstd level {}; both sides upload in parts of up to {} MiB ({PARTS_IN_FLIGHT} in flight) \
         and read in ranges of {} MiB ({RANGES_IN_FLIGHT} in flight), parts sized per object alike; {rounds} \
         rounds alternating order; MB = 1e6 bytes of raw data",
        model.len() as f64 / 1e6,
        optimizer.len() as f64 / 1e6,
        options.level,
        options.part_bytes >> 20,
        READ_RANGE_BYTES >> 20,
    );

    let raw_put = |round: usize| -> anyhow::Result<()> {
        for (name, bytes) in &raw_objects {
            let name = format!("round-{round}/{name}");
            // The part size the checkpoint side would use for these bytes.
            let part_bytes = checkpoints.part_bytes(options, bytes.len());
            if bytes.len() <= part_bytes {
                raw_store.put(&name, bytes.clone())?;
                continue;
            }
            let mut upload = raw_store.upload_parts(&name, PARTS_IN_FLIGHT)?;
            for start in (0..bytes.len()).step_by(part_bytes) {
                upload.put_part(bytes.slice(start..(start + part_bytes).min(bytes.len())))?;
            }
            upload.finish()?;
        }
        Ok(())
    };
    let raw_get = |round: usize| -> anyhow::Result<()> {
        for (name, bytes) in &raw_objects {
            let name = format!("round-{round}/{name}");
            let mut read = Vec::with_capacity(bytes.len());
            let outcome = raw_store.get_ranges_in_order(
                &name,
                bytes.len() as u64,
                READ_RANGE_BYTES,
                RANGES_IN_FLIGHT,
                |range| read.extend_from_slice(range),
            )?;
            anyhow::ensure!(
                outcome == RangedRead::Complete && read.len() == bytes.len(),
                "raw {name}: {outcome:?} after {} bytes",
                read.len()
            );
        }
        Ok(())
    };
    let mut stored_bytes = 0;
    let mut restored: Vec<Vec<u8>> = Vec::new();
    let mut seconds: std::collections::HashMap<(usize, u8), f64> = Default::default();
    let sides = [
        CkptSide::RawPut,
        CkptSide::Save,
        CkptSide::RawGet,
        CkptSide::Restore,
    ];
    for round in 0..rounds {
        let step = round as u64 + 1;
        // Each write precedes its read; which of the pair goes first alternates by round.
        let order = if round % 2 == 0 {
            sides
        } else {
            [
                CkptSide::Save,
                CkptSide::RawPut,
                CkptSide::Restore,
                CkptSide::RawGet,
            ]
        };
        for side in order {
            let started = Instant::now();
            match side {
                CkptSide::RawPut => raw_put(round)?,
                CkptSide::Save => {
                    let manifest =
                        checkpoints.commit(step, &objects, serde_json::json!({}), options)?;
                    stored_bytes = manifest.stored_bytes();
                }
                CkptSide::RawGet => raw_get(round)?,
                CkptSide::Restore => {
                    let manifest = checkpoints
                        .manifest(step)?
                        .map_err(|p| anyhow::anyhow!("{p}"))?;
                    restored.clear();
                    for (name, _) in &objects {
                        restored.push(
                            checkpoints
                                .read(&manifest, name)?
                                .map_err(|p| anyhow::anyhow!("{p}"))?,
                        );
                    }
                }
            }
            seconds.insert((round, side as u8), started.elapsed().as_secs_f64());
        }
        for ((name, bytes), read) in objects.iter().zip(&restored) {
            anyhow::ensure!(read == bytes, "checkpoint {name} reads back different");
        }
        // Keep the store from filling up over the rounds.
        for (name, _) in &objects {
            raw_store.delete(&format!("round-{round}/{name}"))?;
        }
        checkpoints.retain(1, 0)?;
    }
    // The last checkpoint is what retention keeps; delete it by hand.
    let ckpt_store = Store::open(&format!("{scratch}/ckpt"), &s3)?;
    let folder = cellfleet_shared::checkpoint::step_folder(rounds as u64);
    for (name, _) in &objects {
        ckpt_store.delete(&format!("{folder}/{name}.zst"))?;
    }
    ckpt_store.delete(&format!(
        "{folder}/{}",
        cellfleet_shared::checkpoint::MANIFEST_FILE
    ))?;
    ckpt_store.delete(cellfleet_shared::checkpoint::LATEST_FILE)?;
    println!(
        "stored {:.1} MB of {:.1} MB ({:.3} of raw)",
        stored_bytes as f64 / 1e6,
        raw_bytes as f64 / 1e6,
        stored_bytes as f64 / raw_bytes as f64
    );

    let rate =
        |round: usize, side: CkptSide| raw_bytes as f64 / 1e6 / seconds[&(round, side as u8)];
    let best = |side: CkptSide| (0..rounds).map(|r| rate(r, side)).fold(0.0, f64::max);
    let median = |side: CkptSide| {
        let mut rates: Vec<f64> = (0..rounds).map(|r| rate(r, side)).collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    print!("{:<32}", "MB/s of raw bytes");
    for round in 0..rounds {
        print!(" {:>9}", format!("round {}", round + 1));
    }
    println!(" {:>9} {:>9}", "median", "best");
    let names = [
        (CkptSide::RawPut, "raw PUT (multipart)"),
        (CkptSide::Save, "checkpoint save (commit)"),
        (CkptSide::RawGet, "raw GET (ranged)"),
        (CkptSide::Restore, "checkpoint restore (read all)"),
    ];
    for (side, name) in names {
        print!("{name:<32}");
        for round in 0..rounds {
            print!(" {:>9.1}", rate(round, side));
        }
        println!(" {:>9.1} {:>9.1}", median(side), best(side));
    }
    for (what, ours, raw) in [
        ("save / raw PUT", CkptSide::Save, CkptSide::RawPut),
        ("restore / raw GET", CkptSide::Restore, CkptSide::RawGet),
    ] {
        println!(
            "ratio {what}: median {:.2}x, best {:.2}x (target >= 0.8x)",
            median(ours) / median(raw),
            best(ours) / best(raw)
        );
    }
    Ok(())
}
