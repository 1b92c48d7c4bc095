//! The checkpoint layout in an object store and its commit protocol. What goes into a checkpoint is the
//! worker's business (`cellfleet_worker::train::checkpoint_state`); how it is stored, committed,
//! verified, found and retired is here.
//!
//! ```text
//! RUN/step-000000001200/<object>.zst   zstd-compressed objects, written first
//! RUN/step-000000001200/manifest.json  every object's name, sizes and blake3 (of the stored bytes), last
//! RUN/latest                           the step of the newest committed checkpoint, moved after the manifest
//! ```
//!
//! A reader never trusts an object the manifest does not vouch for, and a checkpoint without a manifest does
//! not exist. `latest` is a hint that speeds up finding the newest checkpoint; readers that find it stale or
//! broken fall back to listing. The protocol assumes a single committer per run (the coordinator's rank 0),
//! because S3-compatible servers do not all enforce conditional puts (Garage 2.5 accepts `If-None-Match`
//! and ignores it).

pub mod safetensors;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::{BackgroundPuts, PartUpload, RangedRead, Store, S3_MAX_PARTS};

pub const CHECKPOINT_FORMAT: &str = "cellfleet-checkpoint/1";
/// The manifest's name, the same as a corpus's (`corpus::manifest::MANIFEST_FILE`).
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest's name in checkpoints written before it matched the corpus's; still read (and retired).
pub const LEGACY_MANIFEST_FILE: &str = "MANIFEST.json";
pub const LATEST_FILE: &str = "latest";

/// Raw bytes compressed at a time (one zstd frame): the unit of pacing under a bandwidth cap, small
/// enough that a capped upload is smooth, large enough that frame overhead and lost matches do not show.
pub const COMPRESS_CHUNK_BYTES: usize = 1 << 20;
/// Parts of one object on the wire at once: enough to hide a request's latency behind the compression
/// of the next part, few enough that an upload holds only a handful of parts in memory.
pub const PARTS_IN_FLIGHT: usize = 4;
/// Objects stored larger than this are read as ranged GETs of this size, [`RANGES_IN_FLIGHT`] at once.
/// (Smaller ranges measured slower on Garage: ranges of 1-2 MiB halved a 9 MB object's read rate.)
pub const READ_RANGE_BYTES: usize = 8 << 20;
pub const RANGES_IN_FLIGHT: usize = 4;

/// How a checkpoint's objects are compressed and uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// zstd level (1 is fast and already shrinks optimizer moments well).
    pub level: i32,
    /// The largest part of a multipart upload. An object that compresses to less than one part goes in a
    /// single put; a larger one in parts of this size, or of a quarter of the object when that is smaller
    /// (so its upload overlaps its compression), at least 5 MiB on S3 and, under a bandwidth cap, at
    /// most about a quarter second of the cap.
    pub part_bytes: usize,
    /// Upload bandwidth cap in stored bytes, so checkpoint traffic leaves room for training traffic (None:
    /// unlimited). Paced per compressed chunk of at most [`COMPRESS_CHUNK_BYTES`].
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

/// Holds a commit's upload to `max_bytes_per_sec` on average: each chunk is let through once the bytes
/// before it have had their time at the cap, so the first goes at once and no window longer than one
/// chunk exceeds the cap.
struct Pacer {
    bytes_per_sec: Option<u64>,
    started: Instant,
    admitted: u64,
}

impl Pacer {
    fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.filter(|&rate| rate > 0),
            started: Instant::now(),
            admitted: 0,
        }
    }

    fn admit(&mut self, bytes: usize) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let due = self.started + Duration::from_secs_f64(self.admitted as f64 / rate as f64);
        self.admitted += bytes as u64;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// Decompresses a stored object (concatenated zstd frames) as its bytes arrive, straight into a buffer of
