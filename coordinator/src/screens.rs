//! Screen work-unit leasing. A screen's plan (which genes x cells each numbered unit holds) is an object
//! the client wrote to the object store; the coordinator never reads it. It hands the units out under
//! renewable leases, records each unit's result once, and counts. Screens sit beside training jobs: they
//! share the store and the lock, not the job state machine.
//!
//! Store keys (three prefixes, see `state`, so that listing `screens/` never returns the
//! per-unit keys):
//! * `screens/<id>`: the [`ScreenRecord`];
//! * `screen-leases/<id>/<unit>`: the [`UnitLease`] of a unit being computed;
//! * `screen-done/<id>/<unit>`: the [`DoneUnit`] of a completed unit.
//!
//! A lease is *live* while its deadline has not passed and its holder is still a member (under
//! `workers/`). Liveness is evaluated when leasing and in status, so no timer is needed, and since the
//! coordinator ends the membership of a worker whose assignment stream closes, a killed worker's units are
//! free again at once rather than at their deadline. Completions are accepted with a stale token: a unit's
//! object sits under a deterministic key, so any holder's result is equally valid, and the first one
//! recorded wins.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use cellfleet_shared::ids::{ScreenId, WorkerId};

use crate::error::{CoordinatorError, Result};
use crate::state::{now_ms, Store, SCREENS, SCREEN_DONE, SCREEN_LEASES};

/// Lease length when a submission asks for none.
pub const DEFAULT_LEASE_MS: u64 = 30_000;
/// Shorter leases would expire between a worker's renewals under ordinary scheduling jitter.
pub const MIN_LEASE_MS: u64 = 1_000;
/// A unit that fails this often fails deterministically (bad plan, bad cell), so retrying it is futile.
pub const MAX_UNIT_FAILURES: u32 = 3;
/// How long a worker waits before asking again when every remaining unit is leased to someone else.
pub const RETRY_AFTER_MS: u64 = 300;

/// Where a screen is: running from its submission until every unit is recorded, a unit fails too often,
/// or a client cancels it. Stored as the lowercase word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScreenState {
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl ScreenState {
    pub fn name(self) -> &'static str {
        match self {
            ScreenState::Running => "running",
            ScreenState::Completed => "completed",
            ScreenState::Failed => "failed",
            ScreenState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for ScreenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A screen as stored under `screens/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenRecord {
    pub id: ScreenId,
    pub location: String,
    pub plan_blake3: String,
    pub summary: String,
    pub units_total: u32,
    pub pairs_total: u64,
    pub lease_ms: u64,
    pub threads: u32,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub state: ScreenState,
    pub message: String,
    pub created_unix_ms: u64,
    /// Units taken over after their holder was lost or let the lease expire.
    pub releases: u32,
    /// Failures per unit, only for units that failed at least once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<u32, u32>,
}

/// A unit's lease as stored under `screen-leases/<id>/<unit>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitLease {
    pub worker_id: WorkerId,
    pub token: u64,
    pub deadline_unix_ms: u64,
}

impl UnitLease {
    /// Whether nobody else may take the unit: the deadline is ahead and the holder is still a member.
    pub fn is_live(&self, now_ms: u64, members: &HashSet<WorkerId>) -> bool {
        self.deadline_unix_ms > now_ms && members.contains(&self.worker_id)
    }
}

/// A completed unit as stored under `screen-done/<id>/<unit>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneUnit {
    pub unit: u32,
    pub key: String,
    pub blake3: String,
    pub bytes: u64,
    pub pairs: u64,
    pub worker_id: WorkerId,
    pub seconds: f64,
}

/// A client's request for a new screen (its plan is already stored at `location`).
#[derive(Debug, Clone)]
pub struct ScreenSubmission {
    pub location: String,
    pub plan_blake3: String,
    /// Work units of the plan (numbered 0..units) and the (gene, cell) pairs they hold in all.
    pub units: u32,
    pub pairs: u64,
    /// How long a lease lasts without renewal (0: the default).
    pub lease_ms: u64,
    pub threads: u32,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub summary: String,
}

impl ScreenSubmission {
    /// Checks the submission and returns the lease length it asks for.
    fn lease_ms(&self) -> Result<u64> {
        if self.units == 0 {
            return Err(CoordinatorError::InvalidRequest(
                "screen units must be positive".into(),
            ));
        }
        let lease_ms = match self.lease_ms {
            0 => DEFAULT_LEASE_MS,
            ms if ms < MIN_LEASE_MS => {
                return Err(CoordinatorError::InvalidRequest(format!(
                    "screen lease_ms {ms} is below the minimum {MIN_LEASE_MS} (0: the default {DEFAULT_LEASE_MS})"
                )))
            }
            ms => ms,
        };
        if self.location.is_empty() {
            return Err(CoordinatorError::InvalidRequest(
                "screen location is empty".into(),
            ));
        }
        if self.plan_blake3.is_empty() {
            return Err(CoordinatorError::InvalidRequest(
                "screen plan_blake3 is empty".into(),
            ));
        }
        Ok(lease_ms)
    }
}

/// What a worker is told to do for a screen: work on its units until none is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScreenOrder {
    pub screen: ScreenId,
    pub location: String,
    pub plan_blake3: String,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub threads: u32,
}

