//! Logs and metrics, the same for both binaries.
//!
//! * Logs: `CELLFLEET_LOG` is the one filter (tracing's `EnvFilter` syntax: `info`,
//!   `cellfleet_coordinator=debug,warn`, ...; warnings by default) and `CELLFLEET_LOG_FORMAT` picks `text`
//!   (the default) or `json` (one object per line, for log shippers).
//! * Metrics: values live in atomics ([`Counter`], [`Gauge`], [`Timing`]) or are read from state at scrape
//!   time, and are written in the Prometheus text format (version 0.0.4) by [`MetricsText`];
//!   [`serve_metrics`] answers `GET /metrics` and `GET /healthz` over HTTP/1.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The log filter variable both binaries read.
pub const LOG_FILTER_VAR: &str = "CELLFLEET_LOG";
/// The log format variable: `text` or `json`.
pub const LOG_FORMAT_VAR: &str = "CELLFLEET_LOG_FORMAT";

/// Installs the process's log subscriber from `CELLFLEET_LOG` and `CELLFLEET_LOG_FORMAT`; logs go to stderr.
/// Errors name the variable and the value it holds.
pub fn init_logging() -> Result<(), String> {
    let filter = match std::env::var(LOG_FILTER_VAR) {
        Ok(value) => tracing_subscriber::EnvFilter::try_new(&value).map_err(|e| {
            format!("{LOG_FILTER_VAR}={value:?} is not a log filter (e.g. warn, info, cellfleet_worker=debug): {e}")
        })?,
        Err(_) => tracing_subscriber::EnvFilter::new("warn"),
    };
    let format = std::env::var(LOG_FORMAT_VAR).unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.as_str() {
        "" | "text" => builder.init(),
        "json" => builder.json().with_current_span(false).init(),
        other => {
            return Err(format!(
                "{LOG_FORMAT_VAR}={other:?} is not a log format: expected text or json"
            ))
        }
    }
    Ok(())
}

/// A monotonically increasing `f64`, lock-free.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    pub fn add(&self, amount: f64) {
        debug_assert!(amount >= 0.0, "a counter only grows");
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + amount).to_bits();
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A value that goes up and down; `NaN` until first set (then not written).
#[derive(Debug)]
pub struct Gauge(AtomicU64);

impl Default for Gauge {
    fn default() -> Self {
        Self::new()
    }
}

impl Gauge {
    pub const fn new() -> Self {
        // f64::NAN.to_bits() is not const-callable on every supported toolchain; this is the canonical NaN.
        Self(AtomicU64::new(0x7ff8_0000_0000_0000))
    }

    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Durations of a repeated event, as a Prometheus summary without quantiles: the total seconds and the
/// count (`rate(x_sum) / rate(x_count)` is the mean over any window), plus the last one as a gauge.
#[derive(Debug, Default)]
pub struct Timing {
    pub sum: Counter,
    pub count: Counter,
    pub last: Gauge,
}

impl Timing {
    pub const fn new() -> Self {
        Self {
            sum: Counter::new(),
            count: Counter::new(),
            last: Gauge::new(),
        }
    }

    pub fn observe(&self, seconds: f64) {
        self.sum.add(seconds.max(0.0));
        self.count.add(1.0);
        self.last.set(seconds);
    }
}

/// The kind of a metric family, as the text format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Summary,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        }
    }
}

/// Writes metrics in the Prometheus text format: a family's `# HELP` and `# TYPE` once, then its samples.
#[derive(Debug, Default)]
pub struct MetricsText {
    out: String,
}

impl MetricsText {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
        self
    }

    /// One sample; `NaN` values (never set) are left out.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        if value.is_nan() {
            return self;
        }
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let escaped = value
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{key}=\"{escaped}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
        self
    }

    /// A one-sample family.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// A [`Timing`] as a summary family `name` (`name_sum`, `name_count`) and a gauge `name_last`.
    pub fn timing(&mut self, name: &str, help: &str, timing: &Timing) -> &mut Self {
        self.family(name, Kind::Summary, help);
        self.sample(&format!("{name}_sum"), &[], timing.sum.get());
        self.sample(&format!("{name}_count"), &[], timing.count.get());
        self.single(
            &format!("{name}_last"),
            Kind::Gauge,
            &format!("{help} (the most recent one)"),
            timing.last.get(),
        )
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn format_value(value: f64) -> String {
    if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// What a metrics endpoint renders on each scrape (a future, so that state behind an async lock can be read).
pub type Render = Arc<dyn Fn() -> RenderFuture + Send + Sync>;
pub type RenderFuture = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;

/// A [`Render`] from a synchronous closure.
pub fn render_with(f: impl Fn() -> String + Send + Sync + 'static) -> Render {
    Arc::new(move || {
        let text = f();
        Box::pin(async move { text })
    })
}

/// Serves `GET /metrics` (what `render` returns, as Prometheus text) and `GET /healthz` (`ok`) on `listener`
/// until the task is dropped.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: Render,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    (
                        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        render().await,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app).await
}

/// Binds `address` for [`serve_metrics`], with an error that names the flag's value.
pub async fn bind_metrics(address: &str) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| format!("cannot serve metrics on {address}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_escapes_labels_and_skips_unset_values() {
        let timing = Timing::new();
        timing.observe(0.25);
        timing.observe(0.5);
        let mut text = MetricsText::new();
        text.family("cellfleet_x", Kind::Gauge, "An x.\nSecond line")
            .sample("cellfleet_x", &[("job", "a\"b\\c")], 1.5)
            .sample("cellfleet_x", &[("job", "never")], Gauge::new().get());
        text.timing("cellfleet_step_seconds", "Step time", &timing);
        let text = text.finish();
        assert_eq!(
            text,
            "# HELP cellfleet_x An x.\\nSecond line\n# TYPE cellfleet_x gauge\n\
             cellfleet_x{job=\"a\\\"b\\\\c\"} 1.5\n\
             # HELP cellfleet_step_seconds Step time\n# TYPE cellfleet_step_seconds summary\n\
             cellfleet_step_seconds_sum 0.75\ncellfleet_step_seconds_count 2\n\
             # HELP cellfleet_step_seconds_last Step time (the most recent one)\n\
             # TYPE cellfleet_step_seconds_last gauge\ncellfleet_step_seconds_last 0.5\n"
        );
    }

    #[test]
    fn counters_add_from_many_threads() {
        let counter = Arc::new(Counter::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.add(0.5);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counter.get(), 2000.0);
    }
}
