//! The cellfleet control plane: membership and rendezvous, the training-job state machine, the global data
//! cursor, and the leasing of screens' work units, served over gRPC (`proto/cellfleet.proto`).
//!
//! Modules, each depending only on those above it:
//! * `error`: [`CoordinatorError`] and its one mapping to gRPC codes; `spec`: the job specification;
//! * `state`: configuration, the typed metadata-store handle, the store's key layout, the clock;
//! * `workers`: registration, heartbeats, membership;
//! * `jobs`: the job state machine, generations, cursor, reports, checkpoint commits, the rendezvous
//!   exchange, reconciliation; `screens`: screens' unit leases and completions, beside jobs;
//! * `coordinator`: all of them behind one lock, the workers' assignments, the reconciler loop;
//! * `auth`: who may call what (workers by TLS client certificate, clients by bearer token);
//! * `rpc`: the tonic service, converting between the protocol and the domain.
//!
//! Architecture invariant: this crate never touches tensors and never links libtorch.

pub mod auth;
pub mod coordinator;
pub mod error;
pub mod jobs;
pub mod rpc;
pub mod screens;
pub mod spec;
pub mod state;
pub mod workers;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_stream::wrappers::TcpListenerStream;

pub use auth::Access;
use cellfleet_shared::meta::{EtcdStore, EtcdTls, MemoryStore, MetaStore};
pub use cellfleet_shared::stream::{EpochPlan, Partitioner};
pub use coordinator::Coordinator;
pub use error::CoordinatorError;
pub use jobs::JobState;
pub use rpc::Service;
pub use screens::{DoneUnit, ScreenRecord, ScreenState, UnitLease};
pub use spec::JobSpec;
pub use state::CoordinatorConfig;

/// `cellfleet coordinator` / `cellfleet-coordinator` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on (0.0.0.0:7070 to accept other hosts)
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// etcd endpoints, comma-separated (e.g. http://10.0.0.5:2379); without them, membership and jobs live
    /// only in this process's memory and do not survive a restart
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix in etcd, so several clusters can share one etcd
    #[arg(long, default_value = "/cellfleet/")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) of the etcd servers: talk to etcd over TLS (endpoints then https://)
    #[arg(long, value_name = "PEM")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication
    #[arg(long, value_name = "PEM", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert
    #[arg(long, value_name = "PEM", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Seconds without a heartbeat after which a worker stops being a member
    #[arg(long, default_value_t = 3.0)]
    pub lease_ttl: f64,
    /// Serve gRPC over TLS with this certificate chain (PEM); plaintext connections are then refused
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: worker calls need a client certificate signed by this CA (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Clients must send one of the bearer tokens in this file (one per line) to submit, cancel or read
    /// jobs and screens
    #[arg(long, value_name = "FILE")]
    pub client_token_file: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) and health (GET /healthz) over plain HTTP on this address,
    /// e.g. 0.0.0.0:9464
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Reads a PEM file; errors name the file and what it was for, never its contents.
pub fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        anyhow::bail!(
            "{} is not PEM (no -----BEGIN line); the {what} must be PEM",
            path.display()
        );
    }
    Ok(bytes)
}

/// Opens the metadata store the flags name: etcd when endpoints are given, memory otherwise.
pub async fn open_store(args: &CoordinatorArgs) -> anyhow::Result<Arc<dyn MetaStore>> {
    if args.etcd.is_empty() {
        if args.etcd_ca.is_some() {
            anyhow::bail!("--etcd-ca is given but no --etcd endpoints");
        }
        return Ok(Arc::new(MemoryStore::new()));
    }
    let tls = match &args.etcd_ca {
        None => None,
        Some(ca) => Some(EtcdTls {
            ca_pem: read_pem(ca, "etcd CA certificate")?,
            identity_pem: match (&args.etcd_cert, &args.etcd_key) {
                (Some(cert), Some(key)) => Some((
                    read_pem(cert, "etcd client certificate")?,
                    read_pem(key, "etcd client key")?,
                )),
                _ => None,
            },
        }),
    };
    let store = EtcdStore::connect_with(
        &args.etcd,
        &args.etcd_prefix,
        Duration::from_secs(5),
        tls.as_ref(),
    )
    .await?;
    Ok(Arc::new(store))
}

/// How the coordinator is exposed: TLS, who may call what, and where metrics are served.
#[derive(Default)]
pub struct Exposure {
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub access: Access,
    pub metrics: Option<tokio::net::TcpListener>,
}

