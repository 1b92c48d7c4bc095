//! What a cluster deployment relies on, with real processes on loopback: TLS on the coordinator with
//! mutual TLS for workers and bearer tokens for clients, etcd over TLS with client certificates,
//! Prometheus metrics on every process (parsed by the reference parser), and secrets kept out of logs,
//! command lines, status output and error messages; and a job whose workers share no disk, with every
//! output in a real S3 server.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cellfleet_e2e::{
    cellfleet_ok, free_port, http_get, pbmc_ingest_args, python, strs, tiny_job_args, wait_for,
    EtcdServer, GarageServer, Process, TestPki,
};
use cellfleet_shared::storage::Store;

const BIN: &str = env!("CARGO_BIN_EXE_cellfleet");

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn small_corpus(dir: &Path) -> String {
    let out = dir.join("corpus").display().to_string();
    cellfleet_ok(bin(), &strs(&pbmc_ingest_args(&out)));
    out
}

/// `cellfleet ARGS` with extra environment; returns the output whatever the exit status.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("CELLFLEET_TOKEN")
        .envs(env.iter().copied())
        .env("CELLFLEET_QUIET", "1")
        .output()
        .expect("cellfleet runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn tls_tokens_and_metrics_guard_and_show_a_training_job() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let etcd = EtcdServer::start_tls(&pki);
    let corpus = small_corpus(dir.path());
    let (ca, token_file) = (pki.path("ca.pem"), pki.path("token"));

    // etcd requires a client certificate: a coordinator without one is refused, clearly and at once.
    let refused = run(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &etcd.endpoint,
            "--etcd-ca",
            &ca,
        ],
        &[],
    );
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("etcd"), "{}", stderr(&refused));
    let plain = run(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &etcd.endpoint.replace("https://", "http://"),
            "--etcd-ca",
            &ca,
        ],
        &[],
    );
    assert!(
        stderr(&plain).contains("must be https://"),
        "{}",
        stderr(&plain)
    );

    let (port, metrics_port) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let coordinator = Process::spawn(
        bin(),
        &[
            "coordinator",
            "--listen",
            &listen,
            "--etcd",
            &etcd.endpoint,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &pki.path("worker.pem"),
            "--etcd-key",
            &pki.path("worker.key"),
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-client-ca",
            &ca,
            "--client-token-file",
            &token_file,
            "--metrics-listen",
            &metrics_listen,
            "--lease-ttl",
            "3",
        ],
        dir.path().join("coordinator.log"),
    );
    wait_for("the coordinator to listen", Duration::from_secs(20), || {
        listening(port) && listening(metrics_port)
    });
    let with_ca = [("CELLFLEET_TLS_CA", ca.as_str())];

    // Clients: no token, a wrong token (never echoed), a worker certificate instead of a token,
    // plaintext against TLS, no CA for an https:// URL.
    let workers = ["job", "--coordinator", &url, "workers"];
    let missing = run(&workers, &with_ca);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("requires a bearer token"),
        "{}",
        stderr(&missing)
    );
    let wrong_token = "f".repeat(64);
    let wrong = run(
        &workers,
        &[("CELLFLEET_TLS_CA", &ca), ("CELLFLEET_TOKEN", &wrong_token)],
    );
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("was not accepted"),
        "{}",
        stderr(&wrong)
    );
    assert!(!stderr(&wrong).contains(&wrong_token));
    let as_client = run(
        &[
            "job",
            "--coordinator",
            &url,
            "--tls-cert",
            &pki.path("worker.pem"),
            "--tls-key",
            &pki.path("worker.key"),
            "workers",
        ],
        &with_ca,
    );
    assert!(
        stderr(&as_client).contains("a worker certificate cannot submit"),
        "{}",
        stderr(&as_client)
    );
    let plaintext = run(
        &[
            "job",
            "--coordinator",
            &format!("http://{listen}"),
            "workers",
        ],
        &[("CELLFLEET_TOKEN_FILE", &token_file)],
    );
    assert!(!plaintext.status.success());
    assert!(
        stderr(&plaintext).contains("https://"),
        "{}",
        stderr(&plaintext)
    );
    let no_ca = run(&workers, &[("CELLFLEET_TOKEN_FILE", &token_file)]);
    assert!(stderr(&no_ca).contains("--tls-ca"), "{}", stderr(&no_ca));

    // Workers: without a certificate, with a client token instead, and with one from another CA: refused.
    for (name, extra) in [
        ("no-certificate", vec![]),
        ("token-instead", vec!["--token-file", token_file.as_str()]),
        (
            "rogue",
            vec![
                "--tls-cert",
                pki.dir.join("rogue.pem").to_str().unwrap(),
                "--tls-key",
                pki.dir.join("rogue.key").to_str().unwrap(),
            ],
        ),
    ] {
        let mut args = vec![
            "worker",
            "--coordinator",
            &url,
            "--tls-ca",
            &ca,
            "--reconnect-timeout",
            "3",
        ];
        args.extend(extra.iter().copied());
        let mut refused = Process::spawn(bin(), &args, dir.path().join(format!("{name}.log")));
        let status = refused.wait(Duration::from_secs(60));
        assert!(!status.success(), "{name}: {}", refused.log_text());
        assert!(!refused.log_text().contains("registered with"), "{name}");
    }
    let refused_log = std::fs::read_to_string(dir.path().join("no-certificate.log")).unwrap();
    assert!(
        refused_log.contains("need a TLS client certificate"),
        "{refused_log}"
    );
    let token_log = std::fs::read_to_string(dir.path().join("token-instead.log")).unwrap();
    assert!(
        token_log.contains("a client token cannot act as a worker"),
        "{token_log}"
    );

    // Two workers with certificates train a job submitted with the token; everything over TLS.
    let worker_metrics = [free_port(), free_port()];
    let _workers: Vec<Process> = worker_metrics
        .iter()
        .enumerate()
        .map(|(i, port)| {
            Process::spawn(
                bin(),
                &[
                    "worker",
                    "--coordinator",
                    &url,
                    "--threads",
                    "1",
                    "--tls-ca",
                    &ca,
                    "--tls-cert",
                    &pki.path("worker.pem"),
                    "--tls-key",
                    &pki.path("worker.key"),
                    "--metrics-listen",
                    &format!("127.0.0.1:{port}"),
                ],
                dir.path().join(format!("worker-{i}.log")),
            )
        })
        .collect();
    let with_token = [
        ("CELLFLEET_TLS_CA", ca.as_str()),
        ("CELLFLEET_TOKEN", pki.token.as_str()),
    ];
    wait_for("both workers to register", Duration::from_secs(30), || {
        let out = run(&workers, &with_token);
        String::from_utf8_lossy(&out.stdout)
            .matches(" yes ")
            .count()
            == 2
    });
    let out = dir.path().join("model");
    let mut client = Process::spawn_with_env(
        bin(),
        &[
            "train",
            "--coordinator",
            &url,
            "--corpus",
            &corpus,
            "--out",
            out.to_str().unwrap(),
            "--preset",
            "tiny",
            "--steps",
            "20",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--min-workers",
            "2",
            "--max-workers",
            "2",
        ],
        &[
            ("CELLFLEET_TLS_CA", ca.clone()),
            ("CELLFLEET_TOKEN_FILE", token_file.clone()),
        ],
        dir.path().join("client.log"),
    );
    let status = client.wait(Duration::from_secs(240));
    assert!(status.success(), "the job finishes:\n{}", client.log_text());
    assert!(out.join("model.safetensors").is_file());
    let job = client
        .log_text()
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .expect("the client names the job")
        .trim_end_matches(':')
        .to_string();
    let status_out = run(&["job", "--coordinator", &url, "status", &job], &with_token);
    assert!(status_out.status.success(), "{}", stderr(&status_out));

    // Metrics from the coordinator and both workers parse as Prometheus text and say what happened.
    let mut files = Vec::new();
    for (name, port) in [
        ("coordinator", metrics_port),
        ("worker-0", worker_metrics[0]),
        ("worker-1", worker_metrics[1]),
    ] {
        let path = dir.path().join(format!("{name}.prom"));
        std::fs::write(&path, http_get(&format!("127.0.0.1:{port}"), "/metrics")).unwrap();
        files.push(path.display().to_string());
        assert_eq!(http_get(&format!("127.0.0.1:{port}"), "/healthz"), "ok\n");
    }
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let parsed: serde_json::Value =
        serde_json::from_str(&python("parse_metrics.py", &args)).unwrap();
    let sample = |file: usize, key: &str| -> f64 {
        parsed[&files[file]][key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing from {}", files[file]))
    };
    assert_eq!(sample(0, &format!("cellfleet_job_step{{job={job}}}")), 20.0);
    assert_eq!(sample(0, "cellfleet_jobs{state=completed}"), 1.0);
    assert_eq!(sample(0, "cellfleet_workers{connected=yes}"), 2.0);
    for worker in [1, 2] {
        assert_eq!(sample(worker, "cellfleet_train_step{}"), 20.0);
        assert_eq!(sample(worker, "cellfleet_train_world_size{}"), 2.0);
        assert_eq!(sample(worker, "cellfleet_train_step_seconds_count{}"), 20.0);
        assert_eq!(
            sample(worker, "cellfleet_train_collective_seconds_count{}"),
            20.0
        );
        assert!(sample(worker, "cellfleet_train_tokens_total{}") > 0.0);
        assert_eq!(sample(worker, "cellfleet_worker_connected{}"), 1.0);
    }

    // The token appears in no log, no status output, no error and no command line.
    let mut texts = vec![
        coordinator.log_text(),
        client.log_text(),
        String::from_utf8_lossy(&status_out.stdout).into_owned(),
        stderr(&status_out),
        stderr(&missing),
        stderr(&wrong),
        stderr(&as_client),
    ];
    for i in 0..2 {
        texts.push(std::fs::read_to_string(dir.path().join(format!("worker-{i}.log"))).unwrap());
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            texts.push(String::from_utf8_lossy(&cmdline).into_owned());
        }
    }
    for prom in &files {
        texts.push(std::fs::read_to_string(prom).unwrap());
    }
    assert!(
        texts.iter().all(|t| !t.contains(&pki.token)),
        "the client token leaked"
    );
}

