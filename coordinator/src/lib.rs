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
//! * `rpc`: the tonic service, converting between the protocol and the domain.
//!
//! Architecture invariant: this crate never touches tensors and never links libtorch.

pub mod coordinator;
pub mod error;
pub mod jobs;
pub mod rpc;
pub mod screens;
pub mod spec;
pub mod state;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_stream::wrappers::TcpListenerStream;

use cellfleet_shared::meta::{EtcdStore, MemoryStore, MetaStore};
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
    /// Address to serve gRPC on
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// etcd endpoints, comma-separated (e.g. http://10.0.0.5:2379); without them, membership and jobs live
    /// only in this process's memory and do not survive a restart
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix in etcd, so several clusters can share one etcd
    #[arg(long, default_value = "/cellfleet/")]
    pub etcd_prefix: String,
    /// Seconds without a heartbeat after which a worker stops being a member
    #[arg(long, default_value_t = 3.0)]
    pub lease_ttl: f64,
}

/// Opens the metadata store the flags name: etcd when endpoints are given, memory otherwise.
pub async fn open_store(args: &CoordinatorArgs) -> anyhow::Result<Arc<dyn MetaStore>> {
    if args.etcd.is_empty() {
        return Ok(Arc::new(MemoryStore::new()));
    }
    let store = EtcdStore::connect(&args.etcd, &args.etcd_prefix, Duration::from_secs(5)).await?;
    Ok(Arc::new(store))
}

/// Serves the coordinator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn MetaStore>,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let coordinator = Coordinator::start(store, config).await?;
    let reconciler = tokio::spawn(coordinator.clone().run_reconciler());
    let service = cellfleet_proto::coordinator_server::CoordinatorServer::new(Service(coordinator));
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    reconciler.abort();
    served.context("gRPC server failed")
}

/// Runs a coordinator from command-line flags until Ctrl-C / SIGTERM.
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    if args.lease_ttl.is_nan() || args.lease_ttl <= 0.0 {
        anyhow::bail!("--lease-ttl must be positive, got {}", args.lease_ttl);
    }
    let store = open_store(&args).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let config = CoordinatorConfig::with_lease_ttl(Duration::from_secs_f64(args.lease_ttl));
    eprintln!(
        "cellfleet coordinator listening on http://{address} (metadata: {}, worker lease {:.1}s)",
        store.describe(),
        args.lease_ttl
    );
    serve(listener, store, config, shutdown_signal()).await
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
