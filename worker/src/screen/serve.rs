//! A fleet worker's loop over a screen: load it once, then lease, compute, store and complete units, with
//! lease renewal, until none is left or the worker is told to stop.

use crate::link::Rpc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use cellfleet_proto as pb;
use cellfleet_shared::screen::{unit_key, UnitResult};
use cellfleet_shared::storage::{S3Options, Store};
use tch::Device;

use super::compute::{Screener, UnitError};
use super::plan::load_plan;
use crate::retry::RetryPolicy;
use crate::screen::plan::open_location;
use crate::state_words::StateWord;

/// How long a screen worker waits for a lost coordinator before its screen thread gives up (the worker
/// daemon reconnects on its own and restarts the screen when the coordinator re-sends it).
const COORDINATOR_GIVE_UP: Duration = Duration::from_secs(120);

/// Serves a screen as a fleet worker: loads it once, then leases, computes, stores and completes units
/// until none is left or `stop` is set. A load failure is reported against a leased unit, so a screen
/// that no worker can load fails instead of waiting forever.
pub fn serve_screen(
    assignment: pb::ScreenAssignment,
    worker_id: &str,
    device: Device,
    client: Rpc,
    handle: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let session = Session {
        id: assignment.screen_id.clone(),
        worker_id: worker_id.to_string(),
        client,
        handle,
        // Leases and completions get through a coordinator restart; a final answer (the screen is gone,
        // the lease was taken over) is returned at once.
        policy: RetryPolicy::through_restarts(COORDINATOR_GIVE_UP),
    };
    let started = Instant::now();
    let (screener, store) = session.load(&assignment, device, &stop)?;
    eprintln!(
        "screen {}: loaded {} (checkpoint step {}) in {:.2}s",
        session.id,
        screener.plan.summary(),
        screener.plan.checkpoint.step,
        started.elapsed().as_secs_f64()
    );
    let units = screener.plan.unit_count();
    while !stop.load(Ordering::Relaxed) {
        let lease = session.lease()?;
        if !lease.leased {
            if lease.state() != pb::ScreenState::Running {
                eprintln!(
                    "screen {} is {}; no more units here",
                    session.id,
                    lease.state().word()
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(lease.retry_after_ms.clamp(50, 5000)));
            continue;
        }
        if lease.unit as usize >= units {
            bail!(
                "{}",
                session.say(&format!(
                    "the coordinator leased unit {}, the plan has {units}",
                    lease.unit
                ))
            );
        }
        // The lease is renewed in the background; losing it (or being told to stop) interrupts the unit.
        // It stays renewed through the upload and the completion.
        let renewal = session.renew_in_background(&lease, &stop);
        let unit_started = Instant::now();
        let computed = screener.compute_unit(lease.unit as usize, &renewal.lost);
        let outcome = session.finish_unit(&lease, computed, &store, unit_started, units);
        renewal.stop(&session.handle);
        outcome?;
    }
    Ok(())
}

/// One worker's conversation with the coordinator about one screen.
struct Session {
    id: String,
    worker_id: String,
    client: Rpc,
    handle: tokio::runtime::Handle,
    policy: RetryPolicy,
}

/// A lease renewed in the background until stopped; `lost` is set when the lease is lost or the worker
/// is told to stop.
struct Renewal {
    lost: Arc<AtomicBool>,
    done: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Renewal {
    fn stop(self, handle: &tokio::runtime::Handle) {
        self.done.notify_one();
        let _ = handle.block_on(self.task);
    }
}

impl Session {
    /// `what`, prefixed with the screen it is about.
    fn say(&self, what: &str) -> String {
        format!("screen {}: {what}", self.id)
    }

    fn lease(&self) -> anyhow::Result<pb::LeaseUnitResponse> {
        self.policy
            .run(|| {
                let mut request = tonic::Request::new(pb::LeaseUnitRequest {
                    worker_id: self.worker_id.clone(),
                    screen_id: self.id.clone(),
                });
                request.set_timeout(Duration::from_secs(10));
                self.handle
                    .block_on(self.client.clone().lease_unit(request))
                    .map(tonic::Response::into_inner)
            })
            .map_err(|e| anyhow!("{}", self.say(&format!("leasing a unit: {e}"))))
    }

    fn complete(
        &self,
        request: pb::CompleteUnitRequest,
    ) -> anyhow::Result<pb::CompleteUnitResponse> {
        self.policy
            .run(|| {
                let mut r = tonic::Request::new(request.clone());
                r.set_timeout(Duration::from_secs(10));
                self.handle
                    .block_on(self.client.clone().complete_unit(r))
                    .map(tonic::Response::into_inner)
            })
            .map_err(|e| {
                anyhow!(
                    "{}",
                    self.say(&format!("completing unit {}: {e}", request.unit))
                )
            })
    }

    /// Reports unit `lease.unit` as failed with `message` (three failures of one unit fail the screen).
    fn report_failure(&self, lease: &pb::LeaseUnitResponse, message: String) -> anyhow::Result<()> {
        self.complete(pb::CompleteUnitRequest {
            worker_id: self.worker_id.clone(),
            screen_id: self.id.clone(),
            unit: lease.unit,
            token: lease.token,
            error: message,
            ..Default::default()
        })?;
        Ok(())
    }

    /// Loads the screen's plan, model and cells. A failed load is reported against a leased unit and
    /// tried again: three reports fail the screen, so a screen no worker can load ends with the reason
    /// instead of waiting forever. A worker told to stop, or a screen no longer running, ends with the
    /// load error.
    fn load(
        &self,
        assignment: &pb::ScreenAssignment,
        device: Device,
        stop: &AtomicBool,
    ) -> anyhow::Result<(Screener, Store)> {
        let s3 = S3Options {
            endpoint: (!assignment.s3_endpoint.is_empty()).then(|| assignment.s3_endpoint.clone()),
            region: (!assignment.s3_region.is_empty()).then(|| assignment.s3_region.clone()),
            ..S3Options::default()
        };
        let load = || -> anyhow::Result<(Screener, Store)> {
            let store = open_location(&assignment.location, &s3)?;
            let plan = load_plan(&store, &assignment.plan_blake3)?;
            Ok((
                Screener::load(plan, &assignment.plan_blake3, &s3, device)?,
                store,
            ))
        };
        loop {
            let e = match load() {
                Ok(loaded) => return Ok(loaded),
                Err(e) => e,
            };
            let message = format!("{e:#}");
            eprintln!("{}", self.say(&format!("cannot load: {message}")));
            let lease = self.lease()?;
            if lease.leased {
                let worker_id = &self.worker_id;
                self.report_failure(
                    &lease,
                    format!("worker {worker_id} cannot load the screen: {message}"),
                )?;
            } else if lease.state() != pb::ScreenState::Running {
                return Err(e);
            }
            if stop.load(Ordering::Relaxed) {
                return Err(e);
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Renews `lease` every third of its length; checks `stop` often, so an Idle order interrupts the
    /// unit within a batch.
    fn renew_in_background(
        &self,
        lease: &pb::LeaseUnitResponse,
        stop: &Arc<AtomicBool>,
    ) -> Renewal {
        let lost = Arc::new(AtomicBool::new(false));
        let done = Arc::new(tokio::sync::Notify::new());
        let (client, flag, notified, stop) = (
            self.client.clone(),
            lost.clone(),
            done.clone(),
            stop.clone(),
        );
        let request = pb::RenewUnitRequest {
            worker_id: self.worker_id.clone(),
            screen_id: self.id.clone(),
            unit: lease.unit,
            token: lease.token,
        };
        let every = Duration::from_millis((lease.lease_ms / 3).max(100));
        let task = self.handle.spawn(async move {
            let mut renewed = Instant::now();
            loop {
                tokio::select! {
                    _ = notified.notified() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                if stop.load(Ordering::Relaxed) {
                    flag.store(true, Ordering::Relaxed);
                    return;
                }
                if renewed.elapsed() < every {
                    continue;
                }
                renewed = Instant::now();
                let mut call = tonic::Request::new(request.clone());
                call.set_timeout(Duration::from_secs(10));
                match client.clone().renew_unit(call).await {
                    Ok(r) if !r.get_ref().held => {
                        eprintln!("unit {} lease lost: {}", request.unit, r.get_ref().reason);
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(_) => {}
                    Err(status) => {
                        tracing::info!("renewing unit {}: {}", request.unit, status.message())
                    }
                }
            }
        });
        Renewal { lost, done, task }
    }

    /// Stores a computed unit's result under its key and completes the unit; a failure to compute or
    /// store is reported against the unit with the reason; an interrupted unit is left to its lease.
    fn finish_unit(
        &self,
        lease: &pb::LeaseUnitResponse,
        computed: Result<UnitResult, UnitError>,
        store: &Store,
        unit_started: Instant,
        units: usize,
    ) -> anyhow::Result<()> {
        let unit = lease.unit as usize;
        let fail = |message: String| -> anyhow::Result<()> {
            eprintln!("{}", self.say(&format!("unit {unit} failed: {message}")));
            self.report_failure(lease, message)
        };
        let result = match computed {
            Ok(result) => result,
            Err(UnitError::Interrupted) => return Ok(()),
            Err(UnitError::Failed(e)) => return fail(format!("{e:#}")),
        };
        let bytes = result.encode();
        let key = unit_key(unit);
        let blake3 = blake3::hash(&bytes).to_hex().to_string();
        let size = bytes.len() as u64;
        if let Err(e) = store.put(&key, bytes.into()) {
            return fail(format!("storing {key}: {e}"));
        }
        let seconds = unit_started.elapsed().as_secs_f64();
        let answer = self.complete(pb::CompleteUnitRequest {
            worker_id: self.worker_id.clone(),
            screen_id: self.id.clone(),
            unit: lease.unit,
            token: lease.token,
            key,
            blake3,
            bytes: size,
            pairs: result.records() as u64,
            seconds,
            error: String::new(),
        })?;
        if answer.accepted {
            let m = &crate::metrics::SCREEN;
            m.units.add(1.0);
            m.pairs.add(result.records() as f64);
            m.unit_seconds.observe(seconds);
            m.pairs_per_second
                .set(result.records() as f64 / seconds.max(1e-9));
        }
        eprintln!(
            "screen {} unit {unit}/{units}: {} pairs in {seconds:.2}s ({} pairs/s){}",
            self.id,
            result.records(),
            crate::progress::rate(result.records() as f64 / seconds.max(1e-9)),
            if answer.accepted {
                String::new()
            } else {
                format!(" (not recorded: {})", answer.reason)
            }
        );
        Ok(())
    }
}
