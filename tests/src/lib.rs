//! Harness for the end-to-end tests: run the real `cellfleet` binary, find the real datasets and the
//! Python reference scripts, start a real Garage S3 server. Missing parts fail loudly; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod netns;

use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::storage::S3Options;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// `../shared/data` beside the checkout; panics with a clear message when it is absent.
pub fn data_dir() -> PathBuf {
    let dir = std::env::var_os("CELLFLEET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data"));
    assert!(
        dir.join("kang_ifnb_pbmc.h5ad").is_file(),
        "the real datasets are missing: expected {}/kang_ifnb_pbmc.h5ad (set CELLFLEET_DATA to their folder)",
        dir.display()
    );
    dir
}

pub fn data(name: &str) -> PathBuf {
    data_dir().join(name)
}

/// Runs `cellfleet ARGS` (the binary at `bin`) and returns its output, whatever the exit status.
pub fn cellfleet(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("CELLFLEET_QUIET", "1")
        .output()
        .expect("cellfleet starts")
}

/// Runs `cellfleet ARGS`, panicking with its stderr when it fails; returns stdout.
pub fn cellfleet_ok(bin: &Path, args: &[&str]) -> String {
    let out = cellfleet(bin, args);
    assert!(
        out.status.success(),
        "cellfleet {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs a Python script from tests/py; panics (never skips) when Python or its packages are missing.
pub fn python(script: &str, args: &[&str]) -> String {
    let path = workspace_root().join("tests/py").join(script);
    let out = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(&path)
        .args(args)
        .output()
        .expect(
            "python3 must be installed (scripts/setup.sh --for-tests installs it with anndata, h5py, numpy)",
        );
    assert!(
        out.status.success(),
        "python {script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

pub fn open_corpus(url: &str) -> Corpus {
    Corpus::open(url, &S3Options::default()).expect("corpus opens")
}

/// Every cell of a corpus as (source, row) -> (bins, labels), decoded through the shared library.
pub fn decode_all(corpus: &Corpus) -> std::collections::HashMap<(u32, u64), (Vec<u8>, Vec<u32>)> {
    let mut cells = std::collections::HashMap::new();
    for i in 0..corpus.manifest.shards.len() {
        let shard = corpus.fetch_shard(i).expect("shard verifies");
        let origins = shard.origins().expect("origins decode");
        let mut at = 0;
        for b in 0..shard.n_blocks() {
            let block = shard.read_block(b).expect("block decodes");
            for c in 0..block.cells {
                let o = &origins[at];
                cells.insert(
                    (o.source, o.row),
                    (block.bins_of(c).to_vec(), block.labels_of(c).to_vec()),
                );
                at += 1;
            }
        }
    }
    cells
}

/// `program`, to be run in network namespace `netns` when one is given.
pub fn in_namespace(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind loopback")
        .local_addr()
        .unwrap()
        .port()
}

/// Path of the Garage binary that `scripts/setup.sh --for-tests` installs; panics with the fix when it is missing.
pub fn garage_bin() -> PathBuf {
    let candidates = [
        std::env::var_os("CELLFLEET_GARAGE").map(PathBuf::from),
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/cellfleet/tools/bin/garage")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .expect("the Garage S3 server is missing: run scripts/setup.sh --for-tests (or set CELLFLEET_GARAGE)")
}

/// A real single-node Garage S3 server on free loopback ports with its own temporary directories,
/// one access key and one bucket. Killed on drop.
pub struct GarageServer {
    child: std::process::Child,
    /// The network namespace it runs in (`None`: this machine's own network, on loopback).
    netns: Option<String>,
    /// The `cellfleet` binary that probes readiness and runs commands; `None`: probed in process.
    bin: Option<PathBuf>,
    _dir: tempfile::TempDir,
    config_path: PathBuf,
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

impl GarageServer {
    /// Starts the server; `bin` is the `cellfleet` binary used to probe readiness and run commands.
    pub fn start(bin: &Path) -> Self {
        Self::launch(Some(bin.to_path_buf()), None)
    }

    /// Starts the server on `host` of `topology`, serving that host's address.
    pub fn start_on(bin: &Path, topology: &netns::Topology, host: usize) -> Self {
        Self::launch(
            Some(bin.to_path_buf()),
            Some((topology.namespace(host).to_string(), topology.address(host))),
        )
    }

    /// Starts the server for tests without a `cellfleet` binary: readiness is probed through the shared
    /// library's own S3 client, and clients connect with [`GarageServer::s3_options`].
    pub fn start_without_cellfleet() -> Self {
        Self::launch(None, None)
    }

    fn launch(bin: Option<PathBuf>, place: Option<(String, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = place
            .as_ref()
            .map_or("127.0.0.1".to_string(), |(_, address)| address.clone());
        let netns = place.map(|(ns, _)| ns);
        let (rpc, s3) = (free_port(), free_port());
        let secret_hex = |seed: u64| {
            format!(
                "{:016x}{:016x}{:016x}{:016x}",
                seed,
                seed ^ 0x5a5a,
                seed.rotate_left(7),
                !seed
            )
        };
        let config = format!(
            "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"{host}:{rpc}\"\nrpc_public_addr = \"{host}:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{host}:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
            secret = secret_hex(u64::from(rpc) * 31 + 7),
        );
        let config_path = dir.path().join("garage.toml");
        std::fs::write(&config_path, config).unwrap();
        let key_id = format!("GK{:024x}", u128::from(s3) * 0x1234_5678_9abc);
        let secret = secret_hex(u64::from(s3) * 97 + 3);
        let bucket = "cellfleet-test".to_string();
        let child = Self::spawn(
            netns.as_deref(),
            &config_path,
            &dir.path().join("garage.log"),
            &key_id,
            &secret,
            &bucket,
        );
        let server = Self {
            child,
            netns,
            bin,
            _dir: dir,
            config_path,
            endpoint: format!("http://{host}:{s3}"),
            bucket,
            key_id,
            secret,
        };
        server.wait_ready();
        server
    }

    /// Runs `garage server` on `config`, appending to `log` (a restart keeps the first run's log).
    fn spawn(
        netns: Option<&str>,
        config: &Path,
        log: &Path,
        key_id: &str,
        secret: &str,
        bucket: &str,
    ) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        in_namespace(netns, &garage_bin())
            .args([
                "-c",
                config.to_str().unwrap(),
                "server",
                "--single-node",
                "--default-bucket",
            ])
            .env("GARAGE_DEFAULT_ACCESS_KEY", key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", secret)
            .env("GARAGE_DEFAULT_BUCKET", bucket)
            .env("RUST_LOG", "garage=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("garage starts")
    }

    /// SIGKILL, like a crashed machine or the OOM killer; the data and metadata directories stay.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again (after [`GarageServer::kill`]) on the same ports, directories and
    /// credentials, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(
            self.netns.as_deref(),
            &self.config_path,
            &self.log_path(),
            &self.key_id,
            &self.secret,
            &self.bucket,
        );
        self.wait_ready();
    }

    fn log_path(&self) -> PathBuf {
        self._dir.path().join("garage.log")
    }

    /// The server's log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Bytes in the server's data directory: grows as parts of an upload are stored.
    pub fn data_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            entries
                .flatten()
                .map(|entry| match entry.file_type() {
                    Ok(kind) if kind.is_dir() => walk(&entry.path()),
                    Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self._dir.path().join("data"))
    }

    /// Environment a client needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "garage".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Options that reach this server from this process without touching the environment (so tests
    /// with their own servers can run in parallel).
    pub fn s3_options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some("garage".into()),
            credentials: Some((self.key_id.clone(), self.secret.clone())),
            ..S3Options::default()
        }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Polls until a request through cellfleet's own client gets a real answer (no corpus there yet).
    fn wait_ready(&self) {
        let started = std::time::Instant::now();
        loop {
            let answer = match &self.bin {
                Some(_) => {
                    let out = self.cellfleet(&["corpus", "inspect", &self.url("readiness-probe")]);
                    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                    if stderr.contains("no corpus at") {
                        return;
                    }
                    stderr
                }
                None => match self.probe_in_process() {
                    Ok(()) => return,
                    Err(e) => e.to_string(),
                },
            };
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "Garage did not become ready within 30 s; last answer: {answer}; log: {}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    fn probe_in_process(&self) -> cellfleet_shared::Result<()> {
        let options = S3Options {
            retry_timeout: Some(std::time::Duration::from_secs(1)),
            ..self.s3_options()
        };
        let store = cellfleet_shared::storage::Store::open(&self.url("readiness-probe"), &options)?;
        store.list_folders("")?;
        Ok(())
    }

    /// Runs `cellfleet ARGS` with this server's credentials.
    pub fn cellfleet(&self, args: &[&str]) -> Output {
        let bin = self
            .bin
            .as_ref()
            .expect("this server was started without a cellfleet binary");
        in_namespace(self.netns.as_deref(), bin)
            .args(args)
            .envs(self.env())
            .env("CELLFLEET_QUIET", "1")
            .output()
            .expect("cellfleet starts")
    }
}

impl Drop for GarageServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real etcd (Debian's `etcd-server`) on free loopback ports with its own data directory. Killed on
/// drop. Panics with the fix when etcd is not installed.
pub struct EtcdServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl EtcdServer {
    pub fn start() -> Self {
        Self::start_with(None, None)
    }

    /// An etcd on `host` of `topology`, serving that host's address.
    pub fn start_on(topology: &netns::Topology, host: usize) -> Self {
        Self::start_with(
            None,
            Some((topology.namespace(host).to_string(), topology.address(host))),
        )
    }

    /// An etcd serving clients over TLS with `pki`'s server certificate, requiring client certificates
    /// signed by its CA (`--client-cert-auth`).
    pub fn start_tls(pki: &TestPki) -> Self {
        Self::start_with(Some(pki), None)
    }

    fn start_with(pki: Option<&TestPki>, place: Option<(String, String)>) -> Self {
        let host = place
            .as_ref()
            .map_or("127.0.0.1".to_string(), |(_, address)| address.clone());
        let netns = place.map(|(ns, _)| ns);
        let bin = std::env::var_os("CELLFLEET_ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
        assert!(
            bin.is_file(),
            "etcd is missing at {}: run scripts/setup.sh --for-tests (Debian package etcd-server) or set CELLFLEET_ETCD",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let scheme = if pki.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{host}:{client}");
        let peer_url = format!("http://{host}:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let tls: Vec<String> = match pki {
            Some(pki) => vec![
                "--cert-file".into(),
                pki.path("server.pem"),
                "--key-file".into(),
                pki.path("server.key"),
                "--trusted-ca-file".into(),
                pki.path("ca.pem"),
                "--client-cert-auth".into(),
            ],
            None => Vec::new(),
        };
        let child = in_namespace(netns.as_deref(), &bin)
            .args(tls)
            .args([
                "--name",
                "test",
                "--data-dir",
                &dir.path().join("data").display().to_string(),
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("test={peer_url}"),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        let server = Self {
            child,
            _dir: dir,
            endpoint,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let open = || match &netns {
            None => std::net::TcpStream::connect(format!("127.0.0.1:{client}")).is_ok(),
            Some(ns) => Command::new("ip")
                .args(["netns", "exec", ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{host}/{client}"))
                .status()
                .is_ok_and(|s| s.success()),
        };
        while !open() {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not open {} within 20 s; its log: {}",
                server.endpoint,
                std::fs::read_to_string(server._dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        server
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `cellfleet` child process (coordinator, worker, or a following client) whose stderr goes to a log
/// file; killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(bin: &Path, args: &[&str], log: PathBuf) -> Self {
        Self::spawn_with_env(bin, args, &[], log)
    }

    /// Like [`Process::spawn`], with extra environment (e.g. [`GarageServer::env`]).
    pub fn spawn_with_env(
        bin: &Path,
        args: &[&str],
        env: &[(&'static str, String)],
        log: PathBuf,
    ) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CELLFLEET_QUIET", "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("cellfleet starts");
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the process: a frozen process holds whatever it held.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "signal {signal} to {}", self.child.id());
    }

    /// SIGKILL, like a machine or OOM-killer would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit within `limit`; panics with its log otherwise.
    pub fn wait(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not finish within {limit:?}; its log:\n{}",
                self.log.display(),
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `check` holds, polling; panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The f32 tensors of a safetensors file by name (the format: u64 header length, JSON header, data).
pub fn read_safetensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut tensors = std::collections::BTreeMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(
            info["dtype"], "F32",
            "{name}: only f32 tensors are compared"
        );
        let offsets = info["data_offsets"].as_array().unwrap();
        let (start, end) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        let values = data[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        tensors.insert(name.clone(), values);
    }
    tensors
}

/// A throwaway PKI made with the `openssl` command line: a CA, a server certificate for 127.0.0.1, a
/// worker (client) certificate, a certificate from an unrelated CA, and a random client token.
pub struct TestPki {
    pub dir: PathBuf,
    pub token: String,
}

impl TestPki {
    pub fn create(dir: &Path) -> Self {
        Self::create_for(dir, &[])
    }

    /// [`TestPki::create`] with a server certificate that also names `server_addresses`.
    pub fn create_for(dir: &Path, server_addresses: &[String]) -> Self {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl must be installed: run scripts/setup.sh --for-tests (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "rogue-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(key);
            let subject = format!("/CN=cellfleet test {ca}");
            let (keyout, out) = (format!("{ca}.key"), format!("{ca}.pem"));
            args.extend([
                "-keyout", &keyout, "-out", &out, "-days", "2", "-subj", &subject,
            ]);
            openssl(&args);
        }
        std::fs::write(
            dir.join("server.ext"),
            format!(
                "subjectAltName=IP:127.0.0.1,{}DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
                server_addresses
                    .iter()
                    .map(|a| format!("IP:{a},"))
                    .collect::<String>()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, ca, ext) in [
            ("server", "ca", "server.ext"),
            ("worker", "ca", "client.ext"),
            ("rogue", "rogue-ca", "client.ext"),
        ] {
            let mut args = vec!["req"];
            args.extend(key);
            let (keyout, csr, subject) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("/CN={name}"),
            );
            args.extend(["-keyout", &keyout, "-out", &csr, "-subj", &subject]);
            openssl(&args);
            let (ca_pem, ca_key, out) = (
                format!("{ca}.pem"),
                format!("{ca}.key"),
                format!("{name}.pem"),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &out,
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        let out = Command::new("openssl")
            .args(["rand", "-hex", "32"])
            .output()
            .expect("openssl rand");
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        Self { dir, token }
    }

    /// A file of the PKI by name: `ca.pem`, `server.pem`, `server.key`, `worker.pem`, `worker.key`,
    /// `rogue.pem`, `rogue.key`, `token`.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// `cellfleet ingest` of pbmc68k_reduced (700 real cells) over 128 highly variable genes into `out`: the
/// small corpus the cluster tests train on.
pub fn pbmc_ingest_args(out: &str) -> Vec<String> {
    vec![
        "ingest".into(),
        data("pbmc68k_reduced.h5ad").display().to_string(),
        "--out".into(),
        out.into(),
        "--hvg".into(),
        "128".into(),
    ]
}

/// `cellfleet train --coordinator URL` of the tiny preset: `steps` steps of `batch` samples, one thread per
/// worker, exactly `workers` workers, with sample logs; more flags may follow.
pub fn tiny_job_args(
    url: &str,
    corpus: &str,
    out: &str,
    steps: u64,
    batch: u32,
    workers: u32,
) -> Vec<String> {
    [
        "train",
        "--coordinator",
        url,
        "--corpus",
        corpus,
        "--out",
        out,
        "--preset",
        "tiny",
        "--steps",
        &steps.to_string(),
        "--batch-size",
        &batch.to_string(),
        "--threads",
        "1",
        "--min-workers",
        &workers.to_string(),
        "--max-workers",
        &workers.to_string(),
        "--sample-log",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `&[String]` as `Vec<&str>`, for APIs taking string slices.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// GET `path` from the plain HTTP server at `address` (HOST:PORT); the body of a 200 answer.
pub fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("metrics port open");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}
