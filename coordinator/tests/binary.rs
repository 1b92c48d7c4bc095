//! The standalone `cellfleet-coordinator` binary: serves gRPC, and links no libtorch (the architecture
//! invariant that lets it run on a small control-plane node).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellfleet_proto as pb;

const BIN: &str = env!("CARGO_BIN_EXE_cellfleet-coordinator");

#[test]
fn links_no_libtorch() {
    let out = Command::new("ldd").arg(BIN).output().expect("ldd runs");
    let libraries = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd {BIN} failed");
    for forbidden in ["libtorch", "libc10", "libgloo"] {
        assert!(
            !libraries.contains(forbidden),
            "the coordinator links {forbidden}:\n{libraries}"
        );
    }
}

#[tokio::test]
async fn serves_and_reports_bad_flags() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--lease-ttl", "2"])
        .stderr(Stdio::null())
        .spawn()
        .expect("the coordinator starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match pb::coordinator_client::CoordinatorClient::connect(format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "no coordinator on {port}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let registered = client
        .register_worker(pb::RegisterWorkerRequest {
            hostname: "h".into(),
            pid: 1,
            device: "cpu".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.lease_ttl_ms, 2000);
    let workers = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].worker_id, registered.worker_id);
    // Without heartbeats the lease lapses and the worker is gone.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let workers = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(workers.is_empty(), "{workers:?}");
    let _ = child.kill();
    let _ = child.wait();

    let out = Command::new(BIN)
        .args(["--etcd", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("http://127.0.0.1:1"), "{stderr}");
}
