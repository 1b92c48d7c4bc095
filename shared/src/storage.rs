//! Object-store access by URL: `file://` and plain paths by default, `s3://bucket/prefix` for any
//! S3-compatible server. Callers get a blocking facade because corpus building and loading run on plain
//! threads; the async client runs on a small runtime this type owns.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, MultipartUpload, ObjectStore, PutPayload};
use tokio::task::JoinSet;

use crate::error::{Error, Result};

/// S3 settings that may come from flags; anything left `None` falls back to the `AWS_*` variables.
#[derive(Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// How long one request keeps retrying a server that fails or does not answer before the operation
    /// fails (default: object_store's 3 minutes). Checkpoint uploads use a bounded value so a dead server
    /// fails one save instead of stalling the next.
    pub retry_timeout: Option<std::time::Duration>,
    /// Access key and secret (default: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`); set in code when one
    /// process talks to several servers, as the tests do.
    pub credentials: Option<(String, String)>,
}

/// Never prints the secret.
impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("retry_timeout", &self.retry_timeout)
            .field(
                "access_key_id",
                &self.credentials.as_ref().map(|(key, _)| key),
            )
            .finish_non_exhaustive()
    }
}

/// The smallest part other than the last that S3 accepts in a multipart upload.
pub const S3_MIN_PART_BYTES: usize = 5 << 20;
/// The most parts S3 accepts in one multipart upload.
pub const S3_MAX_PARTS: usize = 10_000;

