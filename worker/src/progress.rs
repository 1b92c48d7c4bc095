//! Progress display: a bar on a terminal, periodic structured log lines otherwise.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over `total` cells; hidden when stderr is not a terminal or under `CELLFLEET_QUIET`.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if std::env::var_os("CELLFLEET_QUIET").is_some() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>28} [{bar:30}] {human_pos}/{human_len} cells {per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// A progress bar over `total` optimizer steps, its message carrying loss and throughput; hidden when
/// `show` is false or under `CELLFLEET_QUIET`.
pub fn step_bar(total: u64, what: &str, show: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !show || std::env::var_os("CELLFLEET_QUIET").is_some() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>9} [{{bar:30}}] {{pos}}/{{len}} steps {{msg}} eta {{eta}}"
        ))
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// A rate with the precision it needs: whole numbers from 100, one decimal from 1, two below (a steered
/// screen computes a few records per second, which `{:.0}` would show as 0).
pub fn rate(per_second: f64) -> String {
    if per_second >= 100.0 {
        format!("{per_second:.0}")
    } else if per_second >= 1.0 {
        format!("{per_second:.1}")
    } else {
        format!("{per_second:.2}")
    }
}
