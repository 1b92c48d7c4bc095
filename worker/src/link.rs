//! The gRPC link to a coordinator, the one way every command reaches one: TLS (for `https://` URLs: the
//! CA that signed the coordinator's certificate, and a worker's own certificate for mutual TLS) and the
//! client bearer token, from flags or environment variables. Settings are read when a connection is made,
//! so commands that never connect never read them.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context};
use cellfleet_coordinator::read_pem;
use cellfleet_proto::coordinator_client::CoordinatorClient;
use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The environment variable holding a client's bearer token (kept out of `ps`, unlike a flag).
pub const TOKEN_VAR: &str = "CELLFLEET_TOKEN";

/// How to reach a coordinator that requires TLS or credentials.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Coordinator connection")]
pub struct ConnectArgs {
    /// CA certificate (PEM) that signed the coordinator's certificate; needed for https:// coordinators
    #[arg(long, global = true, env = "CELLFLEET_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// This worker's certificate (PEM), for a coordinator that requires mutual TLS
    #[arg(long, global = true, env = "CELLFLEET_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, global = true, env = "CELLFLEET_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token for a coordinator that requires one (or put the token itself in
    /// CELLFLEET_TOKEN)
    #[arg(long, global = true, env = "CELLFLEET_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

static SETTINGS: OnceLock<ConnectArgs> = OnceLock::new();

/// Records this process's connection settings (once, from the command line).
pub fn configure(args: &ConnectArgs) {
    let _ = SETTINGS.set(args.clone());
}

/// Adds the bearer token, if any, to every call. The value is marked sensitive, so tonic's and hyper's
/// debug output leave it out.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// A coordinator client carrying this process's credentials.
pub type Rpc = CoordinatorClient<InterceptedService<Channel, Credentials>>;

fn bearer(args: &ConnectArgs) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
    let token = match (&args.token_file, std::env::var(TOKEN_VAR)) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .with_context(|| format!("the token file {} holds no token", path.display()))?,
        (None, Ok(token)) if !token.trim().is_empty() => token.trim().to_string(),
        _ => return Ok(None),
    };
    // The error must not echo the token.
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
        anyhow::anyhow!("the bearer token holds characters an HTTP header cannot carry")
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// A lazily connecting channel to `url` (`http://HOST:PORT`, or `https://HOST:PORT` with --tls-ca).
pub fn channel(url: &str) -> anyhow::Result<Channel> {
    let args = SETTINGS.get().cloned().unwrap_or_default();
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| {
            format!(
                "{url} is not a coordinator URL (expected http://HOST:PORT or https://HOST:PORT)"
            )
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // A coordinator host that vanishes without a reset is noticed within seconds, not at the TCP
        // timeout.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let Some(ca) = &args.tls_ca else {
            bail!("{url} is a TLS coordinator: pass --tls-ca (or set CELLFLEET_TLS_CA) to the CA certificate that signed its certificate");
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_pem(ca, "CA certificate")?));
        match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read_pem(cert, "client certificate")?,
                    read_pem(key, "client key")?,
                ));
            }
            (None, None) => {}
            _ => bail!(
                "--tls-cert and --tls-key (CELLFLEET_TLS_CERT, CELLFLEET_TLS_KEY) go together"
            ),
        }
        endpoint = endpoint
            .tls_config(tls)
            .context("the TLS settings are not usable")?;
    }
    // Lazy: the channel reconnects by itself after the coordinator restarts.
    Ok(endpoint.connect_lazy())
}

/// A coordinator client for `url` with this process's TLS settings and bearer token.
pub fn connect(url: &str) -> anyhow::Result<Rpc> {
    let args = SETTINGS.get().cloned().unwrap_or_default();
    let credentials = Credentials {
        bearer: bearer(&args)?,
    };
    Ok(CoordinatorClient::with_interceptor(
        channel(url)?,
        credentials,
    ))
}

/// This process's connection settings as environment variables, for worker processes it starts (paths
/// only; a token given in `CELLFLEET_TOKEN` is inherited like any variable).
pub fn child_environment() -> Vec<(&'static str, std::ffi::OsString)> {
    let args = SETTINGS.get().cloned().unwrap_or_default();
    [
        ("CELLFLEET_TLS_CA", args.tls_ca),
        ("CELLFLEET_TLS_CERT", args.tls_cert),
        ("CELLFLEET_TLS_KEY", args.tls_key),
        ("CELLFLEET_TOKEN_FILE", args.token_file),
    ]
    .into_iter()
    .filter_map(|(name, path)| path.map(|p| (name, p.into_os_string())))
    .collect()
}
