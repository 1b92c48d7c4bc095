//! Training across hosts: network namespaces on one machine (`cellfleet_e2e::netns`), the coordinator,
//! etcd and Garage on one host, three workers on three others, each with its own address. TLS with
//! mutual TLS for workers and a client token throughout, every output in S3, metrics scraped from every
//! host. One worker is cut off mid-job by dropping its traffic: the job re-forms from the newest
//! checkpoint without it and goes on; when the partition heals, the worker rejoins a later generation.
//! Then a screen of the trained model across the same hosts, with a worker cut off while it holds a
//! unit's lease: the unit is leased again and the screen completes with every record exactly once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cellfleet_e2e::netns::Topology;
use cellfleet_e2e::{
    http_get, pbmc_ingest_args, python, strs, tiny_job_args, wait_for, EtcdServer, GarageServer,
    Process, TestPki,
};
use cellfleet_shared::storage::Store;

const BIN: &str = env!("CARGO_BIN_EXE_cellfleet");

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A `cellfleet` process on `host`, in its own empty working directory (nothing shared on disk), logging
/// to `log`.
fn spawn_on(
    net: &Topology,
    host: usize,
    args: &[&str],
    env: &[(&'static str, String)],
    home: &Path,
) -> Process {
    std::fs::create_dir_all(home).unwrap();
    let log = home.with_extension("log");
    let file = std::fs::File::create(&log).unwrap();
    let child = net
        .command(host, BIN)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CELLFLEET_QUIET", "1")
        .current_dir(home)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("cellfleet starts");
    Process { child, log }
}

fn open(address: &str) -> bool {
    std::net::TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_millis(200))
        .is_ok()
}

/// `cellfleet job` as a client with the CA and the token.
struct Client {
    url: String,
    env: Vec<(&'static str, String)>,
}

impl Client {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["job", "--coordinator", &self.url];
        full.extend_from_slice(args);
        Command::new(bin())
            .args(&full)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CELLFLEET_QUIET", "1")
            .output()
            .unwrap()
    }

    /// (generation, committed step, workers) of `job`, from `cellfleet job status`.
    fn progress(&self, job: &str) -> (u64, u64, usize) {
        let out = self.run(&["status", job]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // The status's own lines, not its message line (which may start with the same words).
        let line = |prefix: &str, marker: &str| {
            text.lines()
                .map(str::trim)
                .find(|l| l.starts_with(prefix) && l.contains(marker))
                .map(str::to_string)
                .unwrap_or_default()
        };
        let number = |s: &str| s.parse::<u64>().unwrap_or(0);
        // "step 45/240 (epoch 0, ...)"
        let step = line("step ", "(epoch ");
        let step = number(
            step.trim_start_matches("step ")
                .split('/')
                .next()
                .unwrap_or(""),
        );
        // "generation 2 (1 re-formations), 2 workers: a, b"
        let generation_line = line("generation ", "re-formations), ");
        let generation = number(generation_line.split_whitespace().nth(1).unwrap_or(""));
        let workers = generation_line
            .split("), ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map_or(0, |n| number(n) as usize);
        (generation, step, workers)
    }
}

/// Per step, the samples of the newest generation that logged the step (older generations' steps past
/// a restored checkpoint were trained again), read from the sample logs in the store.
fn committed_samples(store: &Store) -> BTreeMap<u64, Vec<(u64, u32)>> {
    let mut by_generation: BTreeMap<u64, BTreeMap<u64, Vec<(u64, u32)>>> = BTreeMap::new();
    for file in store.list_objects("samples").unwrap() {
        let name = format!("samples/{file}");
        let generation: u64 = file
            .strip_prefix('g')
            .and_then(|r| r.split('-').next())
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| panic!("sample log name {name}"));
        let text = String::from_utf8(store.get(&name).unwrap().to_vec()).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let step = v["step"].as_u64().unwrap();
            by_generation
                .entry(generation)
                .or_default()
                .entry(step)
                .or_default()
                .extend(
                    v["samples"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap() as u32)),
                );
        }
    }
    let mut committed = BTreeMap::new();
    for steps in by_generation.into_values() {
        // Later generations overwrite: generations are visited in increasing order.
        committed.extend(steps);
    }
    committed
}