/// A location in an object store: the store plus a prefix that every name is relative to.
#[derive(Clone)]
pub struct Store {
    url: String,
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: Arc<tokio::runtime::Runtime>,
    is_s3: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

impl Store {
    /// Opens `url`. Plain paths and `file://` URLs are directories (created when missing).
    pub fn open(url: &str, s3: &S3Options) -> Result<Self> {
        let bad = |why: String| Error::BadUrl {
            url: url.to_string(),
            why,
        };
        let (inner, prefix): (Arc<dyn ObjectStore>, ObjectPath) = if let Some(rest) =
            url.strip_prefix("s3://")
        {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("expected s3://BUCKET/PREFIX".into()));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let endpoint = s3
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
            if let Some(endpoint) = endpoint {
                builder = builder
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_endpoint(endpoint);
            }
            if let Some(region) = &s3.region {
                builder = builder.with_region(region);
            }
            if let Some((key_id, secret)) = &s3.credentials {
                builder = builder
                    .with_access_key_id(key_id)
                    .with_secret_access_key(secret);
            }
            if let Some(limit) = s3.retry_timeout {
                // Set key by key: replacing the client options would drop the ones set above and from
                // the environment (allow-http among them).
                let millis = |d: std::time::Duration| format!("{}ms", d.as_millis());
                builder = builder
                    .with_retry(object_store::RetryConfig {
                        retry_timeout: limit,
                        ..Default::default()
                    })
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                        millis(limit.min(std::time::Duration::from_secs(5))),
                    )
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        millis(limit.max(std::time::Duration::from_secs(30))),
                    );
            }
            let store = builder
                .build()
                .map_err(|e| bad(format!("cannot configure S3 client: {e}")))?;
            let prefix =
                ObjectPath::parse(prefix.trim_end_matches('/')).map_err(|e| bad(e.to_string()))?;
            (Arc::new(store), prefix)
        } else if url.contains("://") && !url.starts_with("file://") {
            return Err(bad(
                "supported schemes are file:// (or a plain path) and s3://".into(),
            ));
        } else {
            let path = url.strip_prefix("file://").unwrap_or(url);
            std::fs::create_dir_all(path)
                .map_err(|e| bad(format!("cannot create directory: {e}")))?;
            let store = LocalFileSystem::new_with_prefix(path).map_err(|e| bad(e.to_string()))?;
            (Arc::new(store), ObjectPath::default())
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start I/O runtime: {e}")))?;
        Ok(Self {
            url: url.to_string(),
            inner,
            prefix,
            runtime: Arc::new(runtime),
            is_s3: url.starts_with("s3://"),
        })
    }

    /// The smallest part other than the last this store accepts in a multipart upload.
    pub fn min_part_bytes(&self) -> usize {
        if self.is_s3 {
            S3_MIN_PART_BYTES
        } else {
            1
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> ObjectPath {
        let mut path = self.prefix.clone();
        for part in name.split('/') {
            path = path.child(part);
        }
        path
    }

    fn wrap(&self, name: &str, op: &'static str, source: object_store::Error) -> Error {
        Error::Store {
            url: format!("{}/{name}", self.url.trim_end_matches('/')),
            op,
            source: Box::new(source),
        }
    }

    pub fn put(&self, name: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(name);
        self.runtime
            .block_on(self.inner.put(&path, PutPayload::from(bytes)))
            .map_err(|e| self.wrap(name, "put", e))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Bytes> {
        let path = self.path(name);
        self.runtime
            .block_on(async { self.inner.get(&path).await?.bytes().await })
            .map_err(|e| self.wrap(name, "get", e))
    }

    /// `Ok(None)` when the object does not exist.
    pub fn get_opt(&self, name: &str) -> Result<Option<Bytes>> {
        match self.get(name) {
            Ok(b) => Ok(Some(b)),
            Err(Error::Store { source, .. })
                if matches!(*source, object_store::Error::NotFound { .. }) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn exists(&self, name: &str) -> Result<bool> {
        let path = self.path(name);
        match self.runtime.block_on(self.inner.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.wrap(name, "head", e)),
        }
    }

    /// Names of the immediate "folders" under `prefix` (`""`: the store's top level), sorted.
    pub fn list_folders(&self, prefix: &str) -> Result<Vec<String>> {
        let path = if prefix.is_empty() {
            self.prefix.clone()
        } else {
            self.path(prefix)
        };
        let listed = self
            .runtime
            .block_on(self.inner.list_with_delimiter(Some(&path)))
            .map_err(|e| self.wrap(prefix, "list", e))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Names of the objects directly under the folder `prefix`, sorted.
    pub fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.path(prefix);
        let listed = self
            .runtime
            .block_on(self.inner.list_with_delimiter(Some(&path)))
            .map_err(|e| self.wrap(prefix, "list", e))?;
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Size of object `name`, `None` when it does not exist.
    pub fn size(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path(name);
        match self.runtime.block_on(self.inner.head(&path)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.wrap(name, "head", e)),
        }
    }

    /// Reads object `name`, expected to hold `expected_size` bytes, as ranged GETs of `range_bytes`, up to
    /// `in_flight` at once, and hands the ranges to `consume` in order on the calling thread, so work on
    /// one range overlaps the download of the next ones and at most `in_flight` ranges are buffered. Every
    /// answer carries the object's size, so a missing or resized object is reported without an extra
    /// request in the usual case.
    pub fn get_ranges_in_order(
        &self,
        name: &str,
        expected_size: u64,
        range_bytes: usize,
        in_flight: usize,
        mut consume: impl FnMut(&[u8]),
    ) -> Result<RangedRead> {
        let path = self.path(name);
        let range_bytes = range_bytes.max(1) as u64;
        let ranges = expected_size.div_ceil(range_bytes);
        if ranges == 0 {
            return Ok(match self.size(name)? {
                None => RangedRead::Missing,
                Some(0) => RangedRead::Complete,
                Some(size) => RangedRead::Size(size),
            });
        }
        type Answer = (u64, object_store::Result<(u64, Bytes)>);
        let mut downloads: JoinSet<Answer> = JoinSet::new();
        let mut arrived = std::collections::BTreeMap::new();
        let (mut next_to_start, mut next_to_consume) = (0u64, 0u64);
        while next_to_consume < ranges {
            while next_to_start < ranges && downloads.len() + arrived.len() < in_flight.max(1) {
                let start = next_to_start * range_bytes;
                let options = object_store::GetOptions {
                    range: Some((start..(start + range_bytes).min(expected_size)).into()),
                    ..Default::default()
                };
                let (inner, path, index) = (Arc::clone(&self.inner), path.clone(), next_to_start);
                downloads.spawn_on(
                    async move {
                        let answer = async {
                            let got = inner.get_opts(&path, options).await?;
                            let size = got.meta.size;
                            Ok((size, got.bytes().await?))
                        };
                        (index, answer.await)
                    },
                    self.runtime.handle(),
                );
                next_to_start += 1;
            }
            let Some(joined) = self.runtime.block_on(downloads.join_next()) else {
                unreachable!("a range is in flight while some are not consumed");
            };
            let (index, answer) = joined.map_err(|e| self.wrap(name, "get", join_error(e)))?;
            match answer {
                Ok((size, _)) if size != expected_size => return Ok(RangedRead::Size(size)),
                Ok((_, bytes)) => {
                    arrived.insert(index, bytes);
                }
                Err(object_store::Error::NotFound { .. }) => return Ok(RangedRead::Missing),
                // A range past the end of an object that shrank fails; say so rather than how.
                Err(e) => {
                    return match self.size(name)? {
                        None => Ok(RangedRead::Missing),
                        Some(size) if size != expected_size => Ok(RangedRead::Size(size)),
                        Some(_) => Err(self.wrap(name, "get", e)),
                    }
                }
            }
            while let Some(bytes) = arrived.remove(&next_to_consume) {
                consume(&bytes);
                next_to_consume += 1;
            }
        }
        Ok(RangedRead::Complete)
    }

    /// Puts that run on the store's runtime while the caller prepares the next object, up to `in_flight`
    /// at once; see [`BackgroundPuts`].
    pub fn background_puts(&self, in_flight: usize) -> BackgroundPuts<'_> {
        BackgroundPuts {
            store: self,
            in_flight: JoinSet::new(),
            max_in_flight: in_flight.max(1),
        }
    }

    /// Starts a multipart upload of `name` with up to `in_flight` parts on the wire at once. The object
    /// appears only when [`PartUpload::finish`] succeeds; parts must follow the store's
    /// [`Store::min_part_bytes`].
    pub fn upload_parts(&self, name: &str, in_flight: usize) -> Result<PartUpload<'_>> {
        let path = self.path(name);
        let upload = self
            .runtime
            .block_on(self.inner.put_multipart(&path))
            .map_err(|e| self.wrap(name, "start multipart upload of", e))?;
        Ok(PartUpload {
            store: self,
            name: name.to_string(),
            upload,
            in_flight: JoinSet::new(),
            max_in_flight: in_flight.max(1),
        })
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match self.runtime.block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.wrap(name, "delete", e)),
        }
    }
}