/// A screen as a client sees it.
#[derive(Debug, Clone)]
pub struct ScreenStatus {
    pub id: ScreenId,
    pub state: ScreenState,
    pub message: String,
    pub location: String,
    pub plan_blake3: String,
    pub summary: String,
    pub units_total: u32,
    pub units_done: u32,
    pub units_leased: u32,
    pub pairs_total: u64,
    pub pairs_done: u64,
    pub pairs_per_second: f64,
    /// Estimated seconds to completion (negative: unknown yet).
    pub eta_seconds: f64,
    pub releases: u32,
    /// The completed units, when asked for.
    pub units: Vec<DoneUnit>,
    /// Workers holding a live lease, in id order.
    pub workers: Vec<WorkerId>,
}

/// The answer to a worker asking for a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// Compute `unit`, renewing the lease named by `token` within `lease_ms`.
    Leased {
        unit: u32,
        token: u64,
        lease_ms: u64,
    },
    /// Every remaining unit is leased to someone else: ask again after `retry_after_ms`.
    NoneFree { retry_after_ms: u64 },
    /// The screen is no longer running: stop.
    Stopped(ScreenState),
}

/// A holder renewing its lease on a unit.
#[derive(Debug, Clone)]
pub struct UnitRenewal {
    pub screen: ScreenId,
    pub unit: u32,
    pub token: u64,
}

/// The answer to a renewal: held on, or lost (stop the unit) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    Held,
    Lost(String),
}

/// A worker reporting a unit: its result object, or why it failed.
#[derive(Debug, Clone)]
pub struct UnitCompletion {
    pub worker: WorkerId,
    pub screen: ScreenId,
    pub unit: u32,
    pub token: u64,
    pub outcome: UnitOutcome,
}

#[derive(Debug, Clone)]
pub enum UnitOutcome {
    /// The result object under `key` (relative to the screen's location), with its hash and size.
    Done {
        key: String,
        blake3: String,
        bytes: u64,
        pairs: u64,
        seconds: f64,
    },
    Failed {
        error: String,
    },
}

/// The answer to a completion: recorded, or not (and why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    Recorded,
    Refused(String),
}

fn screen_key(id: &ScreenId) -> String {
    format!("{SCREENS}{id}")
}

fn lease_key(id: &str, unit: u32) -> String {
    format!("{SCREEN_LEASES}{id}/{unit}")
}

fn done_key(id: &str, unit: u32) -> String {
    format!("{SCREEN_DONE}{id}/{unit}")
}

/// `screen-leases/<id>/<unit>` -> (id, unit).
fn split_unit_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, u32)> {
    let (id, unit) = key.strip_prefix(prefix)?.rsplit_once('/')?;
    Some((id, unit.parse().ok()?))
}

/// One screen in memory: its record, live and stale leases, and completed units.
#[derive(Debug, Clone)]
pub struct Screen {
    pub record: ScreenRecord,
    pub leases: BTreeMap<u32, UnitLease>,
    pub done: BTreeMap<u32, DoneUnit>,
    pairs_done: u64,
    /// When this process first leased a unit of the screen, and the pairs done by then: the rate is
    /// measured from there (a restarted coordinator does not know how long the earlier units took).
    rate_origin: Option<(Instant, u64)>,
    /// When the screen stopped running in this process, which freezes its rate.
    ended: Option<Instant>,
}