#[test]
fn training_across_hosts_survives_a_partition_and_takes_the_healed_worker_back() {
    let dir = tempfile::tempdir().unwrap();
    let net = Topology::create(4);
    let server = net.address(0);
    let pki = TestPki::create_for(dir.path(), std::slice::from_ref(&server));
    let etcd = EtcdServer::start_on(&net, 0);
    let garage = GarageServer::start_on(bin(), &net, 0);
    let corpus_url = garage.url("corpus");
    let ingest = garage.cellfleet(&strs(&pbmc_ingest_args(&corpus_url)));
    assert!(
        ingest.status.success(),
        "{}",
        String::from_utf8_lossy(&ingest.stderr)
    );

    let listen = format!("{server}:7070");
    let url = format!("https://{listen}");
    let metrics: Vec<String> = (0..4).map(|h| format!("{}:9464", net.address(h))).collect();
    let _coordinator = spawn_on(
        &net,
        0,
        &[
            "coordinator",
            "--listen",
            &listen,
            "--etcd",
            &etcd.endpoint,
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-client-ca",
            &pki.path("ca.pem"),
            "--client-token-file",
            &pki.path("token"),
            "--metrics-listen",
            &metrics[0],
            "--lease-ttl",
            "2",
        ],
        &garage.env(),
        &dir.path().join("coordinator"),
    );
    wait_for("the coordinator to listen", Duration::from_secs(20), || {
        open(&listen)
    });
    let _workers: Vec<Process> = (1..4)
        .map(|h| {
            spawn_on(
                &net,
                h,
                &[
                    "worker",
                    "--coordinator",
                    &url,
                    "--threads",
                    "1",
                    "--advertise-host",
                    &net.address(h),
                    "--metrics-listen",
                    &metrics[h],
                    "--tls-ca",
                    &pki.path("ca.pem"),
                    "--tls-cert",
                    &pki.path("worker.pem"),
                    "--tls-key",
                    &pki.path("worker.key"),
                ],
                &garage.env(),
                &dir.path().join(format!("worker-{h}")),
            )
        })
        .collect();
    let mut client_env = garage.env();
    client_env.push(("CELLFLEET_TLS_CA", pki.path("ca.pem")));
    client_env.push(("CELLFLEET_TOKEN_FILE", pki.path("token")));
    let client = Client {
        url: url.clone(),
        env: client_env.clone(),
    };
    wait_for("three workers to register", Duration::from_secs(30), || {
        String::from_utf8_lossy(&client.run(&["workers"]).stdout)
            .matches(" yes ")
            .count()
            == 3
    });
    // Across hosts too: a fourth worker without a certificate is refused, and so is a wrong token.
    let mut anonymous = spawn_on(
        &net,
        3,
        &[
            "worker",
            "--coordinator",
            &url,
            "--tls-ca",
            &pki.path("ca.pem"),
            "--reconnect-timeout",
            "3",
        ],
        &garage.env(),
        &dir.path().join("anonymous"),
    );
    assert!(!anonymous.wait(Duration::from_secs(60)).success());
    assert!(
        anonymous
            .log_text()
            .contains("need a TLS client certificate"),
        "{}",
        anonymous.log_text()
    );
    let mut wrong_env = client_env.clone();
    wrong_env.retain(|(k, _)| *k != "CELLFLEET_TOKEN_FILE");
    wrong_env.push(("CELLFLEET_TOKEN", "0".repeat(64)));
    let wrong = Client {
        url: url.clone(),
        env: wrong_env,
    }
    .run(&["workers"]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("was not accepted"));

    let run_url = garage.url("runs/multihost");
    let ckpt_url = garage.url("checkpoints/multihost");
    let steps = 240u64;
    let mut train = Process::spawn_with_env(
        bin(),
        &[
            "train",
            "--coordinator",
            &url,
            "--corpus",
            &corpus_url,
            "--out",
            &run_url,
            "--preset",
            "tiny",
            "--steps",
            &steps.to_string(),
            "--batch-size",
            "33",
            "--threads",
            "1",
            "--min-workers",
            "2",
            "--max-workers",
            "3",
            "--sample-log",
            "--collective-timeout",
            "5",
            "--checkpoint",
            &ckpt_url,
            "--checkpoint-every",
            "20",
        ],
        &client_env,
        dir.path().join("client.log"),
    );
    let job = {
        let mut id = None;
        wait_for("the job to be submitted", Duration::from_secs(30), || {
            id = train
                .log_text()
                .split_whitespace()
                .find(|w| w.starts_with("job-"))
                .map(str::to_string);
            id.is_some()
        });
        id.unwrap()
    };
    wait_for(
        "generation 1 to pass its second checkpoint",
        Duration::from_secs(120),
        || {
            let (generation, step, workers) = client.progress(&job);
            generation == 1 && workers == 3 && step >= 45
        },
    );

    // Cut worker 3 off. The coordinator stops hearing its heartbeats; its peers' collective stalls.
    let (_, step_at_cut, _) = client.progress(&job);
    let cut = Instant::now();
    net.partition(3);
    let mut detected = None;
    let mut recovered = None;
    wait_for(
        "the job to re-form without the cut-off worker and train on",
        Duration::from_secs(90),
        || {
            let (generation, step, workers) = client.progress(&job);
            if generation > 1 && workers == 2 && detected.is_none() {
                detected = Some((cut.elapsed(), step));
            }
            if let Some((_, restored)) = detected {
                if step > restored && recovered.is_none() {
                    recovered = Some(cut.elapsed());
                }
            }
            recovered.is_some()
        },
    );
    let (detection, restored_step) = detected.unwrap();
    let recovery = recovered.unwrap();
    // `step_at_cut` is the coordinator's last heard step, which lags the workers by up to a heartbeat:
    // they may finish and commit the next checkpoint (one interval on) before the partition bites.
    assert!(
        restored_step % 20 == 0 && restored_step >= 40 && restored_step <= step_at_cut + 20,
        "the new generation restarted from a checkpoint ({restored_step}, cut at {step_at_cut})"
    );

    // Heal: the worker finds its lease lapsed, registers again, and joins a later generation.
    let healed = Instant::now();
    net.heal(3);
    let mut rejoined = None;
    wait_for(
        "the healed worker to rejoin",
        Duration::from_secs(120),
        || {
            let (generation, _, workers) = client.progress(&job);
            if workers == 3 && generation > 2 {
                rejoined = Some(healed.elapsed());
            }
            rejoined.is_some()
        },
    );
    let status = train.wait(Duration::from_secs(300));
    assert!(status.success(), "the job finishes:\n{}", train.log_text());
    eprintln!(
        "partition -> re-formed without the worker: {detection:.2?} (restored step {restored_step}, cut at step {step_at_cut}); \
         -> first new step: {recovery:.2?}; heal -> rejoined: {:.2?}",
        rejoined.unwrap()
    );

    // Outputs are in S3 only, and the committed steps trained every sample of each epoch exactly once.
    let run = Store::open(&run_url, &garage.s3_options()).unwrap();
    assert!(run.get("model.safetensors").unwrap().len() > 1000);
    let log = String::from_utf8(run.get("pretrain_log.jsonl").unwrap().to_vec()).unwrap();
    let logged: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        logged,
        (1..=steps).collect::<Vec<_>>(),
        "the step log is the run's history"
    );
    let committed = committed_samples(&run);
    let missing: Vec<u64> = (1..=steps).filter(|s| !committed.contains_key(s)).collect();
    assert!(
        missing.is_empty() && committed.len() as u64 == steps,
        "steps without samples: {missing:?}; logs: {:?}",
        run.list_objects("samples").unwrap()
    );
    let corpus = cellfleet_shared::corpus::Corpus::open(&corpus_url, &garage.s3_options()).unwrap();
    let split = cellfleet_shared::stream::CellSplit::default();
    let epoch_len = (0..corpus.total_cells())
        .filter(|&c| split.part_of(c) == cellfleet_shared::stream::SplitPart::Train)
        .count()
        * 4;
    let all: Vec<(u64, u32)> = committed.values().flatten().copied().collect();
    let epochs = all.len() / epoch_len;
    assert!(epochs >= 2, "{} samples, epoch {epoch_len}", all.len());
    // Every complete epoch once; the last partial epoch too: no sample twice in it.
    for (epoch, chunk) in all.chunks(epoch_len).enumerate() {
        let mut seen: HashMap<(u64, u32), usize> = HashMap::new();
        for sample in chunk {
            *seen.entry(*sample).or_default() += 1;
        }
        assert!(
            seen.values().all(|&n| n == 1),
            "epoch {epoch}: a sample twice"
        );
        if chunk.len() == epoch_len {
            assert_eq!(seen.len(), epoch_len, "epoch {epoch}: every sample");
        }
    }
    for h in 1..4 {
        let home = dir.path().join(format!("worker-{h}"));
        let left: Vec<_> = std::fs::read_dir(&home).unwrap().flatten().collect();
        assert!(left.is_empty(), "worker {h} wrote to its disk: {left:?}");
    }

    // Metrics from every host parse as Prometheus text.
    let mut files = Vec::new();
    for (h, address) in metrics.iter().enumerate() {
        let path = dir.path().join(format!("host-{h}.prom"));
        std::fs::write(&path, http_get(address, "/metrics")).unwrap();
        files.push(path.display().to_string());
    }
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let parsed: serde_json::Value =
        serde_json::from_str(&python("parse_metrics.py", &args)).unwrap();
    let value = |file: usize, key: &str| parsed[&files[file]][key].as_f64();
    assert_eq!(
        value(0, &format!("cellfleet_job_step{{job={job}}}")),
        Some(steps as f64)
    );
    assert!(value(0, &format!("cellfleet_job_reformations_total{{job={job}}}")).unwrap() >= 2.0);
    for h in 1..4 {
        assert!(
            value(h, "cellfleet_train_generations_joined_total{}").unwrap() >= 1.0,
            "host {h}"
        );
    }
    assert!(
        value(3, "cellfleet_train_generations_joined_total{}").unwrap() >= 2.0,
        "the healed worker trained in two generations"
    );

    // A screen of the trained checkpoint across the hosts; everything it reads and writes is in S3.
    let spec = dir.path().join("screen.toml");
    std::fs::write(
        &spec,
        format!(
            "checkpoint = {ckpt_url:?}\ncorpus = {corpus_url:?}\nout = {:?}\nseed = 3\ngenes = \"all\"\n\n\
             [cells]\nmax_cells = 64\n\n[null]\ngenes = 10\n\n\
             [execution]\ngene_block = 32\ncell_block = 16\nbatch = 32\nlease_seconds = 4\nper_cell = true\n",
            garage.url("screens/multihost")
        ),
    )
    .unwrap();
    let screen = |args: &[&str]| {
        let mut full = vec!["screen"];
        full.extend_from_slice(args);
        full.extend(["--coordinator", &url]);
        let out = Command::new(bin())
            .args(&full)
            .envs(client_env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CELLFLEET_QUIET", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "screen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let id = screen(&["submit", spec.to_str().unwrap()])
        .trim()
        .to_string();
    let status = |id: &str| -> serde_json::Value {
        serde_json::from_str(&screen(&["status", id, "--json"])).unwrap()
    };
    let victim_pid = format!("-{}-", _workers[0].child.id());
    wait_for(
        "worker 1 to hold a lease mid-screen",
        Duration::from_secs(120),
        || {
            let s = status(&id);
            s["units_done"].as_u64().unwrap() >= 1
                && s["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w.as_str().unwrap().contains(&victim_pid))
        },
    );
    net.partition(1);
    wait_for(
        "the screen to complete without worker 1",
        Duration::from_secs(240),
        || {
            let s = status(&id);
            assert!(s["state"] != "failed" && s["state"] != "cancelled", "{s}");
            s["state"] == "completed"
        },
    );
    net.heal(1);
    let done = status(&id);
    assert!(
        done["releases"].as_u64().unwrap() >= 1,
        "the lost unit was leased again: {done}"
    );
    let results_url = garage.url("screens/multihost-results");
    screen(&["results", &id, "--out", &results_url, "--per-cell"]);
    let results = Store::open(&results_url, &garage.s3_options()).unwrap();
    let local = dir.path().join("screen-results");
    std::fs::create_dir_all(&local).unwrap();
    for name in ["genes.parquet", "cells.parquet", "screen.json"] {
        std::fs::write(local.join(name), results.get(name).unwrap()).unwrap();
    }
    let tables: serde_json::Value =
        serde_json::from_str(&python("read_screen.py", &[local.to_str().unwrap()])).unwrap();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local.join("screen.json")).unwrap()).unwrap();
    let cells = tables["cells"]["rows"].as_array().unwrap();
    let mut seen = std::collections::HashSet::new();
    for row in cells {
        let key = (
            row["gene"].as_str().unwrap().to_string(),
            row["cell"].as_u64().unwrap(),
        );
        assert!(seen.insert(key.clone()), "{key:?} twice");
    }
    assert_eq!(seen.len() as u64, record["pairs"].as_u64().unwrap());
    assert_eq!(done["pairs_done"], done["pairs_total"], "{done}");
    assert_eq!(seen.len() as u64, done["pairs_total"].as_u64().unwrap());
}

