//! The checkpoint layout in an object store and its commit protocol (groundwork for checkpointed training:
//! what goes into a checkpoint is the worker's business; how it is stored, committed, verified, found and
//! retired is here).
//!
//! ```text
//! RUN/step-000000001200/<object>.zst   zstd-compressed objects, written first
//! RUN/step-000000001200/MANIFEST.json  every object's name, sizes and blake3 (of the stored bytes), last
//! RUN/latest                           the step of the newest committed checkpoint, moved after the manifest
//! ```
//!
//! A reader never trusts an object the manifest does not vouch for, and a checkpoint without a manifest does
//! not exist. `latest` is a hint that speeds up finding the newest checkpoint; readers that find it stale or
//! broken fall back to listing. The protocol assumes a single committer per run (the coordinator's rank 0),
//! because S3-compatible servers do not all enforce conditional puts (Garage 2.5 accepts `If-None-Match`
//! and ignores it).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::Store;

pub const CHECKPOINT_FORMAT: &str = "cellfleet-checkpoint/1";
pub const MANIFEST_FILE: &str = "MANIFEST.json";
pub const LATEST_FILE: &str = "latest";

/// How a checkpoint's objects are compressed and uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// zstd level (1 is fast and already shrinks optimizer moments well).
    pub level: i32,
    /// Objects larger than this are uploaded in parts of this size (S3 multipart).
    pub part_bytes: usize,
    /// Upload bandwidth cap, so checkpoint traffic leaves room for training traffic (None: unlimited).
    pub max_bytes_per_sec: Option<u64>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            level: 1,
            part_bytes: 16 << 20,
            max_bytes_per_sec: None,
        }
    }
}

/// One stored object of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectEntry {
    /// Name inside the checkpoint (without the `.zst` suffix of the stored object).
    pub name: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// blake3 of the stored (compressed) bytes.
    pub blake3: String,
}

/// `MANIFEST.json`: written only after every object it lists is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    pub format: String,
    pub step: u64,
    pub objects: Vec<ObjectEntry>,
    /// What the writer wants to record beside the objects (run config, corpus hash, world size, ...).
    pub meta: serde_json::Value,
}

impl CheckpointManifest {
    pub fn object(&self, name: &str) -> Option<&ObjectEntry> {
        self.objects.iter().find(|o| o.name == name)
    }

    pub fn stored_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_bytes).sum()
    }
}

/// Why a checkpoint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub step: u64,
    /// The object (or `MANIFEST.json`) at fault.
    pub object: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {}: {}: {}",
            step_folder(self.step),
            self.object,
            self.what
        )
    }
}

pub fn step_folder(step: u64) -> String {
    format!("step-{step:012}")
}

fn parse_step_folder(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() == 12).then(|| digits.parse().ok()).flatten()
}

/// The checkpoints of one run, under one store location.
pub struct Checkpoints {
    store: Store,
}

impl Checkpoints {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// Stores `objects` (compressed, hashed), then the manifest, then moves `latest`.
    /// Until the manifest is written nothing of this checkpoint is visible to readers; a failure before it
    /// leaves at most unreferenced objects, which the next commit of the same step overwrites.
    pub fn commit(
        &self,
        step: u64,
        objects: &[(&str, &[u8])],
        meta: serde_json::Value,
        options: &WriteOptions,
    ) -> Result<CheckpointManifest> {
        let entries = self.write_objects(step, objects, options)?;
        let manifest = self.write_manifest(step, entries, meta)?;
        self.move_latest(step)?;
        Ok(manifest)
    }

    /// Phase 1 of a commit: compresses, hashes and stores every object of checkpoint `step`. Nothing is
    /// visible to readers yet.
    pub fn write_objects(
        &self,
        step: u64,
        objects: &[(&str, &[u8])],
        options: &WriteOptions,
    ) -> Result<Vec<ObjectEntry>> {
        let folder = step_folder(step);
        let mut entries = Vec::with_capacity(objects.len());
        for (name, raw) in objects {
            if name.is_empty() || name.contains('/') || *name == MANIFEST_FILE {
                return Err(Error::Config(format!(
                    "checkpoint object name {name:?} must be a plain file name other than {MANIFEST_FILE}"
                )));
            }
            let stored = zstd::bulk::compress(raw, options.level).map_err(Error::Compression)?;
            entries.push(ObjectEntry {
                name: name.to_string(),
                raw_bytes: raw.len() as u64,
                stored_bytes: stored.len() as u64,
                blake3: blake3::hash(&stored).to_hex().to_string(),
            });
            self.store
                .put(&format!("{folder}/{name}.zst"), Bytes::from(stored))?;
        }
        Ok(entries)
    }

