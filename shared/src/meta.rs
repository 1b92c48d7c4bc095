//! The metadata store: the single source of truth for membership and job state. etcd v3 in a cluster, an
//! in-memory map in embedded mode, behind one trait; [`conformance`] is the test suite both must pass.
//!
//! The model is etcd's: keys with values and a modification revision, conditional writes on that revision,
//! and leases (a TTL that the owner keeps alive; when it lapses every key attached to it disappears).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, Result};

pub type LeaseId = i64;

/// A stored value and the store revision at which it was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub revision: i64,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Where the store lives, for messages (`memory`, `etcd http://...`).
    fn describe(&self) -> String;
    async fn get(&self, key: &str) -> Result<Option<Entry>>;
    /// Every key under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>>;
    /// Writes `value`; attached to `lease` when given (the key disappears with the lease). Returns the new
    /// revision.
    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64>;
    /// Writes only if the key is at revision `expected` (`None`: only if the key is absent). Returns the new
    /// revision, or `None` when the condition failed and nothing was written.
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<i64>>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Returns how many keys were deleted.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64>;
    /// A lease that lapses `ttl` after its last keep-alive (etcd rounds up to whole seconds).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Renews the lease; `false` when it has already lapsed (its keys are gone).
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool>;
    /// Ends the lease now, deleting its keys. Unknown leases are not an error.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
}

/// The embedded default: everything in one process's memory. Leases lapse lazily, checked on every call.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    revision: i64,
    next_lease: LeaseId,
    keys: BTreeMap<String, (Entry, Option<LeaseId>)>,
    leases: HashMap<LeaseId, (Duration, Instant)>,
}