impl Screen {
    pub fn new(record: ScreenRecord) -> Self {
        Self {
            record,
            leases: BTreeMap::new(),
            done: BTreeMap::new(),
            pairs_done: 0,
            rate_origin: None,
            ended: None,
        }
    }

    pub fn pairs_done(&self) -> u64 {
        self.pairs_done
    }

    fn record_done(&mut self, done: DoneUnit) {
        self.leases.remove(&done.unit);
        self.pairs_done += done.pairs;
        self.done.insert(done.unit, done);
    }

    pub fn all_done(&self) -> bool {
        self.done.len() as u64 >= u64::from(self.record.units_total)
    }

    /// The lowest unit neither done nor under a live lease.
    pub fn free_unit(&self, now_ms: u64, members: &HashSet<WorkerId>) -> Option<u32> {
        // Ends after at most (done + live leases + 1) steps, however many units the screen has.
        (0..self.record.units_total).find(|u| {
            !self.done.contains_key(u)
                && !self
                    .leases
                    .get(u)
                    .is_some_and(|l| l.is_live(now_ms, members))
        })
    }

    pub fn live_leases<'a>(
        &'a self,
        now_ms: u64,
        members: &'a HashSet<WorkerId>,
    ) -> impl Iterator<Item = (u32, &'a UnitLease)> + 'a {
        self.leases
            .iter()
            .filter(move |(_, l)| l.is_live(now_ms, members))
            .map(|(u, l)| (*u, l))
    }

    /// Pairs per second since this process first leased a unit (0 before any completion).
    pub fn rate(&self) -> f64 {
        let Some((since, base)) = self.rate_origin else {
            return 0.0;
        };
        let seconds = self
            .ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(since)
            .as_secs_f64();
        let pairs = self.pairs_done.saturating_sub(base);
        if seconds > 0.0 && pairs > 0 {
            pairs as f64 / seconds
        } else {
            0.0
        }
    }

    fn end(&mut self, state: ScreenState, message: String) {
        self.record.state = state;
        self.record.message = message;
        self.leases.clear();
        self.ended = Some(Instant::now());
    }

    /// The message of a screen whose last unit was just recorded.
    pub fn completion_message(&self, now_ms: u64) -> String {
        let seconds = now_ms.saturating_sub(self.record.created_unix_ms) as f64 / 1000.0;
        let rate = if seconds > 0.0 {
            self.pairs_done as f64 / seconds
        } else {
            0.0
        };
        let releases = match self.record.releases {
            0 => String::new(),
            1 => ", 1 unit re-leased".to_string(),
            n => format!(", {n} units re-leased"),
        };
        // Steered screens compute a few pairs per second: decimals where they matter.
        let rate = if rate >= 100.0 {
            format!("{rate:.0}")
        } else {
            format!("{rate:.2}")
        };
        format!(
            "completed: {} units, {} pairs in {seconds:.1} s ({rate} pairs/s){releases}",
            self.record.units_total,
            thousands(self.pairs_done)
        )
    }

    pub fn order(&self) -> ScreenOrder {
        let r = &self.record;
        ScreenOrder {
            screen: r.id.clone(),
            location: r.location.clone(),
            plan_blake3: r.plan_blake3.clone(),
            s3_endpoint: r.s3_endpoint.clone(),
            s3_region: r.s3_region.clone(),
            threads: r.threads,
        }
    }

    pub fn status(
        &self,
        include_units: bool,
        now_ms: u64,
        members: &HashSet<WorkerId>,
    ) -> ScreenStatus {
        let r = &self.record;
        let live: Vec<(u32, &UnitLease)> = self.live_leases(now_ms, members).collect();
        let workers: Vec<WorkerId> = live
            .iter()
            .map(|(_, l)| l.worker_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let rate = self.rate();
        let eta = match r.state {
            ScreenState::Completed => 0.0,
            ScreenState::Running if rate > 0.0 => {
                r.pairs_total.saturating_sub(self.pairs_done) as f64 / rate
            }
            _ => -1.0,
        };
        ScreenStatus {
            id: r.id.clone(),
            state: r.state,
            message: r.message.clone(),
            location: r.location.clone(),
            plan_blake3: r.plan_blake3.clone(),
            summary: r.summary.clone(),
            units_total: r.units_total,
            units_done: self.done.len() as u32,
            units_leased: live.len() as u32,
            pairs_total: r.pairs_total,
            pairs_done: self.pairs_done,
            pairs_per_second: rate,
            eta_seconds: eta,
            releases: r.releases,
            units: if include_units {
                self.done.values().cloned().collect()
            } else {
                Vec::new()
            },
            workers,
        }
    }
}

/// `12345` -> `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let head = match digits.len() % 3 {
        0 => 3,
        r => r,
    };
    let mut out = digits[..head].to_string();
    for group in digits.as_bytes()[head..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(group).expect("ASCII digits"));
    }
    out
}

