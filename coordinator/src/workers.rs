//! Membership. A worker registers and gets an id and a lease in the metadata store (`workers/<id>` is
//! attached to the lease), renews the lease with heartbeats, and stops being a member when the lease
//! lapses or is revoked (the coordinator revokes it as soon as the worker's assignment stream closes).
//! The store is the source of truth; this process keeps the lease ids only so heartbeats need no read.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cellfleet_shared::ids::{JobId, ScreenId, WorkerId};
use cellfleet_shared::meta::LeaseId;

use crate::error::{CoordinatorError, Result};
use crate::state::{now_ms, Store, WORKERS};

/// A worker as stored under `workers/<id>` (attached to its lease).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub hostname: String,
    pub pid: u32,
    pub device: String,
    pub lease: LeaseId,
}

/// A worker asking to be a member.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The id it had before losing its connection (say, the coordinator restarted); it keeps the id if
    /// its membership has not lapsed.
    pub previous: Option<WorkerId>,
    pub hostname: String,
    pub pid: u32,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
}

#[derive(Debug, Clone)]
pub struct Registered {
    pub worker: WorkerId,
    /// The worker kept its previous id and membership.
    pub resumed: bool,
}

/// What a member is doing, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    Job(JobId),
    Screen(ScreenId),
}

/// A member as listed: its record, whether its assignment stream is open, and its work.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub record: WorkerRecord,
    pub connected: bool,
    pub serving: Option<Serving>,
}

pub struct Membership {
    store: Store,
    lease_ttl: Duration,
    /// Worker leases, under their own (never awaited) lock so heartbeats never wait behind job updates.
    leases: std::sync::Mutex<HashMap<WorkerId, LeaseId>>,
}

impl Membership {
    /// The members the store already holds (a restarted coordinator keeps them).
    pub async fn load(store: Store, lease_ttl: Duration) -> Result<Self> {
        let leases = store
            .read_all::<WorkerRecord>(WORKERS)
            .await?
            .into_iter()
            .map(|(_, worker)| (worker.id, worker.lease))
            .collect();
        Ok(Self {
            store,
            lease_ttl,
            leases: std::sync::Mutex::new(leases),
        })
    }

    fn lease_table(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, LeaseId>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Members whose lease this process knows.
    pub fn known(&self) -> usize {
        self.lease_table().len()
    }

    /// Renews the membership of `registration.previous` if it is still alive, or makes a new member.
    pub async fn register(&self, registration: Registration) -> Result<Registered> {
        if let Some(previous) = registration.previous {
            if let Some(lease) = self.find_lease(&previous).await? {
                if self.store.keep_alive(lease).await? {
                    self.lease_table().insert(previous.clone(), lease);
                    return Ok(Registered {
                        worker: previous,
                        resumed: true,
                    });
                }
            }
        }
        let lease = self.store.grant_lease(self.lease_ttl).await?;
        let host = if registration.hostname.is_empty() {
            "worker"
        } else {
            &registration.hostname
        };
        // Unique even for containers that share a hostname and pid: the lease id is unique in the store,
        // and the key is created only if absent.
        let nonce = blake3::hash(format!("{}-{lease}-{}", now_ms(), registration.pid).as_bytes());
        let id = WorkerId::new(format!(
            "{host}-{}-{}",
            registration.pid,
            &nonce.to_hex()[..8]
        ));
        let record = WorkerRecord {
            id: id.clone(),
            hostname: registration.hostname,
            pid: registration.pid,
            device: registration.device,
            lease,
        };
        if !self
            .store
            .create(&format!("{WORKERS}{id}"), &record, Some(lease))
            .await?
        {
            let _ = self.store.revoke(lease).await;
            return Err(CoordinatorError::Conflict(format!(
                "worker id {id} is taken; register again"
            )));
        }
        tracing::info!(
            "worker {id} registered ({} pid {}, {})",
            record.hostname,
            record.pid,
            record.device
        );
        self.lease_table().insert(id.clone(), lease);
        Ok(Registered {
            worker: id,
            resumed: false,
        })
    }

    /// Renews a member's lease.
    pub async fn heartbeat(&self, worker: &WorkerId) -> Result<()> {
        let lease = self.lease_of(worker).await?;
        if !self.store.keep_alive(lease).await? {
            return Err(self.not_a_member(worker));
        }
        Ok(())
    }

    /// The lease of a member.
    pub async fn lease_of(&self, worker: &WorkerId) -> Result<LeaseId> {
        self.find_lease(worker)
            .await?
            .ok_or_else(|| self.not_a_member(worker))
    }

    async fn find_lease(&self, worker: &WorkerId) -> Result<Option<LeaseId>> {
        if let Some(lease) = self.lease_table().get(worker) {
            return Ok(Some(*lease));
        }
        let record: Option<WorkerRecord> = self.store.read(&format!("{WORKERS}{worker}")).await?;
        Ok(record.map(|r| r.lease))
    }

    /// The members now, from the store (a lapsed lease has taken its key with it).
    pub async fn live(&self) -> Result<HashSet<WorkerId>> {
        Ok(self
            .store
            .list(WORKERS)
            .await?
            .into_iter()
            .map(|(key, _)| WorkerId::from(&key[WORKERS.len()..]))
            .collect())
    }

    /// Forgets the leases of workers that are no longer members.
    pub fn retain(&self, live: &HashSet<WorkerId>) {
        self.lease_table().retain(|id, _| live.contains(id));
    }

    /// Forgets a worker whose membership is about to be ended with [`Membership::revoke`].
    pub fn forget(&self, worker: &WorkerId) {
        self.lease_table().remove(worker);
    }

    /// Ends a membership now: the lease is revoked, and `workers/<id>` with it.
    pub async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.store.revoke(lease).await
    }

    /// Every member's record (records that do not parse are left out of the listing).
    pub async fn records(&self) -> Result<Vec<WorkerRecord>> {
        Ok(self
            .store
            .list(WORKERS)
            .await?
            .into_iter()
            .filter_map(|(key, entry)| match self.store.decode(&key, &entry.value) {
                Ok(record) => Some(record),
                Err(e) => {
                    tracing::warn!("{e}");
                    None
                }
            })
            .collect())
    }

    pub fn not_a_member(&self, worker: &WorkerId) -> CoordinatorError {
        CoordinatorError::NotAMember {
            worker: worker.clone(),
            lease_ttl: self.lease_ttl,
        }
    }
}
