//! What every part of the coordinator shares: its configuration, the metadata store as a typed handle
//! (records go in and come out as JSON; failures come back as [`CoordinatorError`]s that name the key),
//! the store's key layout, and the clock.
//!
//! Key layout. No prefix is the beginning of another, so listing one never returns another's keys:
//! * `workers/<worker>`: a member's `workers::WorkerRecord`, attached to its lease (the key
//!   disappears when the lease lapses or is revoked);
//! * `jobs/<job>`: a training job's record (`jobs`);
//! * `kv/<job>/<generation>/<key>`: the rendezvous exchange of one generation;
//! * `screens/<screen>`: a screen's `screens::ScreenRecord`;
//! * `screen-leases/<screen>/<unit>`: the `screens::UnitLease` of a unit being computed;
//! * `screen-done/<screen>/<unit>`: a completed unit's `screens::DoneUnit`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use cellfleet_shared::meta::{Entry, LeaseId, MetaStore};

use crate::error::{CoordinatorError, Result};

pub const WORKERS: &str = "workers/";
pub const JOBS: &str = "jobs/";
pub const KV: &str = "kv/";
pub const SCREENS: &str = "screens/";
pub const SCREEN_LEASES: &str = "screen-leases/";
pub const SCREEN_DONE: &str = "screen-done/";

/// Timing of membership.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A worker whose lease is not renewed for this long stops being a member.
    pub lease_ttl: Duration,
    /// How often workers renew (a third of the TTL by default).
    pub heartbeat_interval: Duration,
    /// How often membership is reconciled with the jobs' needs.
    pub tick: Duration,
}

impl CoordinatorConfig {
    pub fn with_lease_ttl(lease_ttl: Duration) -> Self {
        Self {
            lease_ttl,
            heartbeat_interval: lease_ttl / 3,
            tick: Duration::from_millis(200),
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (ids, lease deadlines).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The metadata store, typed: every failure is a [`CoordinatorError`] (`Store` when the store failed,
/// `Corrupt` naming the key when a stored record does not parse, `Internal` when one cannot be encoded).
#[derive(Clone)]
pub struct Store(Arc<dyn MetaStore>);

impl Store {
    pub fn new(store: Arc<dyn MetaStore>) -> Self {
        Self(store)
    }

    /// Where the store lives, for messages.
    pub fn describe(&self) -> String {
        self.0.describe()
    }

    /// Reads a stored record; a record that does not parse is data loss, named by its key.
    pub fn decode<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| CoordinatorError::Corrupt {
            store: self.describe(),
            key: key.to_string(),
            why: e.to_string(),
        })
    }

    /// The value under `key` and its revision.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>> {
        self.0.get(key).await.map_err(CoordinatorError::store)
    }

    /// The record under `key`.
    pub async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            Some(entry) => self.decode(key, &entry.value).map(Some),
            None => Ok(None),
        }
    }

    /// Every key and value under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>> {
        self.0.list(prefix).await.map_err(CoordinatorError::store)
    }

    /// Every record under `prefix`, in key order, with its key.
    pub async fn read_all<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>> {
        self.list(prefix)
            .await?
            .into_iter()
            .map(|(key, entry)| {
                let record = self.decode(&key, &entry.value)?;
                Ok((key, record))
            })
            .collect()
    }

    pub async fn put_bytes(&self, key: &str, value: &[u8]) -> Result<()> {
        self.0
            .put(key, value, None)
            .await
            .map_err(CoordinatorError::store)?;
        Ok(())
    }

    /// Writes `record` as JSON under `key`.
    pub async fn write<T: Serialize>(&self, key: &str, record: &T) -> Result<()> {
        self.put_bytes(key, &encode(key, record)?).await
    }

    /// Writes `record` only if `key` is absent, attached to `lease`; `false` when the key exists.
    pub async fn create<T: Serialize>(
        &self,
        key: &str,
        record: &T,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        let created = self
            .0
            .compare_and_put(key, None, &encode(key, record)?, lease)
            .await
            .map_err(CoordinatorError::store)?;
        Ok(created.is_some())
    }

    /// Writes `record` only if `key` is still at `revision`; `false` when another writer came first.
    pub async fn replace<T: Serialize>(
        &self,
        key: &str,
        revision: i64,
        record: &T,
    ) -> Result<bool> {
        let replaced = self
            .0
            .compare_and_put(key, Some(revision), &encode(key, record)?, None)
            .await
            .map_err(CoordinatorError::store)?;
        Ok(replaced.is_some())
    }

    /// Returns whether the key existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.0.delete(key).await.map_err(CoordinatorError::store)
    }

    /// Returns how many keys were deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.0
            .delete_prefix(prefix)
            .await
            .map_err(CoordinatorError::store)
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.0
            .grant_lease(ttl)
            .await
            .map_err(CoordinatorError::store)
    }

    /// Renews the lease; `false` when it has already lapsed.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        self.0
            .keep_alive(lease)
            .await
            .map_err(CoordinatorError::store)
    }

    /// Ends the lease now, deleting its keys.
    pub async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.0.revoke(lease).await.map_err(CoordinatorError::store)
    }
}

/// A record as JSON for the store; a record that cannot be encoded is a bug.
fn encode<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(record)
        .map_err(|e| CoordinatorError::Internal(format!("cannot encode {key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellfleet_shared::meta::MemoryStore;

    #[test]
    fn no_prefix_begins_another() {
        let prefixes = [WORKERS, JOBS, KV, SCREENS, SCREEN_LEASES, SCREEN_DONE];
        for a in prefixes {
            for b in prefixes {
                assert!(a == b || !b.starts_with(a), "{a} begins {b}");
            }
        }
    }

    #[tokio::test]
    async fn an_unparseable_record_is_data_loss_naming_its_key() {
        let store = Store::new(Arc::new(MemoryStore::new()));
        store.put_bytes("jobs/job-1", b"{not json").await.unwrap();
        let e = store
            .read::<serde_json::Value>("jobs/job-1")
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::DataLoss);
        assert!(
            e.to_string().contains("stored jobs/job-1 is unreadable"),
            "{e}"
        );
        assert!(store.create("a", &1, None).await.unwrap());
        assert!(!store.create("a", &2, None).await.unwrap(), "a taken key");
    }
}