/// the manifest's raw size, so a read overlaps decompression with the download and never holds the
/// stored bytes whole.
struct Inflater {
    decoder: zstd::stream::raw::Decoder<'static>,
    raw: Vec<u8>,
    raw_bytes: u64,
    /// The decoder is inside a frame (zstd's hint of more input to come was not 0).
    inside_frame: bool,
    failure: Option<String>,
}

impl Inflater {
    fn new(raw_bytes: u64) -> std::io::Result<Self> {
        Ok(Self {
            decoder: zstd::stream::raw::Decoder::new()?,
            // The manifest is not itself hashed: a corrupt size must not reserve absurd memory up front.
            raw: Vec::with_capacity(raw_bytes.min(1 << 30) as usize),
            raw_bytes,
            inside_frame: false,
            failure: None,
        })
    }

    fn feed(&mut self, stored: &[u8]) {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        if self.failure.is_some() {
            return;
        }
        let mut input = InBuffer::around(stored);
        while input.pos() < stored.len() {
            let before = (input.pos(), self.raw.len());
            // Grow in steps up to the manifest's size, never past it: output beyond it stalls the decoder,
            // which is reported below.
            let want = (self.raw_bytes as usize)
                .saturating_sub(self.raw.len())
                .min(64 << 20);
            let spare = self.raw.capacity() - self.raw.len();
            if spare < want {
                self.raw.reserve_exact(want - spare);
            }
            let at = self.raw.len();
            let mut output = OutBuffer::around_pos(&mut self.raw, at);
            match self.decoder.run(&mut input, &mut output) {
                Ok(hint) => self.inside_frame = hint != 0,
                Err(e) => {
                    self.failure = Some(format!("does not decompress: {e}"));
                    return;
                }
            }
            if (input.pos(), self.raw.len()) == before {
                self.failure = Some(format!(
                    "decompresses to more than the {} bytes the manifest says",
                    self.raw_bytes
                ));
                return;
            }
        }
    }

    fn finish(self) -> std::result::Result<Vec<u8>, String> {
        if let Some(failure) = self.failure {
            return Err(failure);
        }
        if self.inside_frame {
            return Err("ends inside a zstd frame".into());
        }
        if self.raw.len() as u64 != self.raw_bytes {
            return Err(format!(
                "decompresses to {} bytes, the manifest says {}",
                self.raw.len(),
                self.raw_bytes
            ));
        }
        Ok(self.raw)
    }
}

/// An object as written, with the number of requests or parts it took.
struct StoredObject {
    entry: ObjectEntry,
    parts: usize,
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

/// `manifest.json`: written only after every object it lists is stored.
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
    /// The object (or `manifest.json`) at fault.
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
    ///
    /// Each object is compressed in chunks of [`COMPRESS_CHUNK_BYTES`] (independent zstd frames, which
    /// decode as one stream) and hashed as it goes; an object whose stored bytes outgrow one part is sent
    /// as a multipart upload while later chunks are still being compressed, so memory stays at a few
    /// parts whatever the object's size, and a smaller one is sent with a single put that runs while the
    /// next object is compressed. Returns once every object is stored.
    pub fn write_objects(
        &self,
        step: u64,
        objects: &[(&str, &[u8])],
        options: &WriteOptions,
    ) -> Result<Vec<ObjectEntry>> {
        for (name, _) in objects {
            if name.is_empty()
                || name.contains('/')
                || *name == MANIFEST_FILE
                || *name == LEGACY_MANIFEST_FILE
            {
                return Err(Error::Config(format!(
                    "checkpoint object name {name:?} must be a plain file name other than {MANIFEST_FILE}"
                )));
            }
        }
        let mut pacer = Pacer::new(options.max_bytes_per_sec);
        // An object that fits one put uploads while the next one is compressed.
        let mut puts = self.store.background_puts(PARTS_IN_FLIGHT);
        let mut entries = Vec::with_capacity(objects.len());
        for (name, raw) in objects {
            let stored = self.write_object(step, name, raw, options, &mut pacer, &mut puts)?;
            tracing::debug!(
                "checkpoint {}: {name}: {} bytes stored of {} in {} request(s)",
                step_folder(step),
                stored.entry.stored_bytes,
                stored.entry.raw_bytes,
                stored.parts
            );
            entries.push(stored.entry);
        }
        puts.wait()?;
        Ok(entries)
    }

