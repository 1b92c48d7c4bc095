//! Seeded hostile requests against every gRPC method of a real coordinator service (in-memory metadata):
//! malformed and out-of-range fields (empty, huge, negative-looking, NaN, unknown or foreign ids, ids of
//! the right kind in the wrong place, a 1 MiB string), mixed with valid ids so that the handlers are
//! reached past their first check. Every call must answer (no panic, no hang) with success or a
//! client-error status, and the service must still serve a valid request afterwards.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Request};

use cellfleet_coordinator::{Coordinator, CoordinatorConfig, Service};
use cellfleet_proto as pb;
use cellfleet_proto::coordinator_server::Coordinator as _;
use cellfleet_shared::hostile::SeededRng as Rng;
use cellfleet_shared::meta::{MemoryStore, MetaStore};

/// Ids the service knows, so a hostile request can carry a real id in any id field.
struct Known {
    worker: String,
    job: String,
    screen: String,
}

fn string(rng: &mut Rng, known: &Known) -> String {
    match rng.below(12) {
        0 => String::new(),
        1 => known.worker.clone(),
        2 => known.job.clone(),
        3 => known.screen.clone(),
        4 => "x".repeat(1 << 20),
        5 => "../../../etc/passwd".into(),
        6 => "screen-\u{0}\u{202e}".into(),
        7 => "job-99999999999999999999999".into(),
        8 => "worker-1-2-3".into(),
        9 => "s3://bucket/../other".into(),
        10 => "{\"corpus\": 1}".into(),
        _ => format!("{:x}", rng.next_u64()),
    }
}

fn number(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 => 1,
        2 => u64::from(u32::MAX),
        3 => u64::MAX,
        4 => u64::MAX / 2,
        5 => 1 << 40,
        _ => rng.next_u64() % 1000,
    }
}

fn small(rng: &mut Rng) -> u32 {
    match rng.below(5) {
        0 => 0,
        1 => u32::MAX,
        2 => 1 << 31,
        _ => (rng.next_u64() % 64) as u32,
    }
}

fn float(rng: &mut Rng) -> f64 {
    [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1.0,
        0.0,
        1e308,
        -0.0,
        0.5,
    ][rng.below(8)]
}