    /// Phase 2: the manifest, written only after every object it lists is stored. From here on the
    /// checkpoint exists for readers that list the run.
    pub fn write_manifest(
        &self,
        step: u64,
        objects: Vec<ObjectEntry>,
        meta: serde_json::Value,
    ) -> Result<CheckpointManifest> {
        let manifest = CheckpointManifest {
            format: CHECKPOINT_FORMAT.into(),
            step,
            objects,
            meta,
        };
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::Config(format!("checkpoint manifest: {e}")))?;
        self.store.put(
            &format!("{}/{MANIFEST_FILE}", step_folder(step)),
            Bytes::from(bytes),
        )?;
        Ok(manifest)
    }

    /// Phase 3: moves the run's `latest` pointer to `step` (only the run's single committer calls this).
    pub fn move_latest(&self, step: u64) -> Result<()> {
        self.store
            .put(LATEST_FILE, Bytes::from(step.to_string().into_bytes()))
    }

    /// Steps that have stored objects (committed or not), ascending.
    pub fn steps(&self) -> Result<Vec<u64>> {
        let mut steps = Vec::new();
        for name in self.store.list_folders("")? {
            let Some(step) = parse_step_folder(&name) else {
                continue;
            };
            // A local store keeps the empty folder of a deleted checkpoint; S3 has no empty folders.
            if !self.store.list_objects(&name)?.is_empty() {
                steps.push(step);
            }
        }
        steps.sort_unstable();
        Ok(steps)
    }

    /// The step `latest` points at, if the pointer exists and parses.
    pub fn latest_pointer(&self) -> Result<Option<u64>> {
        Ok(self
            .store
            .get_opt(LATEST_FILE)?
            .and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse().ok()))
    }

    /// The manifest of checkpoint `step`, or the problem that makes it unusable.
    pub fn manifest(&self, step: u64) -> Result<std::result::Result<CheckpointManifest, Problem>> {
        let problem = |what: String| Problem {
            step,
            object: MANIFEST_FILE.into(),
            what,
        };
        let Some(bytes) = self
            .store
            .get_opt(&format!("{}/{MANIFEST_FILE}", step_folder(step)))?
        else {
            return Ok(Err(problem("missing (the save did not finish)".into())));
        };
        let manifest: CheckpointManifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => return Ok(Err(problem(format!("unreadable: {e}")))),
        };
        if manifest.format != CHECKPOINT_FORMAT || manifest.step != step {
            return Ok(Err(problem(format!(
                "format {:?} step {}, expected {CHECKPOINT_FORMAT:?} step {step}",
                manifest.format, manifest.step
            ))));
        }
        Ok(Ok(manifest))
    }

    /// Reads object `name` of a checkpoint: size and hash checked against the manifest, then decompressed.
    pub fn read(
        &self,
        manifest: &CheckpointManifest,
        name: &str,
    ) -> Result<std::result::Result<Vec<u8>, Problem>> {
        let problem = |what: String| Problem {
            step: manifest.step,
            object: name.to_string(),
            what,
        };
        let Some(entry) = manifest.object(name) else {
            return Ok(Err(problem("not listed in the manifest".into())));
        };
        let Some(stored) = self
            .store
            .get_opt(&format!("{}/{name}.zst", step_folder(manifest.step)))?
        else {
            return Ok(Err(problem("missing".into())));
        };
        if stored.len() as u64 != entry.stored_bytes {
            return Ok(Err(problem(format!(
                "{} bytes stored, the manifest says {}",
                stored.len(),
                entry.stored_bytes
            ))));
        }
        let hash = blake3::hash(&stored).to_hex().to_string();
        if hash != entry.blake3 {
            return Ok(Err(problem(format!(
                "content hash {hash}, the manifest says {} (corrupt or replaced)",
                entry.blake3
            ))));
        }
        let raw = zstd::bulk::decompress(&stored, entry.raw_bytes as usize)
            .map_err(Error::Compression)?;
        if raw.len() as u64 != entry.raw_bytes {
            return Ok(Err(problem(format!(
                "decompresses to {} bytes, the manifest says {}",
                raw.len(),
                entry.raw_bytes
            ))));
        }
        Ok(Ok(raw))
    }

    /// Every problem of checkpoint `step` (empty: it is complete and intact).
    pub fn verify(&self, step: u64) -> Result<Vec<Problem>> {
        let manifest = match self.manifest(step)? {
            Ok(m) => m,
            Err(problem) => return Ok(vec![problem]),
        };
        let mut problems = Vec::new();
        for entry in &manifest.objects {
            if let Err(problem) = self.read(&manifest, &entry.name)? {
                problems.push(problem);
            }
        }
        Ok(problems)
    }

    /// The newest checkpoint that verifies, with the problems of every newer one that was passed over.
    pub fn newest_valid(&self) -> Result<(Option<CheckpointManifest>, Vec<Problem>)> {
        let mut skipped = Vec::new();
        let mut steps = self.steps()?;
        // The pointer may name a step whose folder a listing has not caught up with yet; try it as well.
        if let Some(latest) = self.latest_pointer()? {
            if !steps.contains(&latest) {
                steps.push(latest);
                steps.sort_unstable();
            }
        }
        for &step in steps.iter().rev() {
            let problems = self.verify(step)?;
            if problems.is_empty() {
                if let Ok(manifest) = self.manifest(step)? {
                    return Ok((Some(manifest), skipped));
                }
            }
            skipped.extend(problems);
        }
        Ok((None, skipped))
    }

    /// Deletes committed checkpoints except the newest `keep_last` and every one whose step is a multiple of
    /// `keep_every` (0: none kept that way). Folders without a manifest older than the newest committed
    /// checkpoint (abandoned saves) are deleted too. Returns the deleted steps.
    pub fn retain(&self, keep_last: usize, keep_every: u64) -> Result<Vec<u64>> {
        let steps = self.steps()?;
        let mut committed = Vec::new();
        let mut abandoned = Vec::new();
        for &step in &steps {
            match self.manifest(step)? {
                Ok(m) => committed.push((step, m)),
                Err(_) => abandoned.push(step),
            }
        }
        let newest = committed.last().map(|(s, _)| *s);
        let keep_from = committed.len().saturating_sub(keep_last.max(1));
        let mut deleted = Vec::new();
        for (i, (step, manifest)) in committed.iter().enumerate() {
            let periodic = keep_every > 0 && step % keep_every == 0;
            if i >= keep_from || periodic {
                continue;
            }
            // The manifest goes first: from then on the checkpoint does not exist for readers.
            self.store
                .delete(&format!("{}/{MANIFEST_FILE}", step_folder(*step)))?;
            for entry in &manifest.objects {
                self.store
                    .delete(&format!("{}/{}.zst", step_folder(*step), entry.name))?;
            }
            deleted.push(*step);
        }
        for step in abandoned {
            if newest.is_some_and(|n| step < n) {
                // Without a manifest the object names are unknown; a failed save writes only these.
                for name in self.store.list_objects(&step_folder(step))? {
                    self.store
                        .delete(&format!("{}/{name}", step_folder(step)))?;
                }
                deleted.push(step);
            }
        }
        deleted.sort_unstable();
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::S3Options;

    fn open() -> (tempfile::TempDir, Checkpoints) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &S3Options::default()).unwrap();
        (dir, Checkpoints::new(store))
    }

    fn save(c: &Checkpoints, step: u64) -> CheckpointManifest {
        let weights = vec![step as u8; 10_000];
        c.commit(
            step,
            &[("weights", &weights), ("optimizer", b"moments")],
            serde_json::json!({"world": 2}),
            &WriteOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn committed_checkpoints_read_back_and_latest_moves_last() {
        let (_dir, c) = open();
        assert_eq!(c.newest_valid().unwrap().0, None);
        let m = save(&c, 100);
        assert_eq!(c.latest_pointer().unwrap(), Some(100));
        save(&c, 200);
        assert_eq!(c.steps().unwrap(), [100, 200]);
        assert_eq!(c.latest_pointer().unwrap(), Some(200));
        let read = c.read(&m, "weights").unwrap().unwrap();
        assert_eq!(read, vec![100u8; 10_000]);
        assert!(
            m.object("weights").unwrap().stored_bytes < 1000,
            "compressed"
        );
        assert!(c.verify(200).unwrap().is_empty());
        assert!(c
            .commit(
                1,
                &[("a/b", b"x")],
                serde_json::Value::Null,
                &WriteOptions::default()
            )
            .is_err());
    }

    #[test]
    fn a_flipped_byte_is_named_and_the_previous_checkpoint_is_used() {
        let (dir, c) = open();
        save(&c, 100);
        save(&c, 200);
        let object = dir.path().join("step-000000000200/weights.zst");
        let mut bytes = std::fs::read(&object).unwrap();
        bytes[7] ^= 0x40;
        std::fs::write(&object, bytes).unwrap();
        let problems = c.verify(200).unwrap();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].object, "weights");
        assert!(
            problems[0].to_string().contains("content hash"),
            "{}",
            problems[0]
        );
        let (newest, skipped) = c.newest_valid().unwrap();
        assert_eq!(newest.unwrap().step, 100);
        assert_eq!(skipped, problems);
    }

    #[test]
    fn a_save_without_manifest_does_not_exist_and_retention_keeps_last_and_periodic() {
        let (dir, c) = open();
        for step in [100, 200, 300, 400, 500] {
            save(&c, step);
        }
        // An interrupted save of step 600: objects but no manifest, `latest` unmoved.
        std::fs::create_dir_all(dir.path().join("step-000000000600")).unwrap();
        std::fs::write(dir.path().join("step-000000000600/weights.zst"), b"partial").unwrap();
        assert_eq!(c.latest_pointer().unwrap(), Some(500));
        let (newest, skipped) = c.newest_valid().unwrap();
        assert_eq!(newest.unwrap().step, 500);
        assert_eq!(skipped[0].object, MANIFEST_FILE);
        // Keep the last 2 and every 200th: 100 and 300 go; the unfinished 600 is newer than every
        // committed checkpoint, so it stays (a save may still be writing it).
        assert_eq!(c.retain(2, 200).unwrap(), [100, 300]);
        assert_eq!(c.steps().unwrap(), [200, 400, 500, 600]);
        // Once 700 is committed the unfinished 600 is abandoned; 400 stays as a multiple of 200.
        save(&c, 700);
        assert_eq!(c.retain(2, 200).unwrap(), [600]);
        assert_eq!(c.steps().unwrap(), [200, 400, 500, 700]);
    }
}
