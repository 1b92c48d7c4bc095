//! `cellfleet screen run|submit|status|results|cancel`: the command family over `cluster::screen_client`
//! (plan, submit, follow) and `screen::tables` (the Parquet results).

use std::path::PathBuf;

use anyhow::{anyhow, bail};
use cellfleet_proto as pb;
use cellfleet_shared::storage::S3Options;
use clap::Subcommand;

use crate::cluster::client::runtime;

use crate::cluster::screen_client::{completed, connect, follow, plan, run_local, status, submit};
use crate::screen::pruning::{pruning_curves, write_pruning, PruningCurve};
use crate::screen::tables::{print_top, write_results};
use crate::state_words::StateWord;

#[derive(Subcommand, Debug)]
pub enum ScreenAction {
    /// Plan a screen and run it on the embedded default: an in-process coordinator and N worker processes
    Run {
        /// The screen specification (TOML, or JSON for .json)
        spec: PathBuf,
        /// Required: the embedded default (use `submit --coordinator` for a cluster)
        #[arg(long)]
        local: bool,
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Where the results go: a directory or s3://BUCKET/PREFIX (default: SPEC's `out`/results)
        #[arg(long)]
        out: Option<String>,
        /// Also write the per-(gene, cell) table
        #[arg(long)]
        per_cell: bool,
    },
    /// Plan a screen, store its plan at its `out` location and submit it to a coordinator
    Submit {
        spec: PathBuf,
        #[arg(long)]
        coordinator: String,
        /// Follow it to the end (then `screen results` fetches the tables)
        #[arg(long)]
        follow: bool,
    },
    /// Print a screen's progress: units, pairs per second, ETA
    Status {
        id: String,
        #[arg(long)]
        coordinator: String,
        /// Print the status as one JSON object (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Merge a completed screen's unit results into Parquet tables in DIR
    Results {
        id: String,
        #[arg(long)]
        coordinator: String,
        /// Where the results go: a directory or s3://BUCKET/PREFIX
        #[arg(long)]
        out: String,
        /// Also write the per-(gene, cell) table
        #[arg(long)]
        per_cell: bool,
    },
    /// Pruning curves of an attribution screen's results: drop genes from the classifier's input by
    /// attribution (least important first, and reversed), by HVG rank and in random order, and trace
    /// held-out accuracy and macro-F1 (pruning.parquet, pruning.svg)
    Prune {
        /// The attribution screen's results (a directory or s3://BUCKET/PREFIX)
        results: String,
        /// Where pruning.parquet and pruning.svg go
        #[arg(long)]
        out: PathBuf,
        /// Fractions of the genes dropped, each in [0, 1)
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
        )]
        fractions: Vec<f64>,
        /// Held-out cells classified at most (a seeded sample)
        #[arg(long, default_value_t = 500)]
        max_cells: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Stop a screen: workers drop its units
    Cancel {
        id: String,
        #[arg(long)]
        coordinator: String,
    },
}

/// A client of the coordinator at `url` (the channel's background task runs on `rt`).
pub fn screen_command(action: ScreenAction, s3: &S3Options) -> anyhow::Result<()> {
    match action {
        ScreenAction::Run {
            spec,
            local,
            workers,
            out,
            per_cell,
        } => {
            if !local {
                bail!("`screen run` runs on the embedded default: pass --local (or use `screen submit --coordinator URL`)");
            }
            run_local(&spec, workers, out, per_cell, s3).map(|_| ())
        }
        ScreenAction::Submit {
            spec,
            coordinator,
            follow: follow_it,
        } => {
            let rt = runtime()?;
            let mut client = connect(&rt, &coordinator)?;
            let planned = plan(&spec, s3)?;
            let id = submit(&rt, &mut client, &coordinator, &planned)?;
            println!("{id}");
            if follow_it {
                follow(&rt, &mut client, &id)?;
                eprintln!(
                    "results: cellfleet screen results {id} --coordinator {coordinator} --out DIR|s3://..."
                );
            }
            Ok(())
        }
        ScreenAction::Status {
            id,
            coordinator,
            json,
        } => {
            let rt = runtime()?;
            let mut client = connect(&rt, &coordinator)?;
            let status = status(&rt, &mut client, &id, false)?;
            if json {
                println!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
            Ok(())
        }
        ScreenAction::Results {
            id,
            coordinator,
            out,
            per_cell,
        } => {
            let rt = runtime()?;
            let mut client = connect(&rt, &coordinator)?;
            let screen = completed(&rt, &mut client, &id)?;
            let written = write_results(&screen, &out, per_cell, s3)?;
            print_top(&written, 15);
            Ok(())
        }
        ScreenAction::Prune {
            results,
            out,
            fractions,
            max_cells,
            seed,
        } => {
            let run = pruning_curves(&results, &fractions, max_cells, seed, s3)?;
            let written = write_pruning(&run, &out)?;
            println!(
                "{:<22} {:>15} {:>15}",
                "order (dropped first)", "accuracy area", "macro-F1 area"
            );
            for curve in &run.curves {
                println!(
                    "{:<22} {:>15.4} {:>15.4}",
                    curve.order,
                    PruningCurve::area(&curve.accuracy, &curve.fractions),
                    PruningCurve::area(&curve.macro_f1, &curve.fractions)
                );
            }
            eprintln!(
                "wrote {}",
                written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        ScreenAction::Cancel { id, coordinator } => {
            let rt = runtime()?;
            let mut client = connect(&rt, &coordinator)?;
            rt.block_on(client.cancel_screen(pb::CancelScreenRequest {
                screen_id: id.clone(),
            }))
            .map_err(|s| anyhow!("{}", crate::retry::explain(&s)))?;
            eprintln!("screen {id} cancelled");
            Ok(())
        }
    }
}

fn status_json(s: &pb::ScreenStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "screen_id": s.screen_id,
        "state": s.state().word(),
        "message": s.message,
        "summary": s.summary,
        "location": s.location,
        "plan_blake3": s.plan_blake3,
        "units_total": s.units_total,
        "units_done": s.units_done,
        "units_leased": s.units_leased,
        "pairs_total": s.pairs_total,
        "pairs_done": s.pairs_done,
        "pairs_per_second": s.pairs_per_second,
        "eta_seconds": s.eta_seconds,
        "releases": s.releases,
        "workers": s.workers,
    })
}

fn print_status(s: &pb::ScreenStatusResponse) {
    println!(
        "screen {}: {} ({})",
        s.screen_id,
        s.state().word(),
        s.summary
    );
    println!(
        "  units {}/{} done, {} leased ({}); pairs {}/{}; {} pairs/s; eta {}",
        s.units_done,
        s.units_total,
        s.units_leased,
        if s.workers.is_empty() {
            "no worker".to_string()
        } else {
            s.workers.join(", ")
        },
        s.pairs_done,
        s.pairs_total,
        crate::progress::rate(s.pairs_per_second),
        if s.eta_seconds < 0.0 {
            "unknown".to_string()
        } else {
            format!("{:.0}s", s.eta_seconds)
        }
    );
    if s.releases > 0 {
        println!(
            "  {} units leased again after a lost worker or lease",
            s.releases
        );
    }
    println!("  {}", s.message);
    println!("  location {}", s.location);
}