    /// The part size of an upload of `raw_bytes`: the requested size, but a quarter of a mid-sized object
    /// (so even its upload overlaps its compression), smaller under a bandwidth cap (a part leaves at line
    /// rate, so a cap is only smooth if a part is a fraction of a second of it), never below the store's
    /// minimum, and large enough that the object fits S3's part-count limit.
    pub fn part_bytes(&self, options: &WriteOptions, raw_bytes: usize) -> usize {
        let mut part = options
            .part_bytes
            .min((raw_bytes / 4).max(COMPRESS_CHUNK_BYTES));
        if let Some(rate) = options.max_bytes_per_sec {
            part = part.min(usize::try_from(rate / 4).unwrap_or(usize::MAX));
        }
        let most_stored = zstd::zstd_safe::compress_bound(COMPRESS_CHUNK_BYTES)
            * raw_bytes.div_ceil(COMPRESS_CHUNK_BYTES).max(1);
        part.max(self.store.min_part_bytes())
            .max(most_stored.div_ceil(S3_MAX_PARTS))
    }

    fn write_object(
        &self,
        step: u64,
        name: &str,
        raw: &[u8],
        options: &WriteOptions,
        pacer: &mut Pacer,
        puts: &mut BackgroundPuts<'_>,
    ) -> Result<StoredObject> {
        let path = format!("{}/{name}.zst", step_folder(step));
        let part_bytes = self.part_bytes(options, raw.len());
        let mut compressor =
            zstd::bulk::Compressor::new(options.level).map_err(Error::Compression)?;
        let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(COMPRESS_CHUNK_BYTES));
        let mut hasher = blake3::Hasher::new();
        let mut pending = BytesMut::new();
        let mut upload: Option<PartUpload<'_>> = None;
        let mut parts = 0;
        // An empty object still needs one (empty) frame to decode.
        let chunks: Box<dyn Iterator<Item = &[u8]>> = if raw.is_empty() {
            Box::new(std::iter::once(raw))
        } else {
            Box::new(raw.chunks(COMPRESS_CHUNK_BYTES))
        };
        let sent = (|| -> Result<()> {
            for chunk in chunks {
                frame.clear();
                compressor
                    .compress_to_buffer(chunk, &mut frame)
                    .map_err(Error::Compression)?;
                hasher.update(&frame);
                pacer.admit(frame.len());
                if pending.capacity() - pending.len() < frame.len() {
                    pending.reserve(part_bytes + frame.capacity());
                }
                pending.extend_from_slice(&frame);
                while pending.len() >= part_bytes {
                    let part = pending.split_to(part_bytes).freeze();
                    if upload.is_none() {
                        upload = Some(self.store.upload_parts(&path, PARTS_IN_FLIGHT)?);
                    }
                    upload.as_mut().expect("started above").put_part(part)?;
                    parts += 1;
                }
            }
            Ok(())
        })();
        let stored_bytes = parts as u64 * part_bytes as u64 + pending.len() as u64;
        match (sent, upload) {
            (Err(e), Some(upload)) => {
                upload.abort();
                return Err(e);
            }
            (Err(e), None) => return Err(e),
            (Ok(()), None) => {
                puts.put(&path, pending.freeze())?;
                parts = 1;
            }
            (Ok(()), Some(mut upload)) => {
                if !pending.is_empty() {
                    if let Err(e) = upload.put_part(pending.freeze()) {
                        upload.abort();
                        return Err(e);
                    }
                    parts += 1;
                }
                upload.finish()?;
            }
        }
        Ok(StoredObject {
            entry: ObjectEntry {
                name: name.to_string(),
                raw_bytes: raw.len() as u64,
                stored_bytes,
                blake3: hasher.finalize().to_hex().to_string(),
            },
            parts,
        })
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

