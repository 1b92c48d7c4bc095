//! Object-store access by URL: `file://` and plain paths by default, `s3://bucket/prefix` for any
//! S3-compatible server. Callers get a blocking facade because corpus building and loading run on plain
//! threads; the async client runs on a small runtime this type owns.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::error::{Error, Result};

/// S3 settings that may come from flags; anything left `None` falls back to the `AWS_*` variables.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// How long one request keeps retrying a server that fails or does not answer before the operation
    /// fails (default: object_store's 3 minutes). Checkpoint uploads use a bounded value so a dead server
    /// fails one save instead of stalling the next.
    pub retry_timeout: Option<std::time::Duration>,
}

/// A location in an object store: the store plus a prefix that every name is relative to.
#[derive(Clone)]
pub struct Store {
    url: String,
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: Arc<tokio::runtime::Runtime>,
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
            if let Some(limit) = s3.retry_timeout {
                builder = builder
                    .with_retry(object_store::RetryConfig {
                        retry_timeout: limit,
                        ..Default::default()
                    })
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_connect_timeout(limit.min(std::time::Duration::from_secs(5)))
                            .with_timeout(limit.max(std::time::Duration::from_secs(30))),
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
        })
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

    pub fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match self.runtime.block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.wrap(name, "delete", e)),
        }
    }
}