/// A worker process started in its own empty directory with `env`.
fn worker_in(dir: &Path, url: &str, env: &[(&'static str, String)]) -> Process {
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.with_extension("log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin())
        .args(["worker", "--coordinator", url, "--threads", "1"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CELLFLEET_QUIET", "1")
        .current_dir(dir)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("cellfleet starts");
    Process { child, log }
}

#[test]
fn a_job_whose_workers_share_no_disk_keeps_every_output_in_the_object_store() {
    let dir = tempfile::tempdir().unwrap();
    let garage = GarageServer::start(bin());
    let corpus_url = garage.url("corpus");
    let ingest = garage.cellfleet(&strs(&pbmc_ingest_args(&corpus_url)));
    assert!(ingest.status.success(), "{}", stderr(&ingest));
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    // The coordinator reads the corpus manifest to plan the job: it needs the store's credentials too.
    let _coordinator = Process::spawn_with_env(
        bin(),
        &["coordinator", "--listen", &listen],
        &garage.env(),
        dir.path().join("coordinator.log"),
    );
    wait_for("the coordinator to listen", Duration::from_secs(20), || {
        listening(port)
    });
    let homes = [dir.path().join("node-a"), dir.path().join("node-b")];
    let _workers: Vec<Process> = homes
        .iter()
        .map(|home| worker_in(home, &url, &garage.env()))
        .collect();
    let run_url = garage.url("runs/first");
    let steps = 30u64;
    let client_dir = dir.path().join("laptop");
    std::fs::create_dir_all(&client_dir).unwrap();
    let client = Command::new(bin())
        .args(tiny_job_args(&url, &corpus_url, &run_url, steps, 32, 2))
        .envs(garage.env())
        .env("CELLFLEET_QUIET", "1")
        .current_dir(&client_dir)
        .output()
        .unwrap();
    assert!(client.status.success(), "{}", stderr(&client));
    assert!(
        stderr(&client).contains(&format!("{run_url}/model.safetensors"))
            || String::from_utf8_lossy(&client.stdout)
                .contains(&format!("{run_url}/model.safetensors")),
        "the client names the stored model"
    );

    // Everything is in the bucket: the model, its config, the step log, both ranks' sample logs.
    let store = Store::open(&run_url, &garage.s3_options()).unwrap();
    let text = |name: &str| String::from_utf8(store.get(name).unwrap().to_vec()).unwrap();
    let weights = store.get("model.safetensors").unwrap();
    let (tensors, _) =
        cellfleet_shared::checkpoint::safetensors::parse(&weights, "model.safetensors").unwrap();
    assert!(tensors.len() > 5, "{} tensors", tensors.len());
    assert!(text("model.json").contains("\"genes\""));
    let log = text("pretrain_log.jsonl");
    assert_eq!(log.lines().count() as u64, steps, "{log}");
    let mut seen = std::collections::HashSet::new();
    for rank in 0..2 {
        let samples = text(&format!("samples/g1-r{rank}.jsonl"));
        assert_eq!(samples.lines().count() as u64, steps, "rank {rank}");
        for line in samples.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for pair in v["samples"].as_array().unwrap() {
                assert!(seen.insert(pair.to_string()), "{pair} trained twice");
            }
        }
    }
    assert_eq!(
        seen.len() as u64,
        steps * 32,
        "every sample of the 30 batches once"
    );
    // ... and nothing on the disks: the workers' and the client's directories are as they were.
    for home in homes.iter().chain([&client_dir]) {
        let left: Vec<_> = std::fs::read_dir(home)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{} holds {left:?}", home.display());
    }
}

/// Runs `program args`, panicking with the fix when the program is missing.
fn tool(program: &str, args: &[&str], fix: &str) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run ({e}): {fix}"))
}

#[test]
fn kubernetes_manifests_pass_the_api_schemas_and_their_command_lines_parse() {
    let root = cellfleet_e2e::workspace_root().join("deploy/kubernetes");
    let mut manifests: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .map(|p| p.display().to_string())
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 5, "{manifests:?}");
    // The API schemas of a Kubernetes release, strictly: an unknown or misplaced field fails.
    let interpreter = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut args = vec!["-m", "kubernetes_validate", "--strict", "-k", "1.30.0"];
    args.extend(manifests.iter().map(String::as_str));
    let validated = tool(
        &interpreter,
        &args,
        "scripts/setup.sh --for-tests installs kubernetes-validate",
    );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
    assert!(validated.status.success(), "{report}");
    assert!(!report.contains("No module named"), "{report}");
    assert!(report.matches(" passed ").count() >= 12, "{report}");
    // The validator refuses a broken manifest (so the check above can fail).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(root.join("coordinator.yaml")).unwrap();
    std::fs::write(
        &broken,
        text.replace("containerPort: 7070", "containerPort: seventy"),
    )
    .unwrap();
    let refused = tool(
        &interpreter,
        &[
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            "1.30.0",
            broken.to_str().unwrap(),
        ],
        "",
    );
    assert!(!refused.status.success());

    // kustomization.yaml applies every manifest but the example secrets.
    let kustomization = std::fs::read_to_string(root.join("kustomization.yaml")).unwrap();
    for manifest in &manifests {
        let name = Path::new(manifest).file_name().unwrap().to_str().unwrap();
        assert_eq!(
            kustomization.contains(&format!("- {name}")),
            name != "secrets.example.yaml",
            "{name} in kustomization.yaml"
        );
    }

    // Each cellfleet container's command line parses: run with it, the binary gets past its flags and
    // stops at something only a cluster has (a certificate file, a GPU), never at a usage error.
    let paths: Vec<&str> = manifests.iter().map(String::as_str).collect();
    let containers: serde_json::Value =
        serde_json::from_str(&python("manifest_args.py", &paths)).unwrap();
    let mut checked = 0;
    for (name, container) in containers.as_object().unwrap() {
        let image = container["image"].as_str().unwrap();
        if !image.starts_with("cellfleet/") {
            continue;
        }
        let mut args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        if image.starts_with("cellfleet/coordinator") {
            args.insert(0, "coordinator".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args, &[]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{name}: ran without a cluster?");
        assert!(
            !err.contains("Usage:") && !err.contains("unexpected argument"),
            "{name}: its command line does not parse: {err}"
        );
        assert!(
            err.contains("/etc/cellfleet/") || err.contains("CUDA"),
            "{name}: stopped at {err}"
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "the coordinator and the worker containers");
}

#[test]
fn the_slurm_script_passes_shellcheck_and_its_dry_run_starts_one_worker_per_gpu() {
    let root = cellfleet_e2e::workspace_root();
    let script = root.join("deploy/slurm/cellfleet.sbatch");
    let checked = tool(
        "shellcheck",
        &[script.to_str().unwrap()],
        "scripts/setup.sh --for-tests installs it (Debian package shellcheck)",
    );
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg("--dry-run")
        .env_remove("SLURM_JOB_NODELIST")
        .env("GPUS_PER_NODE", "4")
        .env("CORPUS", "s3://bucket/corpus")
        .env("OUT", "s3://bucket/runs/r1")
        .env("TRAIN_ARGS", "--preset tiny --steps 100")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("srun --nodes=1 --ntasks=1 --nodelist=node1"),
        "{text}"
    );
    assert!(
        lines[0].contains("cellfleet coordinator --listen 0.0.0.0:7070"),
        "{text}"
    );
    assert!(
        lines[1].contains("--ntasks-per-node=4 --gpus-per-task=1"),
        "{text}"
    );
    assert!(
        lines[1].contains("--advertise-host") && lines[1].contains("http://node1:7070"),
        "{text}"
    );
    assert!(
        lines[2].contains("train --coordinator http://node1:7070 --corpus s3://bucket/corpus --out s3://bucket/runs/r1")
            && lines[2].contains("--min-workers 8 --max-workers 8 --preset tiny --steps 100"),
        "{text}"
    );
    // Outside an allocation, without --dry-run, it refuses with the reason.
    let refused = Command::new("bash")
        .arg(&script)
        .env_remove("SLURM_JOB_NODELIST")
        .env("CORPUS", "s3://bucket/corpus")
        .env("OUT", "s3://bucket/runs/r1")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("not inside a Slurm allocation"));
}

#[test]
fn the_packaged_binary_carries_no_build_path_and_its_launcher_finds_libtorch() {
    let root = cellfleet_e2e::workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cellfleet");
    let bin_dir = Path::new(BIN).parent().unwrap();
    let packaged = Command::new("bash")
        .arg(root.join("scripts/package.sh"))
        .args([
            "--out",
            out.to_str().unwrap(),
            "--bin-dir",
            bin_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(packaged.status.success(), "{}", stderr(&packaged));
    let binary = out.join("bin/cellfleet-bin");
    let dynamic = tool(
        "readelf",
        &["-d", binary.to_str().unwrap()],
        "Debian package binutils",
    );
    let dynamic = String::from_utf8_lossy(&dynamic.stdout).into_owned();
    let runpath = dynamic
        .lines()
        .find(|l| l.contains("RUNPATH") || l.contains("RPATH"))
        .expect("a runpath");
    assert!(
        runpath.contains("[$ORIGIN/../lib/cellfleet/torch]"),
        "{runpath}"
    );
    // Alone, the binary cannot find libtorch: the build machine's path is gone.
    let alone = Command::new(&binary)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(!alone.status.success());
    assert!(
        stderr(&alone).contains("libtorch_cpu.so"),
        "{}",
        stderr(&alone)
    );
    // Through the launcher it finds this machine's PyTorch, or the directory it is told.
    let launcher = out.join("bin/cellfleet");
    let found = Command::new(&launcher).arg("--version").output().unwrap();
    assert!(found.status.success(), "{}", stderr(&found));
    assert!(String::from_utf8_lossy(&found.stdout).starts_with("cellfleet "));
    let wrong = Command::new(&launcher)
        .arg("--version")
        .env("CELLFLEET_LIBTORCH", dir.path())
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("holds no libtorch_cpu.so"),
        "{}",
        stderr(&wrong)
    );
    let no_torch = Command::new(&launcher)
        .arg("--version")
        .env("PYTHON", "/usr/bin/false")
        .output()
        .unwrap();
    assert!(
        stderr(&no_torch).contains("pip install torch==2.11.0"),
        "{}",
        stderr(&no_torch)
    );
    // The coordinator links no libtorch at all.
    let coordinator = Command::new(out.join("bin/cellfleet-coordinator"))
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(coordinator.status.success(), "{}", stderr(&coordinator));
    // Both launchers' and packaging scripts pass shellcheck.
    let checked = tool(
        "shellcheck",
        &[
            launcher.to_str().unwrap(),
            root.join("scripts/package.sh").to_str().unwrap(),
        ],
        "scripts/setup.sh --for-tests installs it (Debian package shellcheck)",
    );
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
}