/// How a [`Store::get_ranges_in_order`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangedRead {
    /// Every byte was handed over.
    Complete,
    /// The object does not exist.
    Missing,
    /// The object has this size instead of the expected one (whatever was handed over is incomplete).
    Size(u64),
}

fn join_error(e: tokio::task::JoinError) -> object_store::Error {
    object_store::Error::Generic {
        store: "runtime",
        source: Box::new(e),
    }
}

/// A multipart upload in progress (see [`Store::upload_parts`]). Dropping it without [`PartUpload::finish`]
/// cancels the parts in flight; [`PartUpload::abort`] also asks the store to discard the stored parts.
pub struct PartUpload<'a> {
    store: &'a Store,
    name: String,
    upload: Box<dyn MultipartUpload>,
    in_flight: JoinSet<object_store::Result<()>>,
    max_in_flight: usize,
}

impl PartUpload<'_> {
    /// Sends the next part once fewer than the allowed number are in flight. A part that failed earlier
    /// fails this call, so a dead server stops the producer at its next part.
    pub fn put_part(&mut self, bytes: Bytes) -> Result<()> {
        while let Some(done) = self.in_flight.try_join_next() {
            self.check(done)?;
        }
        while self.in_flight.len() >= self.max_in_flight {
            let done = self.store.runtime.block_on(self.in_flight.join_next());
            if let Some(done) = done {
                self.check(done)?;
            }
        }
        let part = self.upload.put_part(PutPayload::from(bytes));
        self.in_flight.spawn_on(part, self.store.runtime.handle());
        Ok(())
    }

    /// Waits for every part, then completes the upload (the object appears now). On failure the upload
    /// is aborted.
    pub fn finish(mut self) -> Result<()> {
        while let Some(done) = self.store.runtime.block_on(self.in_flight.join_next()) {
            if let Err(e) = self.check(done) {
                self.abort();
                return Err(e);
            }
        }
        if let Err(e) = self.store.runtime.block_on(self.upload.complete()) {
            let error = self
                .store
                .wrap(&self.name, "complete multipart upload of", e);
            self.abort();
            return Err(error);
        }
        Ok(())
    }

    /// Cancels the parts in flight and asks the store to discard the parts already stored. Best effort:
    /// it runs after a failure, often one of the same server, so its own failure is only logged.
    pub fn abort(mut self) {
        self.store.runtime.block_on(self.in_flight.shutdown());
        if let Err(e) = self.store.runtime.block_on(self.upload.abort()) {
            tracing::warn!(
                "cannot abort the multipart upload of {}/{}: {e}",
                self.store.url.trim_end_matches('/'),
                self.name
            );
        }
    }

    fn check(
        &self,
        done: std::result::Result<object_store::Result<()>, tokio::task::JoinError>,
    ) -> Result<()> {
        done.map_err(join_error)
            .and_then(|stored| stored)
            .map_err(|e| self.store.wrap(&self.name, "upload part of", e))
    }
}

