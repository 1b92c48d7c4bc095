//! Where a run's outputs go: a local directory (the default), or an object-store location (`s3://`,
//! `file://`), so that a job whose workers share no disk writes its model, step log and sample logs
//! through the store layer.
//!
//! Logs are lines appended as training goes. A local log is a file appended to (and can be followed with
//! `tail -f`); an object cannot be appended to, so a stored log is kept in memory and the whole object is
//! put again at most every [`STORED_LOG_FLUSH`] and when the log is closed. A log that resumes a run keeps
//! the lines of the steps before the resume point.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cellfleet_shared::storage::{S3Options, Store};

/// How often a stored log is put again while it grows.
pub const STORED_LOG_FLUSH: Duration = Duration::from_secs(10);

/// A run's output location.
#[derive(Clone)]
pub struct OutputDir {
    location: String,
    /// The directory, when the location is a local path.
    local: Option<PathBuf>,
    store: Option<Store>,
}

impl std::fmt::Debug for OutputDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location)
    }
}

impl OutputDir {
    /// A local directory (created if missing).
    pub fn local(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            location: dir.display().to_string(),
            local: Some(dir.to_path_buf()),
            store: None,
        })
    }

    /// A local path, or an object-store URL (`s3://BUCKET/PREFIX`, `file://PATH`).
    pub fn open(location: &str, s3: &S3Options) -> anyhow::Result<Self> {
        if !location.contains("://") {
            return Self::local(Path::new(location));
        }
        let store = Store::open(location, s3)
            .with_context(|| format!("cannot open the output location {location}"))?;
        Ok(Self {
            location: location.trim_end_matches('/').to_string(),
            local: None,
            store: Some(store),
        })
    }

    /// Whether `location` names an object store rather than a local directory.
    pub fn is_store(location: &str) -> bool {
        location.contains("://")
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// The directory, when the location is a local one.
    pub fn local_path(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    /// Where output `name` is, for messages: a path or a URL.
    pub fn describe(&self, name: &str) -> String {
        match &self.local {
            Some(dir) => dir.join(name).display().to_string(),
            None => format!("{}/{name}", self.location),
        }
    }

    /// Writes output `name` (a relative path such as `samples/g1-r0.jsonl`) whole.
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        match (&self.local, &self.store) {
            (Some(dir), _) => {
                let path = dir.join(name);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
            }
            (None, Some(store)) => store
                .put(name, Bytes::from(bytes))
                .with_context(|| format!("cannot store {}", self.describe(name))),
            (None, None) => unreachable!("an output location is local or a store"),
        }
    }

    /// Reads output `name`, if it exists.
    pub fn get(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match (&self.local, &self.store) {
            (Some(dir), _) => match fs::read(dir.join(name)) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("cannot read {}", self.describe(name))),
            },
            (None, Some(store)) => Ok(store
                .get_opt(name)
                .with_context(|| format!("cannot read {}", self.describe(name)))?
                .map(|b| b.to_vec())),
            (None, None) => unreachable!("an output location is local or a store"),
        }
    }

    /// Opens log `name` for appending lines. With `keep_through_step`, the lines of an earlier run whose
    /// `step` is at most that are kept (a resumed run); otherwise the log starts empty.
    pub fn line_log(&self, name: &str, keep_through_step: Option<u64>) -> anyhow::Result<LineLog> {
        let kept: String = match keep_through_step {
            Some(through) => {
                let old = self.get(name)?.unwrap_or_default();
                String::from_utf8_lossy(&old)
                    .lines()
                    .filter(|line| {
                        serde_json::from_str::<serde_json::Value>(line)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|step| step <= through)
                    })
                    .map(|line| format!("{line}\n"))
                    .collect()
            }
            None => String::new(),
        };
        self.put(name, kept.clone().into_bytes())?;
        let sink = match &self.local {
            Some(dir) => {
                let path = dir.join(name);
                Sink::File(
                    fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .with_context(|| format!("cannot open {}", path.display()))?,
                )
            }
            None => Sink::Stored {
                text: kept,
                dirty: false,
                last_put: Instant::now(),
            },
        };
        Ok(LineLog {
            out: self.clone(),
            name: name.to_string(),
            sink,
        })
    }
}

enum Sink {
    File(fs::File),
    Stored {
        text: String,
        dirty: bool,
        last_put: Instant,
    },
}

/// A log of lines in an [`OutputDir`]; stored logs are put on [`LineLog::flush`], every
/// [`STORED_LOG_FLUSH`], and when dropped.
pub struct LineLog {
    out: OutputDir,
    name: String,
    sink: Sink,
}

impl LineLog {
    /// Appends `line` (without its newline).
    pub fn append(&mut self, line: &str) -> anyhow::Result<()> {
        match &mut self.sink {
            Sink::File(file) => writeln!(file, "{line}")
                .with_context(|| format!("cannot append to {}", self.out.describe(&self.name))),
            Sink::Stored {
                text,
                dirty,
                last_put,
            } => {
                text.push_str(line);
                text.push('\n');
                *dirty = true;
                if last_put.elapsed() >= STORED_LOG_FLUSH {
                    self.flush()
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Makes every appended line durable where the log lives.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        match &mut self.sink {
            Sink::File(file) => file
                .flush()
                .with_context(|| format!("cannot write {}", self.out.describe(&self.name))),
            Sink::Stored {
                text,
                dirty,
                last_put,
            } => {
                if *dirty {
                    self.out.put(&self.name, text.clone().into_bytes())?;
                    *dirty = false;
                    *last_put = Instant::now();
                }
                Ok(())
            }
        }
    }
}

impl Drop for LineLog {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_log(out: &OutputDir) {
        let mut log = out.line_log("train_log.jsonl", None).unwrap();
        for step in 1..=4 {
            log.append(&format!("{{\"step\":{step}}}")).unwrap();
        }
        drop(log);
        // A resume from step 2 keeps steps 1 and 2 and goes on from there.
        let mut log = out.line_log("train_log.jsonl", Some(2)).unwrap();
        log.append("{\"step\":3,\"again\":true}").unwrap();
        log.flush().unwrap();
        let text = String::from_utf8(out.get("train_log.jsonl").unwrap().unwrap()).unwrap();
        assert_eq!(
            text,
            "{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"again\":true}\n"
        );
        out.put("samples/g1-r0.jsonl", b"x\n".to_vec()).unwrap();
        assert_eq!(out.get("samples/g1-r0.jsonl").unwrap().unwrap(), b"x\n");
        assert!(out.get("missing").unwrap().is_none());
    }

    #[test]
    fn logs_resume_alike_in_a_directory_and_in_a_store() {
        let dir = tempfile::tempdir().unwrap();
        check_log(
            &OutputDir::open(
                dir.path().join("plain").to_str().unwrap(),
                &S3Options::default(),
            )
            .unwrap(),
        );
        let url = format!("file://{}", dir.path().join("stored").display());
        let stored = OutputDir::open(&url, &S3Options::default()).unwrap();
        assert!(stored.describe("model.safetensors").starts_with("file://"));
        check_log(&stored);
    }
}