/// Every screen the coordinator knows, in id (= submission) order. The operations below run under the
/// coordinator's lock from their checks to their last write, so two workers never take the same unit and
/// a completion never races a cancellation.
#[derive(Debug, Default)]
pub struct Screens {
    pub by_id: BTreeMap<ScreenId, Screen>,
    /// The last lease token handed out (or loaded): tokens grow across restarts.
    last_token: u64,
}

impl Screens {
    /// The screen an idle worker should work on: the oldest running one with units left.
    pub fn assigned(&self) -> Option<&Screen> {
        self.by_id
            .values()
            .find(|s| s.record.state == ScreenState::Running && !s.all_done())
    }

    pub fn is_running(&self, id: &ScreenId) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|s| s.record.state == ScreenState::Running)
    }

    /// A token unique across restarts: microseconds of wall-clock time, or one more than the last one.
    fn next_token(&mut self, now_ms: u64) -> u64 {
        self.last_token = (self.last_token + 1).max(now_ms.saturating_mul(1000));
        self.last_token
    }

    /// Reads the screens, their leases and completed units from the store.
    pub async fn load(store: &Store) -> Result<Self> {
        let mut screens = Screens::default();
        for (_, record) in store.read_all::<ScreenRecord>(SCREENS).await? {
            screens.by_id.insert(record.id.clone(), Screen::new(record));
        }
        for (key, lease) in store.read_all::<UnitLease>(SCREEN_LEASES).await? {
            let Some((id, unit)) = split_unit_key(SCREEN_LEASES, &key) else {
                tracing::warn!("ignoring the malformed lease key {key}");
                continue;
            };
            screens.last_token = screens.last_token.max(lease.token);
            match screens.by_id.get_mut(id) {
                Some(screen) => {
                    screen.leases.insert(unit, lease);
                }
                None => tracing::warn!("ignoring lease {key} of an unknown screen"),
            }
        }
        for (key, done) in store.read_all::<DoneUnit>(SCREEN_DONE).await? {
            match screens
                .by_id
                .get_mut(split_unit_key(SCREEN_DONE, &key).map_or("", |k| k.0))
            {
                Some(screen) if done.unit < screen.record.units_total => screen.record_done(done),
                _ => tracing::warn!("ignoring completed unit {key} of no known screen unit"),
            }
        }
        let now = now_ms();
        for screen in screens.by_id.values_mut() {
            // The coordinator stopped between recording the last unit and the screen's new state.
            if screen.record.state == ScreenState::Running && screen.all_done() {
                let message = screen.completion_message(now);
                screen.end(ScreenState::Completed, message);
                store
                    .write(&screen_key(&screen.record.id), &screen.record)
                    .await?;
            }
        }
        let running = screens
            .by_id
            .values()
            .filter(|s| s.record.state == ScreenState::Running)
            .count();
        if !screens.by_id.is_empty() {
            tracing::info!(
                "{}: {} screens ({running} running)",
                store.describe(),
                screens.by_id.len()
            );
        }
        Ok(screens)
    }

    fn get(&self, id: &ScreenId) -> Result<&Screen> {
        self.by_id
            .get(id)
            .ok_or_else(|| CoordinatorError::UnknownScreen(id.clone()))
    }

    /// Records a new running screen.
    pub async fn submit(
        &mut self,
        store: &Store,
        submission: ScreenSubmission,
    ) -> Result<ScreenId> {
        let lease_ms = submission.lease_ms()?;
        let now = now_ms();
        let mut id = format!("screen-{now}");
        while self.by_id.contains_key(id.as_str()) {
            id.push('x');
        }
        let id = ScreenId::new(id);
        let record = ScreenRecord {
            id: id.clone(),
            location: submission.location,
            plan_blake3: submission.plan_blake3,
            summary: submission.summary,
            units_total: submission.units,
            pairs_total: submission.pairs,
            lease_ms,
            threads: submission.threads,
            s3_endpoint: submission.s3_endpoint,
            s3_region: submission.s3_region,
            state: ScreenState::Running,
            message: format!(
                "running: {} units, {} pairs",
                submission.units,
                thousands(submission.pairs)
            ),
            created_unix_ms: now,
            releases: 0,
            failures: BTreeMap::new(),
        };
        store.write(&screen_key(&id), &record).await?;
        tracing::info!(
            "screen {id} submitted: {} units, {} pairs, plan {}/plan.json{}",
            record.units_total,
            record.pairs_total,
            record.location,
            if record.summary.is_empty() {
                String::new()
            } else {
                format!(" ({})", record.summary)
            }
        );
        self.by_id.insert(id.clone(), Screen::new(record));
        Ok(id)
    }

    /// Every screen's status (without units), in id order.
    pub fn statuses(&self, members: &HashSet<WorkerId>) -> Vec<ScreenStatus> {
        let now = now_ms();
        self.by_id
            .values()
            .map(|screen| screen.status(false, now, members))
            .collect()
    }

    pub fn status(
        &self,
        id: &ScreenId,
        include_units: bool,
        members: &HashSet<WorkerId>,
    ) -> Result<ScreenStatus> {
        Ok(self.get(id)?.status(include_units, now_ms(), members))
    }

    /// Cancels a running screen and frees its leases.
    pub async fn cancel(&mut self, store: &Store, id: &ScreenId) -> Result<()> {
        let screen = self
            .by_id
            .get_mut(id)
            .ok_or_else(|| CoordinatorError::UnknownScreen(id.clone()))?;
        if screen.record.state != ScreenState::Running {
            return Err(CoordinatorError::ScreenEnded {
                screen: id.clone(),
                state: screen.record.state.name(),
            });
        }
        let mut ended = screen.clone();
        ended.end(
            ScreenState::Cancelled,
            format!(
                "cancelled with {} of {} units done",
                screen.done.len(),
                screen.record.units_total
            ),
        );
        store.write(&screen_key(id), &ended.record).await?;
        tracing::info!("screen {id}: {}", ended.record.message);
        *screen = ended;
        store
            .delete_prefix(&format!("{SCREEN_LEASES}{id}/"))
            .await?;
        Ok(())
    }

    /// Leases the lowest free unit of screen `id` to `worker`, a member (`members` are the live ones: a
    /// unit whose holder is not among them is free).
    pub async fn lease_unit(
        &mut self,
        store: &Store,
        id: &ScreenId,
        worker: &WorkerId,
        members: &HashSet<WorkerId>,
    ) -> Result<LeaseAnswer> {
        let now = now_ms();
        let screen = self.get(id)?;
        if screen.record.state != ScreenState::Running {
            return Ok(LeaseAnswer::Stopped(screen.record.state));
        }
        let Some(unit) = screen.free_unit(now, members) else {
            return Ok(LeaseAnswer::NoneFree {
                retry_after_ms: RETRY_AFTER_MS,
            });
        };
        let previous = screen.leases.get(&unit).cloned();
        let lease_ms = screen.record.lease_ms;
        let token = self.next_token(now);
        let screen = self.by_id.get_mut(id).expect("found");
        let lease = UnitLease {
            worker_id: worker.clone(),
            token,
            deadline_unix_ms: now + lease_ms,
        };
        if let Some(previous) = &previous {
            let mut record = screen.record.clone();
            record.releases += 1;
            store.write(&screen_key(id), &record).await?;
            screen.record = record;
            let why = if members.contains(&previous.worker_id) {
                "its lease expired"
            } else {
                "it is no longer a member"
            };
            tracing::info!(
                "screen {id}: unit {unit} re-leased to {worker} ({} held it; {why})",
                previous.worker_id
            );
        }
        store.write(&lease_key(id.as_str(), unit), &lease).await?;
        screen.leases.insert(unit, lease);
        let pairs_done = screen.pairs_done;
        screen
            .rate_origin
            .get_or_insert_with(|| (Instant::now(), pairs_done));
        Ok(LeaseAnswer::Leased {
            unit,
            token,
            lease_ms,
        })
    }

    /// Extends the holder's lease; any other answer tells it to stop the unit.
    pub async fn renew_unit(&mut self, store: &Store, renewal: UnitRenewal) -> Result<Renewal> {
        let lost = |reason: String| Ok(Renewal::Lost(reason));
        let Some(screen) = self.by_id.get_mut(&renewal.screen) else {
            return lost(format!("unknown screen {:?}", renewal.screen.as_str()));
        };
        let (id, unit) = (&screen.record.id, renewal.unit);
        if screen.record.state != ScreenState::Running {
            return lost(format!("screen {id} is {}", screen.record.state));
        }
        if let Some(done) = screen.done.get(&unit) {
            return lost(format!(
                "unit {unit} is already completed (by {})",
                done.worker_id
            ));
        }
        let lease = match screen.leases.get(&unit) {
            Some(lease) if lease.token == renewal.token => lease,
            Some(lease) => {
                return lost(format!(
                    "the lease of unit {unit} was given to another worker ({})",
                    lease.worker_id
                ))
            }
            None => return lost(format!("unit {unit} is not leased")),
        };
        let renewed = UnitLease {
            deadline_unix_ms: now_ms() + screen.record.lease_ms,
            ..lease.clone()
        };
        store.write(&lease_key(id.as_str(), unit), &renewed).await?;
        screen.leases.insert(unit, renewed);
        Ok(Renewal::Held)
    }

    /// Records a unit's result (the first one wins, whichever holder sent it) or its failure (a unit that
    /// fails [`MAX_UNIT_FAILURES`] times fails the screen).
    pub async fn complete_unit(
        &mut self,
        store: &Store,
        completion: UnitCompletion,
    ) -> Result<Completion> {
        let refuse = |reason: String| Ok(Completion::Refused(reason));
        let Some(screen) = self.by_id.get_mut(&completion.screen) else {
            return refuse(format!("unknown screen {:?}", completion.screen.as_str()));
        };
        let (id, unit) = (screen.record.id.clone(), completion.unit);
        if unit >= screen.record.units_total {
            return Err(CoordinatorError::InvalidRequest(format!(
                "screen {id} has units 0..{}, not {unit}",
                screen.record.units_total
            )));
        }
        if screen.record.state != ScreenState::Running {
            return refuse(format!("screen {id} is {}", screen.record.state));
        }
        if let Some(done) = screen.done.get(&unit) {
            return refuse(format!(
                "unit {unit} already recorded (by {})",
                done.worker_id
            ));
        }
        // Only the current holder's report ends the lease: a late report from an earlier holder must not
        // free a unit someone else is computing.
        let holds = screen
            .leases
            .get(&unit)
            .is_some_and(|l| l.token == completion.token);
        match completion.outcome {
            UnitOutcome::Failed { error } => {
                let reason =
                    record_failure(store, screen, unit, holds, &completion.worker, &error).await?;
                refuse(reason)
            }
            UnitOutcome::Done {
                key,
                blake3,
                bytes,
                pairs,
                seconds,
            } => {
                if key.is_empty() {
                    return Err(CoordinatorError::InvalidRequest(format!(
                        "completion of screen {id} unit {unit} names no object key"
                    )));
                }
                let done = DoneUnit {
                    unit,
                    key,
                    blake3,
                    bytes,
                    pairs,
                    worker_id: completion.worker,
                    seconds,
                };
                record_done(store, screen, done, holds).await?;
                Ok(Completion::Recorded)
            }
        }
    }
}

