//! Rendezvous stores outside the cluster: in memory (ranks on threads of one process, i.e. tests) and in
//! a directory (ranks in processes of one machine, i.e. the benchmark).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::RendezvousStore;

/// Keys and values in a map shared by the threads of one process.
#[derive(Default)]
pub struct MemoryRendezvous {
    values: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemoryRendezvous {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl RendezvousStore for MemoryRendezvous {
    fn set(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(value) = values.get(key) {
                return Ok(value.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("key '{key}' was not set within {timeout:?}");
            }
            values = self
                .changed
                .wait_timeout(values, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// One file per key in a directory every rank can see; written to a temporary name and renamed, so a
/// reader sees a whole value or none. `get` polls.
pub struct DirRendezvous {
    dir: PathBuf,
}

impl DirRendezvous {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, key: &str) -> PathBuf {
        // Keys hold '/' and other characters a file name cannot: keep [A-Za-z0-9_-] and escape the rest.
        let mut name = String::with_capacity(key.len());
        for b in key.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02x}"));
            }
        }
        self.dir.join(name)
    }
}

impl RendezvousStore for DirRendezvous {
    fn set(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.path(key);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{:?}-{}",
            std::process::id(),
            std::thread::current().id(),
            path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        ));
        std::fs::write(&tmp, value).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    }

    fn get(&self, key: &str, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let path = self.path(key);
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::read(&path) {
                Ok(value) => return Ok(value),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            }
            if Instant::now() >= deadline {
                bail!(
                    "key '{key}' did not appear in {} within {timeout:?}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