impl Exposure {
    /// From the flags: reads the certificates and the token file (errors name the file, never a secret).
    pub async fn from_args(args: &CoordinatorArgs) -> anyhow::Result<Self> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
                    read_pem(cert, "TLS certificate")?,
                    read_pem(key, "TLS key")?,
                ));
                if let Some(ca) = &args.tls_client_ca {
                    // Optional at the handshake so that token clients need no certificate; worker calls
                    // without one are refused per call (`auth`).
                    tls = tls
                        .client_ca_root(Certificate::from_pem(read_pem(
                            ca,
                            "client CA certificate",
                        )?))
                        .client_auth_optional(true);
                }
                Some(tls)
            }
            _ => None,
        };
        let access = Access {
            client_tokens: match &args.client_token_file {
                Some(path) => auth::read_tokens(path)?,
                None => Vec::new(),
            },
            workers_need_certificate: args.tls_client_ca.is_some(),
        };
        let metrics = match &args.metrics_listen {
            Some(address) => Some(
                cellfleet_shared::telemetry::bind_metrics(address)
                    .await
                    .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        Ok(Self {
            tls,
            access,
            metrics,
        })
    }

    /// One line per weakness of this exposure, for the start-up log.
    fn warnings(&self, listen: &std::net::SocketAddr) -> Vec<String> {
        let mut warnings = Vec::new();
        if listen.ip().is_loopback() {
            return warnings;
        }
        if self.tls.is_none() {
            warnings.push(
                "gRPC is served in plaintext on a non-loopback address: pass --tls-cert and --tls-key"
                    .to_string(),
            );
        }
        if !self.access.workers_need_certificate {
            warnings.push(
                "any host that reaches this port may act as a worker: pass --tls-client-ca"
                    .to_string(),
            );
        }
        if self.access.client_tokens.is_empty() {
            warnings.push(
                "any host that reaches this port may submit and cancel jobs: pass --client-token-file"
                    .to_string(),
            );
        }
        warnings
    }
}

/// Serves the coordinator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn MetaStore>,
    config: CoordinatorConfig,
    exposure: Exposure,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let coordinator = Coordinator::start(store, config).await?;
    let reconciler = tokio::spawn(coordinator.clone().run_reconciler());
    let metrics = exposure.metrics.map(|listener| {
        let coordinator = coordinator.clone();
        let render: cellfleet_shared::telemetry::Render = Arc::new(move || {
            let coordinator = coordinator.clone();
            Box::pin(async move { coordinator.metrics_text().await })
        });
        tokio::spawn(cellfleet_shared::telemetry::serve_metrics(listener, render))
    });
    // The standard health service, for probes that speak gRPC (grpc_health_probe, Kubernetes `grpc:`).
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<cellfleet_proto::coordinator_server::CoordinatorServer<Service>>()
        .await;
    let service = cellfleet_proto::coordinator_server::CoordinatorServer::new(
        Service::with_access(coordinator, exposure.access),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = exposure.tls {
        builder = builder
            .tls_config(tls)
            .context("the TLS certificate or key is not usable")?;
    }
    let served = builder
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    reconciler.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    served.context("gRPC server failed")
}

/// Runs a coordinator from command-line flags until Ctrl-C / SIGTERM.
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    if args.lease_ttl.is_nan() || args.lease_ttl <= 0.0 {
        anyhow::bail!("--lease-ttl must be positive, got {}", args.lease_ttl);
    }
    let exposure = Exposure::from_args(&args).await?;
    let store = open_store(&args).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let config = CoordinatorConfig::with_lease_ttl(Duration::from_secs_f64(args.lease_ttl));
    let scheme = if exposure.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let metrics = match &exposure.metrics {
        Some(l) => format!(", metrics on http://{}/metrics", l.local_addr()?),
        None => String::new(),
    };
    eprintln!(
        "cellfleet coordinator listening on {scheme}://{address} (metadata: {}, worker lease {:.1}s{}{metrics})",
        store.describe(),
        args.lease_ttl,
        match (exposure.access.workers_need_certificate, exposure.access.client_tokens.is_empty()) {
            (true, false) => ", workers by certificate, clients by token",
            (true, true) => ", workers by certificate",
            (false, false) => ", clients by token",
            (false, true) => "",
        }
    );
    for warning in exposure.warnings(&address) {
        tracing::warn!("{warning}");
    }
    serve(listener, store, config, exposure, shutdown_signal()).await
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