/// Counts a unit's failure, frees its lease if the reporter held it, and fails the screen when the unit
/// failed too often. Returns the reason the completion is not recorded.
async fn record_failure(
    store: &Store,
    screen: &mut Screen,
    unit: u32,
    holds: bool,
    worker: &WorkerId,
    error: &str,
) -> Result<String> {
    let id = screen.record.id.clone();
    let mut after = screen.clone();
    let failures = after.record.failures.entry(unit).or_insert(0);
    *failures += 1;
    let failures = *failures;
    tracing::warn!(
        "screen {id}: unit {unit} failed on {worker} ({failures} of {MAX_UNIT_FAILURES}): {error}"
    );
    if holds {
        after.leases.remove(&unit);
    }
    let failed = failures >= MAX_UNIT_FAILURES;
    if failed {
        after.end(
            ScreenState::Failed,
            format!("unit {unit} failed {failures} times; last error (on {worker}): {error}"),
        );
        tracing::error!("screen {id}: {}", after.record.message);
    }
    store.write(&screen_key(&id), &after.record).await?;
    if failed {
        store
            .delete_prefix(&format!("{SCREEN_LEASES}{id}/"))
            .await?;
    } else if holds {
        store.delete(&lease_key(id.as_str(), unit)).await?;
    }
    let reason = if failed {
        after.record.message.clone()
    } else {
        format!("failure {failures} of {MAX_UNIT_FAILURES} of unit {unit} recorded")
    };
    *screen = after;
    Ok(reason)
}

