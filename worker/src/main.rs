//! `cellfleet`: the command-line tool of the cellfleet system (the commands live in `cellfleet_worker::cli`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if let Err(e) = cellfleet_shared::telemetry::init_logging() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match cellfleet_worker::cli::run(cellfleet_worker::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