    /// Deletes checkpoint `step`'s manifest under either name.
    fn delete_manifest(&self, step: u64) -> Result<()> {
        for name in [MANIFEST_FILE, LEGACY_MANIFEST_FILE] {
            self.store
                .delete(&format!("{}/{name}", step_folder(step)))?;
        }
        Ok(())
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
        let folder = step_folder(step);
        let stored = match self.store.get_opt(&format!("{folder}/{MANIFEST_FILE}"))? {
            Some(bytes) => Some(bytes),
            None => self
                .store
                .get_opt(&format!("{folder}/{LEGACY_MANIFEST_FILE}"))?,
        };
        let Some(bytes) = stored else {
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
    /// A large object is fetched as concurrent ranged GETs, hashed and decompressed as the ranges arrive;
    /// the bytes are returned only once the whole object has matched the manifest.
    pub fn read(
        &self,
        manifest: &CheckpointManifest,
        name: &str,
    ) -> Result<std::result::Result<Vec<u8>, Problem>> {
        self.read_in_ranges(manifest, name, READ_RANGE_BYTES)
    }

    fn read_in_ranges(
        &self,
        manifest: &CheckpointManifest,
        name: &str,
        range_bytes: usize,
    ) -> Result<std::result::Result<Vec<u8>, Problem>> {
        let problem = |what: String| Problem {
            step: manifest.step,
            object: name.to_string(),
            what,
        };
        let Some(entry) = manifest.object(name) else {
            return Ok(Err(problem("not listed in the manifest".into())));
        };
        let path = format!("{}/{name}.zst", step_folder(manifest.step));
        let size_problem = |size: u64| {
            problem(format!(
                "{size} bytes stored, the manifest says {}",
                entry.stored_bytes
            ))
        };
        let mut hasher = blake3::Hasher::new();
        let mut inflater = Inflater::new(entry.raw_bytes).map_err(Error::Compression)?;
        if entry.stored_bytes <= range_bytes as u64 {
            let Some(stored) = self.store.get_opt(&path)? else {
                return Ok(Err(problem("missing".into())));
            };
            if stored.len() as u64 != entry.stored_bytes {
                return Ok(Err(size_problem(stored.len() as u64)));
            }
            hasher.update(&stored);
            inflater.feed(&stored);
        } else {
            let read = self.store.get_ranges_in_order(
                &path,
                entry.stored_bytes,
                range_bytes,
                RANGES_IN_FLIGHT,
                |range| {
                    hasher.update(range);
                    inflater.feed(range);
                },
            )?;
            match read {
                RangedRead::Complete => {}
                RangedRead::Missing => return Ok(Err(problem("missing".into()))),
                RangedRead::Size(size) => return Ok(Err(size_problem(size))),
            }
        }
        // Nothing decompressed is returned unless the stored bytes are the ones the manifest vouches for.
        let hash = hasher.finalize().to_hex().to_string();
        if hash != entry.blake3 {
            return Ok(Err(problem(format!(
                "content hash {hash}, the manifest says {} (corrupt or replaced)",
                entry.blake3
            ))));
        }
        Ok(inflater.finish().map_err(problem))
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
        for step in self.committed_steps()? {
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

    /// The steps readers may use, newest first: `latest` and the steps below it. A folder above `latest`
    /// was never committed (a save still writing or abandoned, a commit the coordinator refused, or the
    /// rest of a branch a run resumed from an older step replaced). Without a readable pointer, every step.
    pub fn committed_steps(&self) -> Result<Vec<u64>> {
        let mut steps = self.steps()?;
        if let Some(latest) = self.latest_pointer()? {
            // The pointer may name a step a listing has not caught up with yet.
            if !steps.contains(&latest) {
                steps.push(latest);
                steps.sort_unstable();
            }
            steps.retain(|&s| s <= latest);
        }
        steps.reverse();
        Ok(steps)
    }

    /// Deletes committed checkpoints except the newest `keep_last` and every one whose step is a multiple of
    /// `keep_every` (0: none kept that way), and every folder that is not a committed checkpoint: above
    /// `latest`, or without a manifest below the newest committed one. Only the run's committer calls this,
    /// right after moving `latest`, when none of its own saves is in flight. Returns the deleted steps.
    pub fn retain(&self, keep_last: usize, keep_every: u64) -> Result<Vec<u64>> {
        let steps = self.steps()?;
        let latest = self.latest_pointer()?;
        let mut committed = Vec::new();
        let mut abandoned = Vec::new();
        for &step in &steps {
            if latest.is_some_and(|l| step > l) {
                abandoned.push(step);
                continue;
            }
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
            self.delete_manifest(*step)?;
            for entry in &manifest.objects {
                self.store
                    .delete(&format!("{}/{}.zst", step_folder(*step), entry.name))?;
            }
            deleted.push(*step);
        }
        for step in abandoned {
            if newest.is_some_and(|n| step < n) || latest.is_some_and(|l| step > l) {
                // The manifest (if any) goes first; then whatever objects the folder holds.
                self.delete_manifest(step)?;
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
    use crate::storage::S3Options;

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
    fn a_checkpoint_with_the_legacy_manifest_name_reads_and_retires() {
        let (dir, c) = open();
        let m = save(&c, 100);
        save(&c, 200);
        let folder = dir.path().join(step_folder(100));
        assert!(folder.join(MANIFEST_FILE).exists());
        std::fs::rename(
            folder.join(MANIFEST_FILE),
            folder.join(LEGACY_MANIFEST_FILE),
        )
        .unwrap();
        assert_eq!(c.manifest(100).unwrap().unwrap(), m);
        assert_eq!(c.read(&m, "weights").unwrap().unwrap(), vec![100u8; 10_000]);
        assert_eq!(c.retain(1, 0).unwrap(), [100]);
        assert!(!folder.join(LEGACY_MANIFEST_FILE).exists());
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
        assert!(
            skipped.is_empty(),
            "a folder above `latest` is not a candidate"
        );
        // Keep the last 2 and every 200th: 100 and 300 go, and so does the unfinished 600 above `latest`
        // (retention runs in the committer when none of its saves is in flight).
        assert_eq!(c.retain(2, 200).unwrap(), [100, 300, 600]);
        assert_eq!(c.steps().unwrap(), [200, 400, 500]);
        // A run resumed from 400 commits 450: 500 (the replaced branch) is no longer readable, and goes.
        c.move_latest(400).unwrap();
        save(&c, 450);
        assert_eq!(c.committed_steps().unwrap(), [450, 400, 200]);
        assert_eq!(c.newest_valid().unwrap().0.unwrap().step, 450);
        assert_eq!(c.retain(1, 0).unwrap(), [200, 400, 500]);
        assert_eq!(c.steps().unwrap(), [450]);
    }

    /// Bytes zstd cannot shrink (so the stored size, and with it the part count, is predictable), with a
    /// compressible run in the middle so both kinds of frames appear.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let run = len / 3..len / 3 + len / 10;
        bytes[run].fill(7);
        bytes
    }

    #[test]
    fn a_large_object_goes_in_parts_and_reads_back_in_ranges() {
        let (dir, c) = open();
        let raw = noise(5 << 20, 1);
        let options = WriteOptions {
            part_bytes: 1 << 20,
            ..WriteOptions::default()
        };
        let mut pacer = Pacer::new(None);
        let mut puts = c.store.background_puts(1);
        let stored = c
            .write_object(300, "optimizer", &raw, &options, &mut pacer, &mut puts)
            .unwrap();
        let on_disk = std::fs::read(dir.path().join("step-000000000300/optimizer.zst")).unwrap();
        assert_eq!(stored.entry.stored_bytes, on_disk.len() as u64);
        assert_eq!(
            stored.entry.blake3,
            blake3::hash(&on_disk).to_hex().to_string()
        );
        assert_eq!(stored.entry.raw_bytes, raw.len() as u64);
        assert!(
            stored.entry.stored_bytes < raw.len() as u64,
            "the run compresses"
        );
        assert!(stored.parts >= 4, "{} parts", stored.parts);
        let m = c
            .write_manifest(300, vec![stored.entry], serde_json::Value::Null)
            .unwrap();
        // The chunked frames decode as one stream, through ranged reads and through a whole-object read.
        assert_eq!(
            c.read_in_ranges(&m, "optimizer", 300_000).unwrap().unwrap(),
            raw
        );
        assert_eq!(c.read(&m, "optimizer").unwrap().unwrap(), raw);
        assert_eq!(zstd::stream::decode_all(&on_disk[..]).unwrap(), raw);
        assert!(c.verify(300).unwrap().is_empty());

        // A flipped byte in the middle of a ranged read is named, like one in a single read.
        let mut corrupt = on_disk.clone();
        corrupt[on_disk.len() / 2] ^= 1;
        std::fs::write(dir.path().join("step-000000000300/optimizer.zst"), &corrupt).unwrap();
        let problem = c
            .read_in_ranges(&m, "optimizer", 300_000)
            .unwrap()
            .unwrap_err();
        assert_eq!(problem.object, "optimizer");
        assert!(problem.what.contains("content hash"), "{problem}");
        // A shortened or lengthened object is caught by the size the answers report, a deleted one by
        // its absence, on the ranged path as on the single-GET path.
        let path = dir.path().join("step-000000000300/optimizer.zst");
        let longer = [&on_disk[..], b"x"].concat();
        for (bytes, expected) in [
            (Some(&on_disk[..on_disk.len() - 1]), "bytes stored"),
            (Some(&longer[..]), "bytes stored"),
            (None, "missing"),
        ] {
            match bytes {
                Some(bytes) => std::fs::write(&path, bytes).unwrap(),
                None => std::fs::remove_file(&path).unwrap(),
            }
            for range_bytes in [300_000, READ_RANGE_BYTES] {
                let problem = c
                    .read_in_ranges(&m, "optimizer", range_bytes)
                    .unwrap()
                    .unwrap_err();
                assert!(problem.what.contains(expected), "{problem}");
            }
        }
    }

    #[test]
    fn a_misstated_raw_size_is_named_and_single_frame_objects_still_read() {
        let (dir, c) = open();
        let raw = noise(2 << 20, 5);
        let m = c
            .commit(
                5,
                &[("weights", &raw)],
                serde_json::Value::Null,
                &WriteOptions::default(),
            )
            .unwrap();
        let len = raw.len() as u64;
        for (raw_bytes, expected) in [(len + 1, "decompresses to"), (len - 1, "more than")] {
            let mut wrong = m.clone();
            wrong.objects[0].raw_bytes = raw_bytes;
            for range_bytes in [1 << 20, READ_RANGE_BYTES] {
                let problem = c
                    .read_in_ranges(&wrong, "weights", range_bytes)
                    .unwrap()
                    .unwrap_err();
                assert!(problem.what.contains(expected), "{problem}");
            }
        }
        // One frame for the whole object, as checkpoints were first written.
        let whole = zstd::bulk::compress(&raw, 1).unwrap();
        std::fs::create_dir_all(dir.path().join("step-000000000006")).unwrap();
        std::fs::write(dir.path().join("step-000000000006/weights.zst"), &whole).unwrap();
        let entry = ObjectEntry {
            name: "weights".into(),
            raw_bytes: len,
            stored_bytes: whole.len() as u64,
            blake3: blake3::hash(&whole).to_hex().to_string(),
        };
        let m = c
            .write_manifest(6, vec![entry], serde_json::Value::Null)
            .unwrap();
        assert_eq!(
            c.read_in_ranges(&m, "weights", 100_000).unwrap().unwrap(),
            raw
        );
    }

    #[test]
    fn small_and_empty_objects_take_one_put_and_commits_mix_them_with_parts() {
        let (_dir, c) = open();
        let options = WriteOptions {
            part_bytes: 1 << 20,
            ..WriteOptions::default()
        };
        let mut pacer = Pacer::new(None);
        let mut puts = c.store.background_puts(2);
        // Compresses below one part although the raw bytes are larger: one put.
        let zeros = vec![0u8; 3 << 20];
        let mut write = |name, raw| {
            c.write_object(1, name, raw, &options, &mut pacer, &mut puts)
                .unwrap()
                .parts
        };
        assert_eq!(write("zeros", &zeros), 1);
        assert_eq!(write("empty", &[]), 1);
        puts.wait().unwrap();
        assert_eq!(
            c.store.list_objects("step-000000000001").unwrap(),
            ["empty.zst", "zeros.zst"]
        );
        let big = noise(2_500_000, 2);
        let m = c
            .commit(
                2,
                &[("empty", &[]), ("big", &big), ("zeros", &zeros)],
                serde_json::json!({}),
                &options,
            )
            .unwrap();
        assert_eq!(c.read(&m, "empty").unwrap().unwrap(), Vec::<u8>::new());
        assert_eq!(c.read_in_ranges(&m, "big", 1 << 20).unwrap().unwrap(), big);
        assert_eq!(c.read(&m, "zeros").unwrap().unwrap(), zeros);
        assert_eq!(m.object("zeros").unwrap().raw_bytes, 3 << 20);
    }

    #[test]
    fn part_sizes_follow_the_store_the_cap_and_the_part_count_limit() {
        let (_dir, c) = open();
        let options = WriteOptions {
            part_bytes: 16 << 20,
            ..WriteOptions::default()
        };
        assert_eq!(c.part_bytes(&options, 100 << 20), 16 << 20);
        // A mid-sized object goes in four parts, so its upload overlaps its compression.
        assert_eq!(c.part_bytes(&options, 20 << 20), 5 << 20);
        assert_eq!(c.part_bytes(&options, 2 << 20), 1 << 20);
        let capped = WriteOptions {
            max_bytes_per_sec: Some(4 << 20),
            ..options
        };
        assert_eq!(c.part_bytes(&capped, 100 << 20), 1 << 20);
        // 10,000 parts of 16 MiB are not enough for 200 GiB.
        assert!(c.part_bytes(&options, 200 << 30) * crate::storage::S3_MAX_PARTS > 200 << 30);
        let s3 = Store::open("s3://bucket/run", &S3Options::default()).unwrap();
        let on_s3 = Checkpoints::new(s3);
        for (raw_bytes, options) in [(100 << 20, capped), (8 << 20, options)] {
            assert_eq!(
                on_s3.part_bytes(&options, raw_bytes),
                crate::storage::S3_MIN_PART_BYTES
            );
        }
    }

    #[test]
    fn a_bandwidth_cap_spreads_the_upload() {
        let (_dir, c) = open();
        let raw = noise(3 << 20, 3);
        let options = WriteOptions {
            max_bytes_per_sec: Some(8 << 20),
            ..WriteOptions::default()
        };
        let started = Instant::now();
        let m = c
            .commit(4, &[("weights", &raw)], serde_json::Value::Null, &options)
            .unwrap();
        // Every chunk but the last waits for the bytes before it to have had their time at the cap.
        let stored = m.stored_bytes() as f64;
        let least = (stored - COMPRESS_CHUNK_BYTES as f64 * 1.01) / (8 << 20) as f64;
        assert!(
            started.elapsed().as_secs_f64() >= least,
            "{stored} bytes in {:?}, the cap needs at least {least} s",
            started.elapsed()
        );
        assert_eq!(c.read(&m, "weights").unwrap().unwrap(), raw);
    }
}