impl MemoryState {
    fn expire(&mut self) {
        let now = Instant::now();
        let lapsed: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in lapsed {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: LeaseId) {
        if self.leases.remove(&id).is_some() {
            self.keys.retain(|_, (_, lease)| *lease != Some(id));
            self.revision += 1;
        }
    }

    fn write(&mut self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64> {
        if let Some(id) = lease {
            if !self.leases.contains_key(&id) {
                return Err(meta_error("memory", format!("lease {id:x} not found")));
            }
        }
        self.revision += 1;
        let entry = Entry {
            value: value.to_vec(),
            revision: self.revision,
        };
        self.keys.insert(key.to_string(), (entry, lease));
        Ok(self.revision)
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.expire();
        state
    }
}

fn meta_error(store: &str, why: impl Into<String>) -> Error {
    Error::Meta {
        store: store.to_string(),
        why: why.into(),
    }
}

#[async_trait]
impl MetaStore for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>> {
        Ok(self.state().keys.get(key).map(|(e, _)| e.clone()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>> {
        Ok(self
            .state()
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (e, _))| (k.clone(), e.clone()))
            .collect())
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64> {
        self.state().write(key, value, lease)
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<i64>> {
        let mut state = self.state();
        let current = state.keys.get(key).map(|(e, _)| e.revision);
        if current != expected {
            return Ok(None);
        }
        state.write(key, value, lease).map(Some)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut state = self.state();
        let existed = state.keys.remove(key).is_some();
        if existed {
            state.revision += 1;
        }
        Ok(existed)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let mut state = self.state();
        let before = state.keys.len();
        state.keys.retain(|k, _| !k.starts_with(prefix));
        let deleted = (before - state.keys.len()) as u64;
        if deleted > 0 {
            state.revision += 1;
        }
        Ok(deleted)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut state = self.state();
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(id, (ttl, Instant::now() + ttl));
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let mut state = self.state();
        Ok(match state.leases.get_mut(&lease) {
            Some((ttl, deadline)) => {
                *deadline = Instant::now() + *ttl;
                true
            }
            None => false,
        })
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.state().drop_lease(lease);
        Ok(())
    }
}

/// etcd v3. Every key is stored under `namespace`, so several clusters (or tests) share one etcd.
pub struct EtcdStore {
    client: etcd_client::Client,
    endpoints: Vec<String>,
    namespace: String,
}

/// TLS material for the etcd client, already read from its files.
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA (PEM) that signs the etcd servers' certificates.
    pub ca_pem: Vec<u8>,
    /// A client certificate and key (PEM), for etcd's `--client-cert-auth`.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: say only whether there is one.
        f.debug_struct("EtcdTls")
            .field("client_identity", &self.identity_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:2379`), failing within `timeout` when none answers.
    pub async fn connect(endpoints: &[String], namespace: &str, timeout: Duration) -> Result<Self> {
        Self::connect_with(endpoints, namespace, timeout, None).await
    }

    /// [`EtcdStore::connect`], over TLS when `tls` is given (`https://` endpoints).
    pub async fn connect_with(
        endpoints: &[String],
        namespace: &str,
        timeout: Duration,
        tls: Option<&EtcdTls>,
    ) -> Result<Self> {
        let describe = format!("etcd {}", endpoints.join(","));
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        if let Some(tls) = tls {
            if let Some(plain) = endpoints.iter().find(|e| !e.starts_with("https://")) {
                return Err(meta_error(
                    &describe,
                    format!("{plain}: TLS is configured for etcd, so endpoints must be https://"),
                ));
            }
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity_pem {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(config);
        }
        let mut client = etcd_client::Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| meta_error(&describe, format!("cannot connect: {e}")))?;
        // `connect` is lazy about the first request; a status call proves someone answers.
        client.status().await.map_err(|e| {
            meta_error(
                &describe,
                format!("no etcd answers there ({e}); is `etcd` running with --listen-client-urls on that address?"),
            )
        })?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
            namespace: namespace.to_string(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn fail(&self, op: &str, key: &str, e: etcd_client::Error) -> Error {
        meta_error(&self.describe(), format!("{op} {key}: {e}"))
    }

    fn entry(kv: &etcd_client::KeyValue) -> Entry {
        Entry {
            value: kv.value().to_vec(),
            revision: kv.mod_revision(),
        }
    }

    fn put_options(lease: Option<LeaseId>) -> Option<etcd_client::PutOptions> {
        lease.map(|id| etcd_client::PutOptions::new().with_lease(id))
    }
}

#[async_trait]
impl MetaStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let response = self
            .client
            .clone()
            .get(self.key(key), None)
            .await
            .map_err(|e| self.fail("get", key, e))?;
        Ok(response.kvs().first().map(Self::entry))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>> {
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
        let response = self
            .client
            .clone()
            .get(self.key(prefix), Some(options))
            .await
            .map_err(|e| self.fail("list", prefix, e))?;
        response
            .kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().map_err(|e| self.fail("list", prefix, e))?;
                let key = key.strip_prefix(&self.namespace).unwrap_or(key);
                Ok((key.to_string(), Self::entry(kv)))
            })
            .collect()
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64> {
        let response = self
            .client
            .clone()
            .put(self.key(key), value, Self::put_options(lease))
            .await
            .map_err(|e| self.fail("put", key, e))?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<i64>,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<i64>> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let full = self.key(key);
        let condition = match expected {
            None => Compare::version(full.clone(), CompareOp::Equal, 0),
            Some(revision) => Compare::mod_revision(full.clone(), CompareOp::Equal, revision),
        };
        let txn = Txn::new().when([condition]).and_then([TxnOp::put(
            full,
            value,
            Self::put_options(lease),
        )]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.fail("compare-and-put", key, e))?;
        Ok(response
            .succeeded()
            .then(|| response.header().map_or(0, |h| h.revision())))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let response = self
            .client
            .clone()
            .delete(self.key(key), None)
            .await
            .map_err(|e| self.fail("delete", key, e))?;
        Ok(response.deleted() > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let response = self
            .client
            .clone()
            .delete(
                self.key(prefix),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.fail("delete", prefix, e))?;
        Ok(response.deleted().max(0) as u64)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let response = self
            .client
            .clone()
            .lease_grant(seconds, None)
            .await
            .map_err(|e| self.fail("grant lease", &format!("ttl {seconds}s"), e))?;
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let attempt = async {
            let (mut keeper, mut stream) = self.client.clone().lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            // etcd answers a lapsed lease with TTL 0.
            Ok::<_, etcd_client::Error>(stream.message().await?.is_some_and(|r| r.ttl() > 0))
        };
        match attempt.await {
            Ok(alive) => Ok(alive),
            // ... or, depending on the version and timing, with "lease not found".
            Err(e) if e.to_string().contains("lease not found") => Ok(false),
            Err(e) => Err(self.fail("keep lease alive", &format!("{lease:x}"), e)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self.client.clone().lease_revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("lease not found") => Ok(()),
            Err(e) => Err(self.fail("revoke lease", &format!("{lease:x}"), e)),
        }
    }
}

/// The behaviour every [`MetaStore`] must have. Run against a fresh store (or a fresh namespace);
/// panics on the first violation. Takes about `3 x lease_ttl` (it waits for a lease to lapse).
pub async fn conformance(store: &dyn MetaStore, lease_ttl: Duration) {
    let name = store.describe();
    assert_eq!(store.get("a").await.unwrap(), None, "{name}: fresh store");

    // Revisions grow with every write; get and list see the latest value.
    let r1 = store.put("a", b"1", None).await.unwrap();
    let r2 = store.put("a", b"2", None).await.unwrap();
    assert!(r2 > r1, "{name}: revisions grow ({r1} then {r2})");
    let a = store.get("a").await.unwrap().expect("a was written");
    assert_eq!((a.value.as_slice(), a.revision), (&b"2"[..], r2), "{name}");

    // Prefix listing is ordered, exact about the prefix, and strips nothing else.
    store.put("jobs/2", b"x", None).await.unwrap();
    store.put("jobs/1", b"y", None).await.unwrap();
    store.put("jobsx", b"z", None).await.unwrap();
    let listed: Vec<String> = store
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, ["jobs/1", "jobs/2"], "{name}: list by prefix");

    // Compare-and-put: create-if-absent, then update only from the revision read.
    assert!(store
        .compare_and_put("c", None, b"first", None)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store
            .compare_and_put("c", None, b"again", None)
            .await
            .unwrap(),
        None,
        "{name}: create-if-absent on an existing key must fail"
    );
    let c = store.get("c").await.unwrap().unwrap();
    let stale = c.revision;
    assert!(store
        .compare_and_put("c", Some(stale), b"second", None)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store
            .compare_and_put("c", Some(stale), b"third", None)
            .await
            .unwrap(),
        None,
        "{name}: a stale revision must not write"
    );
    assert_eq!(store.get("c").await.unwrap().unwrap().value, b"second");

    // Deletes.
    assert!(store.delete("c").await.unwrap());
    assert!(!store.delete("c").await.unwrap());
    assert_eq!(store.delete_prefix("jobs/").await.unwrap(), 2);
    assert!(store.get("jobsx").await.unwrap().is_some(), "{name}");

    // Leases: kept alive, keys live; revoked, keys vanish; left alone, they lapse.
    let kept = store.grant_lease(lease_ttl).await.unwrap();
    let lapsing = store.grant_lease(lease_ttl).await.unwrap();
    let revoked = store.grant_lease(lease_ttl).await.unwrap();
    store.put("w/kept", b"k", Some(kept)).await.unwrap();
    store.put("w/lapsing", b"l", Some(lapsing)).await.unwrap();
    store.put("w/revoked", b"r", Some(revoked)).await.unwrap();
    store.revoke(revoked).await.unwrap();
    assert_eq!(
        store.get("w/revoked").await.unwrap(),
        None,
        "{name}: revoke"
    );
    store.revoke(revoked).await.unwrap();
    let deadline = Instant::now() + lease_ttl * 3;
    while store.get("w/lapsing").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "{name}: a lease left alone must lapse within 3 x its TTL"
        );
        assert!(store.keep_alive(kept).await.unwrap(), "{name}: keep-alive");
        tokio::time::sleep(lease_ttl / 8).await;
    }
    assert!(
        store.get("w/kept").await.unwrap().is_some(),
        "{name}: a kept-alive lease's key stays"
    );
    assert!(
        !store.keep_alive(lapsing).await.unwrap(),
        "{name}: keep-alive of a lapsed lease reports it"
    );
    assert!(
        store.put("w/late", b"x", Some(lapsing)).await.is_err(),
        "{name}: writing under a lapsed lease is an error"
    );
    store.revoke(kept).await.unwrap();
    assert_eq!(store.list("w/").await.unwrap(), vec![], "{name}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conforms() {
        conformance(&MemoryStore::new(), Duration::from_millis(300)).await;
    }
}
