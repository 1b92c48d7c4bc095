//! The client side of a screen: plan it (every check that can fail runs before anything is submitted),
//! store the plan and submit it, follow it to its end, and `screen run --local` on an embedded cluster.

use crate::link::Rpc;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use cellfleet_proto as pb;
use cellfleet_shared::screen::ScreenPlan;
use cellfleet_shared::storage::S3Options;
use tokio::runtime::Runtime;

use super::client::{ask_coordinator, runtime};
use super::embedded::EmbeddedCluster;
use crate::screen::plan::open_location;
use crate::screen::plan::read_spec;
use crate::screen::plan::resolve_plan;
use crate::screen::plan::store_plan;
use crate::screen::tables::{print_top, write_results, WrittenResults};
use crate::state_words::StateWord;
use crate::train::outputs::OutputDir;
use cellfleet_shared::screen::{CompletedScreen, CompletedUnit};

pub fn connect(rt: &Runtime, url: &str) -> anyhow::Result<Rpc> {
    let _entered = rt.enter();
    crate::link::connect(url)
}

/// A screen planned on the client: every check that can fail has run.
pub struct Planned {
    spec: cellfleet_shared::screen::ScreenSpec,
    plan: ScreenPlan,
    s3: S3Options,
}

/// Reads and plans `spec_path` (relative locations are resolved against the spec's directory, because
/// workers run elsewhere).
pub fn plan(spec_path: &Path, s3: &S3Options) -> anyhow::Result<Planned> {
    let mut spec = read_spec(spec_path)?;
    let spec_dir = spec_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    for location in [&mut spec.checkpoint, &mut spec.corpus, &mut spec.out] {
        if !location.contains("://") && Path::new(location.as_str()).is_relative() {
            let joined = spec_dir.join(&*location);
            *location = std::path::absolute(&joined)
                .unwrap_or(joined)
                .display()
                .to_string();
        }
    }
    let s3 = S3Options {
        endpoint: spec.s3_endpoint.clone().or_else(|| s3.endpoint.clone()),
        region: spec.s3_region.clone().or_else(|| s3.region.clone()),
        ..s3.clone()
    };
    let started = Instant::now();
    let plan = resolve_plan(&spec, &spec_dir, &s3)
        .with_context(|| format!("{}: the screen cannot run", spec_path.display()))?;
    eprintln!(
        "planned {} in {:.1}s: {} units, {} (gene, cell) pairs",
        plan.summary(),
        started.elapsed().as_secs_f64(),
        plan.unit_count(),
        plan.total_records(),
    );
    Ok(Planned { spec, plan, s3 })
}

/// Stores the plan at the screen's location and submits the screen; returns its id.
pub fn submit(
    rt: &Runtime,
    client: &mut Rpc,
    coordinator: &str,
    planned: &Planned,
) -> anyhow::Result<String> {
    let Planned { spec, plan, s3 } = planned;
    let store = open_location(&spec.out, s3)?;
    let plan_blake3 = store_plan(plan, &store)?;
    let request = pb::SubmitScreenRequest {
        location: spec.out.clone(),
        plan_blake3,
        units: plan.unit_count() as u32,
        pairs: plan.total_records(),
        lease_ms: u64::from(spec.execution.lease_seconds) * 1000,
        threads: spec.execution.threads,
        s3_endpoint: s3.endpoint.clone().unwrap_or_default(),
        s3_region: s3.region.clone().unwrap_or_default(),
        summary: plan.summary(),
    };
    let id = rt
        .block_on(client.submit_screen(request))
        .map_err(|s| {
            anyhow!(
                "the coordinator at {coordinator} refused the screen: {}",
                crate::retry::explain(&s)
            )
        })?
        .into_inner()
        .screen_id;
    eprintln!(
        "submitted screen {id} to {coordinator} (plan at {}/plan.json)",
        spec.out.trim_end_matches('/')
    );
    Ok(id)
}

pub fn status(
    rt: &Runtime,
    client: &mut Rpc,
    id: &str,
    include_units: bool,
) -> anyhow::Result<pb::ScreenStatusResponse> {
    Ok(rt
        .block_on(client.screen_status(pb::ScreenStatusRequest {
            screen_id: id.to_string(),
            include_units,
        }))
        .map_err(|s| anyhow!("{}", crate::retry::explain(&s)))?
        .into_inner())
}

