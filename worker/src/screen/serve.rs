//! A fleet worker's loop over a screen: load it once, then lease, compute, store and complete units, with
//! lease renewal, until none is left or the worker is told to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use cellfleet_proto as pb;
use cellfleet_proto::coordinator_client::CoordinatorClient;
use cellfleet_shared::screen::unit_key;
use cellfleet_shared::storage::{S3Options, Store};
use tch::Device;
use tonic::transport::Channel;

use super::compute::{Interrupted, Screener};
use super::plan::load_plan;
use crate::cluster::states::StateWord;
use crate::screen::plan::open_location;

/// How long to wait between lease attempts when no unit is free.
const IDLE_POLL: Duration = Duration::from_millis(300);

/// Serves a screen as a fleet worker: loads it once, then leases, computes, stores and completes units
/// until none is left or `stop` is set. A load failure is reported against a leased unit, so a screen
/// that no worker can load fails instead of waiting forever.
pub fn serve_screen(
    assignment: pb::ScreenAssignment,
    worker_id: &str,
    device: Device,
    client: CoordinatorClient<Channel>,
    handle: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let s3 = S3Options {
        endpoint: (!assignment.s3_endpoint.is_empty()).then(|| assignment.s3_endpoint.clone()),
        region: (!assignment.s3_region.is_empty()).then(|| assignment.s3_region.clone()),
        ..S3Options::default()
    };
    let id = assignment.screen_id.clone();
    let call = |what: &str| format!("screen {id}: {what}");
    let lease = || -> anyhow::Result<pb::LeaseUnitResponse> {
        let mut request = tonic::Request::new(pb::LeaseUnitRequest {
            worker_id: worker_id.to_string(),
            screen_id: id.clone(),
        });
        request.set_timeout(Duration::from_secs(10));
        Ok(handle
            .block_on(client.clone().lease_unit(request))
            .map_err(|s| anyhow!("{}", s.message()))
            .with_context(|| call("leasing a unit"))?
            .into_inner())
    };
    let complete = |request: pb::CompleteUnitRequest| -> anyhow::Result<pb::CompleteUnitResponse> {
        let started = Instant::now();
        loop {
            let mut r = tonic::Request::new(request.clone());
            r.set_timeout(Duration::from_secs(10));
            match handle.block_on(client.clone().complete_unit(r)) {
                Ok(answer) => return Ok(answer.into_inner()),
                // Retried through a coordinator restart: the result is stored; only the record is due.
                Err(status) if started.elapsed() < Duration::from_secs(120) => {
                    tracing::info!("completing unit {}: {}", request.unit, status.message());
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(status) => bail!(
                    "{}",
                    call(&format!(
                        "completing unit {}: {}",
                        request.unit,
                        status.message()
                    ))
                ),
            }
        }
    };
    let started = Instant::now();
    let load = || -> anyhow::Result<(Screener, Store)> {
        let store = open_location(&assignment.location, &s3)?;
        let plan = load_plan(&store, &assignment.plan_blake3)?;
        Ok((
            Screener::load(plan, &assignment.plan_blake3, &s3, device)?,
            store,
        ))
    };
    // A failed load is reported against a leased unit and tried again: three reports fail the screen,
    // so a screen no worker can load ends with the reason instead of waiting forever.
    let (screener, store) = loop {
        match load() {
            Ok(loaded) => break loaded,
            Err(e) => {
                let message = format!("{e:#}");
                eprintln!("{}", call(&format!("cannot load: {message}")));
                let answer = lease()?;
                if answer.leased {
                    complete(pb::CompleteUnitRequest {
                        worker_id: worker_id.to_string(),
                        screen_id: id.clone(),
                        unit: answer.unit,
                        token: answer.token,
                        error: format!("worker {worker_id} cannot load the screen: {message}"),
                        ..Default::default()
                    })?;
                } else if answer.state() != pb::ScreenState::Running {
                    return Err(e);
                }
                if stop.load(Ordering::Relaxed) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    };
    eprintln!(
        "screen {id}: loaded {} (checkpoint step {}) in {:.2}s",
        screener.plan.summary(),
        screener.plan.checkpoint.step,
        started.elapsed().as_secs_f64()
    );
    let units = screener.plan.unit_count();
    while !stop.load(Ordering::Relaxed) {
        let answer = match lease() {
            Ok(a) => a,
            Err(e) => {
                tracing::info!("{e:#}");
                std::thread::sleep(IDLE_POLL);
                continue;
            }
        };
        if !answer.leased {
            if answer.state() != pb::ScreenState::Running {
                eprintln!(
                    "screen {id} is {}; no more units here",
                    answer.state().word()
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(answer.retry_after_ms.clamp(50, 5000)));
            continue;
        }
        let unit = answer.unit as usize;
        if unit >= units {
            bail!(
                "{}",
                call(&format!(
                    "the coordinator leased unit {unit}, the plan has {units}"
                ))
            );
        }
        // The lease is renewed in the background; losing it (or being told to stop) interrupts the unit.
        let lost = Arc::new(AtomicBool::new(false));
        let done = Arc::new(tokio::sync::Notify::new());
        let renewer = {
            let (client, lost, done, stop) =
                (client.clone(), lost.clone(), done.clone(), stop.clone());
            let request = pb::RenewUnitRequest {
                worker_id: worker_id.to_string(),
                screen_id: id.clone(),
                unit: answer.unit,
                token: answer.token,
            };
            let every = Duration::from_millis((answer.lease_ms / 3).max(100));
            handle.spawn(async move {
                let mut renewed = Instant::now();
                loop {
                    // Checks the stop flag often, so an Idle order interrupts the unit within a batch.
                    tokio::select! {
                        _ = done.notified() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if stop.load(Ordering::Relaxed) {
                        lost.store(true, Ordering::Relaxed);
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
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                        Ok(_) => {}
                        Err(status) => {
                            tracing::info!("renewing unit {}: {}", request.unit, status.message())
                        }
                    }
                }
            })
        };
        let unit_started = Instant::now();
        let computed = screener.compute_unit(unit, &lost);
        // The lease stays renewed through the upload and the completion.
        let stop_renewing = || {
            done.notify_one();
            let _ = handle.block_on(renewer);
        };
        // A failed unit is reported with the reason (three failures of one unit fail the screen).
        let report_failure = |message: String| -> anyhow::Result<()> {
            eprintln!("{}", call(&format!("unit {unit} failed: {message}")));
            complete(pb::CompleteUnitRequest {
                worker_id: worker_id.to_string(),
                screen_id: id.clone(),
                unit: answer.unit,
                token: answer.token,
                error: message,
                ..Default::default()
            })?;
            Ok(())
        };
        let outcome = (|| -> anyhow::Result<()> {
            let result = match computed {
                Ok(result) => result,
                Err(e) if e.is::<Interrupted>() => return Ok(()),
                Err(e) => return report_failure(format!("{e:#}")),
            };
            let bytes = result.encode();
            let key = unit_key(unit);
            let blake3 = blake3::hash(&bytes).to_hex().to_string();
            let size = bytes.len() as u64;
            if let Err(e) = store.put(&key, bytes.into()) {
                return report_failure(format!("storing {key}: {e}"));
            }
            let seconds = unit_started.elapsed().as_secs_f64();
            let answer = complete(pb::CompleteUnitRequest {
                worker_id: worker_id.to_string(),
                screen_id: id.clone(),
                unit: answer.unit,
                token: answer.token,
                key,
                blake3,
                bytes: size,
                pairs: result.pairs() as u64,
                seconds,
                error: String::new(),
            })?;
            eprintln!(
                "screen {id} unit {unit}/{units}: {} pairs in {seconds:.2}s ({:.0} pairs/s){}",
                result.pairs(),
                result.pairs() as f64 / seconds.max(1e-9),
                if answer.accepted {
                    String::new()
                } else {
                    format!(" (not recorded: {})", answer.reason)
                }
            );

            Ok(())
        })();
        stop_renewing();
        outcome?;
    }
    Ok(())
}