/// A process of a container image on `host`: chroot into the image's mounted root filesystem, in a
/// private mount namespace with /proc, /dev and a writable /tmp (what a container runtime would give).
fn spawn_in_image(
    net: &Topology,
    host: usize,
    root: &str,
    user: Option<&str>,
    command: &[&str],
    env: &[(&'static str, String)],
    log: &Path,
) -> Process {
    let quoted: Vec<String> = command.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "mount --bind /proc {root}/proc && mount --rbind /dev {root}/dev && mount -t tmpfs tmpfs {root}/tmp \
         && exec chroot {} {root} {}",
        user.map_or(String::new(), |u| format!("--userspec={u}")),
        quoted.join(" ")
    );
    let file = std::fs::File::create(log).unwrap();
    let child = net
        .command(host, "unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &script])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("HOME", "/tmp")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("unshare runs");
    Process {
        child,
        log: log.to_path_buf(),
    }
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman")
        .args(args)
        .output()
        .expect("podman must be installed: scripts/setup.sh --for-tests (Debian package podman)");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn the_container_images_start_and_train_together_across_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("e2e-{}", std::process::id());
    let built = Command::new("bash")
        .arg(cellfleet_e2e::workspace_root().join("scripts/build-images.sh"))
        .args([
            "--bin-dir",
            bin().parent().unwrap().to_str().unwrap(),
            "--tag",
            &tag,
        ])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "building the images: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let (coordinator_image, worker_image) = (
        format!("localhost/cellfleet/coordinator:{tag}"),
        format!("localhost/cellfleet/worker:{tag}"),
    );
    struct Images(Vec<String>);
    impl Drop for Images {
        fn drop(&mut self) {
            for image in &self.0 {
                let _ = Command::new("podman")
                    .args(["image", "unmount", image])
                    .output();
                let _ = Command::new("podman").args(["rmi", "-f", image]).output();
            }
        }
    }
    let _images = Images(vec![coordinator_image.clone(), worker_image.clone()]);
    // The coordinator image is slim: no libtorch in it.
    let coordinator_root = podman(&["image", "mount", &coordinator_image]);
    let worker_root = podman(&["image", "mount", &worker_image]);
    let has_libtorch = Command::new("find")
        .args([&coordinator_root, "-name", "libtorch_cpu.so"])
        .output()
        .unwrap();
    assert!(
        has_libtorch.stdout.is_empty(),
        "libtorch in the coordinator image"
    );

    let net = Topology::create(3);
    let garage = GarageServer::start_on(bin(), &net, 0);
    let corpus_url = garage.url("corpus");
    let ingest = garage.cellfleet(&strs(&pbmc_ingest_args(&corpus_url)));
    assert!(
        ingest.status.success(),
        "{}",
        String::from_utf8_lossy(&ingest.stderr)
    );
    let listen = format!("{}:7070", net.address(0));
    let url = format!("http://{listen}");
    let mut env = garage.env();
    env.push(("CELLFLEET_QUIET", "1".into()));
    let _coordinator = spawn_in_image(
        &net,
        0,
        &coordinator_root,
        Some("65534:65534"),
        &[
            "/usr/local/bin/cellfleet-coordinator",
            "--listen",
            &listen,
            "--lease-ttl",
            "3",
        ],
        &env,
        &dir.path().join("coordinator.log"),
    );
    wait_for(
        "the coordinator image to listen",
        Duration::from_secs(20),
        || open(&listen),
    );
    let _workers: Vec<Process> = (1..3)
        .map(|h| {
            spawn_in_image(
                &net,
                h,
                &worker_root,
                None,
                // No --advertise-host: each worker advertises its route to the coordinator.
                &[
                    "/usr/local/bin/cellfleet",
                    "worker",
                    "--coordinator",
                    &url,
                    "--threads",
                    "1",
                ],
                &env,
                &dir.path().join(format!("worker-{h}.log")),
            )
        })
        .collect();
    let run_url = garage.url("runs/images");
    let steps = 30u64;
    let mut client_env = garage.env();
    client_env.push(("CELLFLEET_QUIET", "1".into()));
    let mut train = Process::spawn_with_env(
        bin(),
        &strs(&tiny_job_args(&url, &corpus_url, &run_url, steps, 32, 2)),
        &client_env,
        dir.path().join("client.log"),
    );
    let status = train.wait(Duration::from_secs(240));
    let logs = || {
        ["coordinator.log", "worker-1.log", "worker-2.log"]
            .iter()
            .map(|l| std::fs::read_to_string(dir.path().join(l)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert!(
        status.success(),
        "the job finishes:\n{}\n{}",
        train.log_text(),
        logs()
    );
    assert!(
        train.log_text().contains("2 workers in generation 1"),
        "{}",
        train.log_text()
    );
    let run = Store::open(&run_url, &garage.s3_options()).unwrap();
    assert!(run.get("model.safetensors").unwrap().len() > 1000);
    let committed = committed_samples(&run);
    assert_eq!(committed.len() as u64, steps);
    let mut seen = std::collections::HashSet::new();
    for sample in committed.values().flatten() {
        assert!(seen.insert(*sample), "{sample:?} twice");
    }
    assert!(logs().contains("rank 1 of 2"), "{}", logs());
    for h in 1..3 {
        let log = std::fs::read_to_string(dir.path().join(format!("worker-{h}.log"))).unwrap();
        assert!(
            log.contains(&format!("advertising {} ", net.address(h))),
            "{log}"
        );
    }
}