/// Stores a unit's result, ends its lease, and completes the screen with its last unit.
async fn record_done(
    store: &Store,
    screen: &mut Screen,
    done: DoneUnit,
    holds: bool,
) -> Result<()> {
    let (id, unit) = (screen.record.id.clone(), done.unit);
    store.write(&done_key(id.as_str(), unit), &done).await?;
    if screen.leases.contains_key(&unit) {
        store.delete(&lease_key(id.as_str(), unit)).await?;
    }
    if !holds {
        tracing::info!(
            "screen {id}: unit {unit} completed by {} after its lease was lost (accepted: the result is the same)",
            done.worker_id
        );
    }
    screen.record_done(done);
    if screen.all_done() {
        let mut after = screen.clone();
        after.end(ScreenState::Completed, after.completion_message(now_ms()));
        store.write(&screen_key(&id), &after.record).await?;
        tracing::info!("screen {id}: {}", after.record.message);
        *screen = after;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(units: u32) -> ScreenRecord {
        ScreenRecord {
            id: "screen-1".into(),
            location: "/s".into(),
            plan_blake3: "ab".into(),
            summary: String::new(),
            units_total: units,
            pairs_total: 100,
            lease_ms: 1000,
            threads: 0,
            s3_endpoint: String::new(),
            s3_region: String::new(),
            state: ScreenState::Running,
            message: String::new(),
            created_unix_ms: 0,
            releases: 0,
            failures: BTreeMap::new(),
        }
    }

    fn lease(worker: &str, deadline: u64) -> UnitLease {
        UnitLease {
            worker_id: worker.into(),
            token: 1,
            deadline_unix_ms: deadline,
        }
    }

    #[test]
    fn free_unit_skips_done_and_live_leases_only() {
        let members: HashSet<WorkerId> = [WorkerId::from("a")].into();
        let mut s = Screen::new(record(4));
        s.leases.insert(0, lease("a", 2000));
        s.leases.insert(1, lease("gone", 2000));
        s.leases.insert(2, lease("a", 500));
        assert_eq!(s.free_unit(1000, &members), Some(1), "holder not a member");
        s.leases.remove(&1);
        s.done.insert(
            1,
            DoneUnit {
                unit: 1,
                key: "k".into(),
                blake3: "b".into(),
                bytes: 1,
                pairs: 1,
                worker_id: "a".into(),
                seconds: 0.0,
            },
        );
        assert_eq!(s.free_unit(1000, &members), Some(2), "deadline passed");
        assert_eq!(s.free_unit(400, &members), Some(3));
        s.leases.insert(3, lease("a", 2000));
        assert_eq!(s.free_unit(400, &members), None);
        assert_eq!(s.live_leases(400, &members).count(), 3);
    }

    #[test]
    fn records_round_trip_and_keys_parse() {
        let mut r = record(3);
        r.failures.insert(2, 1);
        let back: ScreenRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(serde_json::to_string(&record(1))
            .unwrap()
            .contains("\"state\":\"running\""));
        assert_eq!(
            split_unit_key(SCREEN_LEASES, &lease_key("screen-5x", 17)),
            Some(("screen-5x", 17))
        );
        assert!(!lease_key("a", 1).starts_with(SCREENS));
        assert!(!done_key("a", 1).starts_with(SCREENS));
    }

    #[test]
    fn tokens_grow_and_numbers_read_well() {
        let mut screens = Screens::default();
        let a = screens.next_token(5);
        let b = screens.next_token(5);
        let c = screens.next_token(4);
        assert!(a == 5000 && b == 5001 && c == 5002, "{a} {b} {c}");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(12345), "12,345");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