/// Single puts in flight (see [`Store::background_puts`]). An object is stored only once
/// [`BackgroundPuts::wait`] returns; dropping this cancels the puts not yet done.
pub struct BackgroundPuts<'a> {
    store: &'a Store,
    in_flight: JoinSet<(String, object_store::Result<()>)>,
    max_in_flight: usize,
}

impl BackgroundPuts<'_> {
    /// Starts putting `bytes` at `name` once fewer than the allowed number of puts are in flight. A put
    /// that failed earlier fails this call.
    pub fn put(&mut self, name: &str, bytes: Bytes) -> Result<()> {
        while let Some(done) = self.in_flight.try_join_next() {
            self.check(done)?;
        }
        while self.in_flight.len() >= self.max_in_flight {
            if let Some(done) = self.store.runtime.block_on(self.in_flight.join_next()) {
                self.check(done)?;
            }
        }
        let (inner, path, name) = (
            Arc::clone(&self.store.inner),
            self.store.path(name),
            name.to_string(),
        );
        self.in_flight.spawn_on(
            async move {
                let stored = inner.put(&path, PutPayload::from(bytes)).await;
                (name, stored.map(|_| ()))
            },
            self.store.runtime.handle(),
        );
        Ok(())
    }

    /// Waits until every put is done; the first failure is returned.
    pub fn wait(mut self) -> Result<()> {
        while let Some(done) = self.store.runtime.block_on(self.in_flight.join_next()) {
            self.check(done)?;
        }
        Ok(())
    }

    fn check(
        &self,
        done: std::result::Result<(String, object_store::Result<()>), tokio::task::JoinError>,
    ) -> Result<()> {
        match done {
            Ok((_, Ok(()))) => Ok(()),
            Ok((name, Err(e))) => Err(self.store.wrap(&name, "put", e)),
            Err(e) => Err(self.store.wrap("(background put)", "put", join_error(e))),
        }
    }
}