fn spec_json(rng: &mut Rng, known: &Known) -> String {
    let mut spec = serde_json::json!({
        "corpus": "/nonexistent/corpus",
        "config": {"steps": 10, "batch_size": 8, "preset": "tiny"},
        "out": "/tmp/out",
        "min_workers": 1,
        "max_workers": 2,
        "checkpoint": {"url": "/tmp/ckpt", "every": 5, "keep_last": 2},
        "resume": {"url": "/tmp/ckpt/step-000000000005", "step": 5, "manifest_blake3": "00"},
    });
    let fields = [
        "corpus",
        "out",
        "min_workers",
        "max_workers",
        "threads",
        "collective_timeout_ms",
        "stop_after",
        "config",
        "checkpoint",
        "resume",
    ];
    for _ in 0..1 + rng.below(3) {
        let field = fields[rng.below(fields.len())];
        spec[field] = match rng.below(5) {
            0 => serde_json::json!(number(rng)),
            1 => serde_json::json!(string(rng, known)),
            2 => serde_json::json!(float(rng).to_string()),
            3 => serde_json::Value::Null,
            _ => serde_json::json!({"steps": number(rng), "batch_size": small(rng)}),
        };
    }
    if rng.below(8) == 0 {
        return string(rng, known);
    }
    spec.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_to_every_method_get_an_answer_and_never_a_crash() {
    let store: Arc<dyn MetaStore> = Arc::new(MemoryStore::new());
    let service = Service::new(
        Coordinator::start(
            store,
            CoordinatorConfig::with_lease_ttl(Duration::from_secs(5)),
        )
        .await
        .unwrap(),
    );
    let worker = service
        .register_worker(Request::new(pb::RegisterWorkerRequest {
            hostname: "host".into(),
            pid: 7,
            device: "cpu".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let screen = service
        .submit_screen(Request::new(pb::SubmitScreenRequest {
            location: "/screens/s".into(),
            plan_blake3: "00ff".into(),
            units: 4,
            pairs: 40,
            lease_ms: 2000,
            summary: "a screen".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .screen_id;
    let known = Known {
        worker,
        job: "job-1".into(),
        screen,
    };

    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut failures = Vec::new();
    let requests = 2000;
    for i in 0..requests {
        let mut rng = Rng(0x6752_5043 ^ i as u64);
        let method = rng.below(17);
        let s = service.clone();
        let (name, call): (&str, futures_like::Call) = match method {
            0 => {
                let r = pb::RegisterWorkerRequest {
                    worker_id: string(&mut rng, &known),
                    hostname: string(&mut rng, &known),
                    pid: small(&mut rng),
                    device: string(&mut rng, &known),
                };
                (
                    "RegisterWorker",
                    Box::pin(async move { s.register_worker(Request::new(r)).await.map(|_| ()) }),
                )
            }
            1 => {
                let r = pb::HeartbeatRequest {
                    worker_id: string(&mut rng, &known),
                };
                (
                    "Heartbeat",
                    Box::pin(async move { s.heartbeat(Request::new(r)).await.map(|_| ()) }),
                )
            }
            2 => {
                let r = pb::AssignmentsRequest {
                    worker_id: string(&mut rng, &known),
                };
                (
                    "Assignments",
                    Box::pin(async move { s.assignments(Request::new(r)).await.map(|_| ()) }),
                )
            }
            3 => {
                let r = pb::StepReport {
                    worker_id: string(&mut rng, &known),
                    job_id: string(&mut rng, &known),
                    generation: number(&mut rng),
                    rank: small(&mut rng),
                    step: number(&mut rng),
                    loss: float(&mut rng),
                    accuracy: float(&mut rng),
                    grad_norm: float(&mut rng),
                    lr: float(&mut rng),
                    samples: number(&mut rng),
                    tokens: number(&mut rng),
                    seconds: float(&mut rng),
                    finished: rng.below(2) == 0,
                    error: string(&mut rng, &known),
                    fatal: rng.below(2) == 0,
                    checkpoint_unusable: rng.below(2) == 0,
                };
                (
                    "ReportStep",
                    Box::pin(async move { s.report_step(Request::new(r)).await.map(|_| ()) }),
                )
            }
            4 => {
                let r = pb::CheckpointCommit {
                    worker_id: string(&mut rng, &known),
                    job_id: string(&mut rng, &known),
                    generation: number(&mut rng),
                    step: number(&mut rng),
                    url: string(&mut rng, &known),
                    manifest_blake3: string(&mut rng, &known),
                };
                (
                    "CommitCheckpoint",
                    Box::pin(async move { s.commit_checkpoint(Request::new(r)).await.map(|_| ()) }),
                )
            }
            5 => {
                let r = pb::KvSetRequest {
                    job_id: string(&mut rng, &known),
                    generation: number(&mut rng),
                    key: string(&mut rng, &known),
                    value: string(&mut rng, &known).into_bytes(),
                };
                (
                    "KvSet",
                    Box::pin(async move { s.kv_set(Request::new(r)).await.map(|_| ()) }),
                )
            }
            6 => {
                let r = pb::KvGetRequest {
                    job_id: string(&mut rng, &known),
                    generation: number(&mut rng),
                    key: string(&mut rng, &known),
                    timeout_ms: number(&mut rng),
                };
                (
                    "KvGet",
                    Box::pin(async move { s.kv_get(Request::new(r)).await.map(|_| ()) }),
                )
            }
            7 => {
                let r = pb::SubmitJobRequest {
                    spec_json: spec_json(&mut rng, &known),
                };
                (
                    "SubmitJob",
                    Box::pin(async move { s.submit_job(Request::new(r)).await.map(|_| ()) }),
                )
            }
            8 => {
                let r = pb::JobStatusRequest {
                    job_id: string(&mut rng, &known),
                };
                (
                    "JobStatus",
                    Box::pin(async move { s.job_status(Request::new(r)).await.map(|_| ()) }),
                )
            }
            9 => {
                let r = pb::CancelJobRequest {
                    job_id: string(&mut rng, &known),
                };
                (
                    "CancelJob",
                    Box::pin(async move { s.cancel_job(Request::new(r)).await.map(|_| ()) }),
                )
            }
            10 => (
                "ListWorkers",
                Box::pin(async move {
                    s.list_workers(Request::new(pb::ListWorkersRequest {}))
                        .await
                        .map(|_| ())
                }),
            ),
            11 => {
                let r = pb::SubmitScreenRequest {
                    location: string(&mut rng, &known),
                    plan_blake3: string(&mut rng, &known),
                    units: small(&mut rng),
                    pairs: number(&mut rng),
                    lease_ms: number(&mut rng),
                    threads: small(&mut rng),
                    s3_endpoint: string(&mut rng, &known),
                    s3_region: string(&mut rng, &known),
                    summary: string(&mut rng, &known),
                };
                (
                    "SubmitScreen",
                    Box::pin(async move { s.submit_screen(Request::new(r)).await.map(|_| ()) }),
                )
            }
            12 => {
                let r = pb::ScreenStatusRequest {
                    screen_id: string(&mut rng, &known),
                    include_units: rng.below(2) == 0,
                };
                (
                    "ScreenStatus",
                    Box::pin(async move { s.screen_status(Request::new(r)).await.map(|_| ()) }),
                )
            }
            13 => {
                let r = pb::CancelScreenRequest {
                    screen_id: string(&mut rng, &known),
                };
                (
                    "CancelScreen",
                    Box::pin(async move { s.cancel_screen(Request::new(r)).await.map(|_| ()) }),
                )
            }
            14 => {
                let r = pb::LeaseUnitRequest {
                    worker_id: string(&mut rng, &known),
                    screen_id: string(&mut rng, &known),
                };
                (
                    "LeaseUnit",
                    Box::pin(async move { s.lease_unit(Request::new(r)).await.map(|_| ()) }),
                )
            }
            15 => {
                let r = pb::RenewUnitRequest {
                    worker_id: string(&mut rng, &known),
                    screen_id: string(&mut rng, &known),
                    unit: small(&mut rng),
                    token: number(&mut rng),
                };
                (
                    "RenewUnit",
                    Box::pin(async move { s.renew_unit(Request::new(r)).await.map(|_| ()) }),
                )
            }
            _ => {
                let r = pb::CompleteUnitRequest {
                    worker_id: string(&mut rng, &known),
                    screen_id: string(&mut rng, &known),
                    unit: small(&mut rng),
                    token: number(&mut rng),
                    key: string(&mut rng, &known),
                    blake3: string(&mut rng, &known),
                    bytes: number(&mut rng),
                    pairs: number(&mut rng),
                    seconds: float(&mut rng),
                    error: string(&mut rng, &known),
                };
                (
                    "CompleteUnit",
                    Box::pin(async move { s.complete_unit(Request::new(r)).await.map(|_| ()) }),
                )
            }
        };
        // A panicking handler ends its task: the join error says so.
        let task = tokio::spawn(call);
        let outcome = match tokio::time::timeout(Duration::from_secs(5), task).await {
            Err(_) if name == "KvGet" => {
                "long poll (waits for its key; the client's own deadline)".to_string()
            }
            Err(_) => {
                failures.push(format!("request {i} ({name}) did not answer within 5 s"));
                "hung".into()
            }
            Ok(Err(join)) => {
                failures.push(format!("request {i} ({name}) panicked: {join}"));
                "panicked".into()
            }
            Ok(Ok(Ok(()))) => "ok".into(),
            Ok(Ok(Err(status))) => {
                if matches!(status.code(), Code::Internal | Code::Unknown) {
                    failures.push(format!(
                        "request {i} ({name}) got {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
                if status.message().len() > 2000 {
                    failures.push(format!(
                        "request {i} ({name}) got a {}-byte error message (echoes the input?)",
                        status.message().len()
                    ));
                }
                format!("{:?}", status.code())
            }
        };
        *counts.entry(format!("{name} {outcome}")).or_default() += 1;
    }
    for (what, n) in &counts {
        println!("HOSTILE {what}: {n}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Still serving: a valid request after all of that.
    let status = service
        .screen_status(Request::new(pb::ScreenStatusRequest {
            screen_id: known.screen.clone(),
            include_units: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.screen_id, known.screen);
}

mod futures_like {
    /// One request in flight, as a task the test can spawn.
    pub type Call = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static>,
    >;
}