/// A finished screen's record, converted from the coordinator's answer; a screen that has not completed
/// is refused with its state and progress (results are merged once every unit is done).
pub fn completed(rt: &Runtime, client: &mut Rpc, id: &str) -> anyhow::Result<CompletedScreen> {
    let status = status(rt, client, id, true)?;
    if status.state() != pb::ScreenState::Completed {
        bail!(
            "screen {} is {} ({}/{} units done): results are merged once every unit is done",
            status.screen_id,
            status.state().word(),
            status.units_done,
            status.units_total
        );
    }
    Ok(CompletedScreen {
        screen_id: status.screen_id.into(),
        location: status.location,
        plan_blake3: status.plan_blake3,
        units: status
            .units
            .into_iter()
            .map(|u| CompletedUnit {
                unit: u.unit,
                key: u.key,
                blake3: u.blake3,
            })
            .collect(),
        units_released: status.releases,
        pairs_per_second: status.pairs_per_second,
        message: status.message,
    })
}

/// Follows a screen to its end with a progress bar over pairs; an unsuccessful end is an error.
pub fn follow(
    rt: &Runtime,
    client: &mut Rpc,
    id: &str,
) -> anyhow::Result<pb::ScreenStatusResponse> {
    let mut bar = None;
    let mut last_message = String::new();
    let mut logged = Instant::now();
    loop {
        let s = ask_coordinator(|| {
            rt.block_on(client.screen_status(pb::ScreenStatusRequest {
                screen_id: id.to_string(),
                include_units: false,
            }))
            .map(tonic::Response::into_inner)
        })?;
        let bar = bar.get_or_insert_with(|| crate::progress::bar(s.pairs_total, "screen"));
        bar.set_position(s.pairs_done);
        if s.message != last_message {
            bar.suspend(|| eprintln!("screen {id}: {}", s.message));
            last_message = s.message.clone();
        }
        // A line every 10 seconds besides the bar (the only progress without a terminal).
        if logged.elapsed() > Duration::from_secs(10) {
            bar.suspend(|| {
                eprintln!(
                    "screen {id}: {}/{} units, {}/{} pairs, {} pairs/s, eta {}",
                    s.units_done,
                    s.units_total,
                    s.pairs_done,
                    s.pairs_total,
                    crate::progress::rate(s.pairs_per_second),
                    if s.eta_seconds < 0.0 {
                        "unknown".into()
                    } else {
                        format!("{:.0}s", s.eta_seconds)
                    }
                )
            });
            logged = Instant::now();
        }
        match s.state() {
            pb::ScreenState::Completed => {
                bar.finish_and_clear();
                return Ok(s);
            }
            pb::ScreenState::Failed | pb::ScreenState::Cancelled => {
                bar.finish_and_clear();
                bail!("screen {id} {}: {}", s.state().word(), s.message);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `screen run --local`: an embedded coordinator and `workers` worker processes; returns the results.
pub fn run_local(
    spec_path: &Path,
    workers: u32,
    out: Option<String>,
    per_cell: bool,
    s3: &S3Options,
) -> anyhow::Result<WrittenResults> {
    // Planned first: a bad specification starts no worker.
    let planned = plan(spec_path, s3)?;
    let spec = &planned.spec;
    let out = match out {
        Some(out) => out,
        None => format!("{}/results", spec.out.trim_end_matches('/')),
    };
    // Worker logs stay on this machine: beside local results, or in ./cellfleet-workers.
    let logs = if OutputDir::is_store(&out) {
        PathBuf::from("cellfleet-workers")
    } else {
        Path::new(&out).join("workers")
    };
    let cluster = EmbeddedCluster::start(workers, spec.execution.threads, &logs)?;
    eprintln!(
        "embedded coordinator on {} with {workers} worker processes (logs in {})",
        cluster.url,
        logs.display()
    );
    let rt = runtime()?;
    let mut client = connect(&rt, &cluster.url)?;
    let id = submit(&rt, &mut client, &cluster.url, &planned)?;
    follow(&rt, &mut client, &id)?;
    let screen = completed(&rt, &mut client, &id)?;
    let written = write_results(&screen, &out, per_cell, s3)?;
    print_top(&written, 15);
    drop(cluster);
    Ok(written)
}
