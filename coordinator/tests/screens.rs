//! Screen work-unit leasing through the real gRPC service methods over an in-memory metadata store:
//! submission, leases and renewals, completion (once), lost holders, restarts, cancellation, failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::{Code, Request};

use cellfleet_coordinator::{Coordinator, CoordinatorConfig, Service, UnitLease};
use cellfleet_proto as pb;
use cellfleet_proto::coordinator_server::Coordinator as _;
use cellfleet_shared::meta::{MemoryStore, MetaStore};

const LONG_TTL: Duration = Duration::from_secs(30);

async fn service(store: &Arc<dyn MetaStore>, lease_ttl: Duration) -> Service {
    Service::new(
        Coordinator::start(store.clone(), CoordinatorConfig::with_lease_ttl(lease_ttl))
            .await
            .unwrap(),
    )
}

async fn fresh(lease_ttl: Duration) -> (Arc<dyn MetaStore>, Service) {
    let store: Arc<dyn MetaStore> = Arc::new(MemoryStore::new());
    let service = service(&store, lease_ttl).await;
    (store, service)
}

async fn register(s: &Service, host: &str) -> String {
    s.register_worker(Request::new(pb::RegisterWorkerRequest {
        hostname: host.into(),
        pid: 1,
        device: "cpu".into(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner()
    .worker_id
}

fn screen_request(units: u32, lease_ms: u64) -> pb::SubmitScreenRequest {
    pb::SubmitScreenRequest {
        location: "/screens/ko".into(),
        plan_blake3: "0123abcd".into(),
        units,
        pairs: u64::from(units) * 10,
        lease_ms,
        summary: "knockout of 4 genes in 5 cells".into(),
        ..Default::default()
    }
}

async fn submit(s: &Service, units: u32, lease_ms: u64) -> String {
    s.submit_screen(Request::new(screen_request(units, lease_ms)))
        .await
        .unwrap()
        .into_inner()
        .screen_id
}

async fn lease(s: &Service, worker: &str, screen: &str) -> pb::LeaseUnitResponse {
    s.lease_unit(Request::new(pb::LeaseUnitRequest {
        worker_id: worker.into(),
        screen_id: screen.into(),
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn renew(
    s: &Service,
    worker: &str,
    screen: &str,
    unit: u32,
    token: u64,
) -> pb::RenewUnitResponse {
    s.renew_unit(Request::new(pb::RenewUnitRequest {
        worker_id: worker.into(),
        screen_id: screen.into(),
        unit,
        token,
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn complete(
    s: &Service,
    worker: &str,
    screen: &str,
    unit: u32,
    token: u64,
    error: &str,
) -> pb::CompleteUnitResponse {
    s.complete_unit(Request::new(pb::CompleteUnitRequest {
        worker_id: worker.into(),
        screen_id: screen.into(),
        unit,
        token,
        key: format!("units/{unit:05}.safetensors"),
        blake3: format!("hash{unit}"),
        bytes: 1000 + u64::from(unit),
        pairs: 10,
        seconds: 0.5,
        error: error.into(),
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn status(s: &Service, screen: &str, include_units: bool) -> pb::ScreenStatusResponse {
    s.screen_status(Request::new(pb::ScreenStatusRequest {
        screen_id: screen.into(),
        include_units,
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn stored_lease(store: &Arc<dyn MetaStore>, screen: &str, unit: u32) -> Option<UnitLease> {
    let entry = store
        .get(&format!("screen-leases/{screen}/{unit}"))
        .await
        .unwrap()?;
    Some(serde_json::from_slice(&entry.value).unwrap())
}

#[tokio::test]
async fn submissions_are_validated_and_unknown_screens_reported() {
    let (_, s) = fresh(LONG_TTL).await;
    let bad = [
        (
            pb::SubmitScreenRequest {
                units: 0,
                ..screen_request(4, 0)
            },
            "units",
        ),
        (screen_request(4, 999), "lease_ms"),
        (
            pb::SubmitScreenRequest {
                location: String::new(),
                ..screen_request(4, 0)
            },
            "location",
        ),
        (
            pb::SubmitScreenRequest {
                plan_blake3: String::new(),
                ..screen_request(4, 0)
            },
            "plan_blake3",
        ),
    ];
    for (request, field) in bad {
        let e = s.submit_screen(Request::new(request)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let id = submit(&s, 4, 0).await;
    assert!(id.starts_with("screen-"), "{id}");
    let other = submit(&s, 4, 0).await;
    assert_ne!(id, other, "ids are unique within a millisecond");
    let worker = register(&s, "w").await;
    assert_eq!(
        lease(&s, &worker, &id).await.lease_ms,
        30_000,
        "the default lease"
    );

    let st = status(&s, &id, false).await;
    assert_eq!(
        (
            st.state(),
            st.units_total,
            st.pairs_total,
            st.location.as_str()
        ),
        (pb::ScreenState::Running, 4, 40, "/screens/ko")
    );
    assert_eq!(
        (st.plan_blake3.as_str(), st.summary.as_str()),
        ("0123abcd", "knockout of 4 genes in 5 cells")
    );
    assert_eq!(
        (st.units_leased, st.workers.clone()),
        (1, vec![worker.clone()])
    );
    assert_eq!(st.eta_seconds, -1.0, "no rate yet");

    for e in [
        s.screen_status(Request::new(pb::ScreenStatusRequest {
            screen_id: "nope".into(),
            include_units: false,
        }))
        .await
        .unwrap_err(),
        s.cancel_screen(Request::new(pb::CancelScreenRequest {
            screen_id: "nope".into(),
        }))
        .await
        .unwrap_err(),
        s.lease_unit(Request::new(pb::LeaseUnitRequest {
            worker_id: worker.clone(),
            screen_id: "nope".into(),
        }))
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let e = s
        .lease_unit(Request::new(pb::LeaseUnitRequest {
            worker_id: "ghost".into(),
            screen_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "a non-member cannot lease: {e:?}");
}

#[tokio::test]
async fn units_are_leased_once_renewed_and_recorded_once() {
    let (store, s) = fresh(LONG_TTL).await;
    let (a, b) = (register(&s, "a").await, register(&s, "b").await);
    let id = submit(&s, 3, 2000).await;

    let la = lease(&s, &a, &id).await;
    let lb = lease(&s, &b, &id).await;
    assert!(la.leased && lb.leased);
    assert_eq!((la.unit, lb.unit), (0, 1), "distinct units, lowest first");
    assert_ne!(la.token, lb.token);
    assert_eq!((la.state(), la.lease_ms), (pb::ScreenState::Running, 2000));

    // Renewal extends the stored deadline; a stale token is refused.
    let before = stored_lease(&store, &id, 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(renew(&s, &a, &id, 0, la.token).await.held);
    let after = stored_lease(&store, &id, 0).await.unwrap();
    assert!(
        after.deadline_unix_ms > before.deadline_unix_ms,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        (after.worker_id.as_str(), after.token),
        (a.as_str(), la.token)
    );
    let stale = renew(&s, &a, &id, 0, la.token + 1).await;
    assert!(
        !stale.held && stale.reason.contains("another worker"),
        "{stale:?}"
    );
    let wrong_unit = renew(&s, &a, &id, 1, la.token).await;
    assert!(!wrong_unit.held, "{wrong_unit:?}");

    let lc = lease(&s, &a, &id).await;
    assert_eq!((lc.leased, lc.unit), (true, 2));
    let none = lease(&s, &b, &id).await;
    assert!(
        !none.leased && none.state() == pb::ScreenState::Running && none.retry_after_ms > 0,
        "{none:?}"
    );

    assert!(complete(&s, &a, &id, 0, la.token, "").await.accepted);
    assert!(complete(&s, &b, &id, 1, lb.token, "").await.accepted);
    let st = status(&s, &id, false).await;
    assert_eq!((st.units_done, st.pairs_done, st.units_leased), (2, 20, 1));
    assert_eq!(st.workers, vec![a.clone()]);
    assert!(
        stored_lease(&store, &id, 0).await.is_none(),
        "a completed unit's lease is deleted"
    );
    let renew_done = renew(&s, &a, &id, 0, la.token).await;
    assert!(
        !renew_done.held && renew_done.reason.contains("completed"),
        "{renew_done:?}"
    );

    assert!(complete(&s, &a, &id, 2, lc.token, "").await.accepted);
    let again = complete(&s, &b, &id, 2, lc.token, "").await;
    assert!(!again.accepted, "{again:?}");
    let st = status(&s, &id, true).await;
    assert_eq!(st.state(), pb::ScreenState::Completed, "{st:?}");
    assert_eq!(
        (st.units_done, st.pairs_done, st.units_leased, st.releases),
        (3, 30, 0, 0)
    );
    assert!(
        st.message.starts_with("completed: 3 units, 30 pairs in "),
        "{}",
        st.message
    );
    assert_eq!(st.eta_seconds, 0.0);
    assert!(st.pairs_per_second > 0.0);
    let units: Vec<(u32, String, String)> = st
        .units
        .iter()
        .map(|u| (u.unit, u.key.clone(), u.worker_id.clone()))
        .collect();
    assert_eq!(
        units,
        [
            (0, "units/00000.safetensors".to_string(), a.clone()),
            (1, "units/00001.safetensors".to_string(), b.clone()),
            (2, "units/00002.safetensors".to_string(), a.clone()),
        ]
    );
    assert!(status(&s, &id, false).await.units.is_empty());
    let after_end = lease(&s, &b, &id).await;
    assert!(
        !after_end.leased && after_end.state() == pb::ScreenState::Completed,
        "{after_end:?}"
    );
    let late = complete(&s, &b, &id, 1, lb.token, "").await;
    assert!(!late.accepted);
}

async fn next(
    stream: &mut (impl tokio_stream::Stream<Item = Result<pb::Assignment, tonic::Status>> + Unpin),
) -> pb::assignment::Kind {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an assignment within 5 s")
        .unwrap()
        .unwrap()
        .kind
        .unwrap()
}

#[tokio::test]
async fn workers_get_screen_assignments_and_then_go_idle() {
    let (_, s) = fresh(LONG_TTL).await;
    tokio::spawn(s.coordinator().clone().run_reconciler());
    let w = register(&s, "w").await;
    let mut stream = s
        .assignments(Request::new(pb::AssignmentsRequest {
            worker_id: w.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next(&mut stream).await,
        pb::assignment::Kind::Idle(_)
    ));
    let id = submit(&s, 1, 0).await;
    match next(&mut stream).await {
        pb::assignment::Kind::Screen(a) => {
            assert_eq!(
                (
                    a.screen_id.as_str(),
                    a.location.as_str(),
                    a.plan_blake3.as_str()
                ),
                (id.as_str(), "/screens/ko", "0123abcd")
            );
        }
        other => panic!("expected a screen assignment, got {other:?}"),
    }
    let workers = s
        .list_workers(Request::new(pb::ListWorkersRequest {}))
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers[0].job_id, id);
    let l = lease(&s, &w, &id).await;
    assert!(complete(&s, &w, &id, l.unit, l.token, "").await.accepted);
    assert!(matches!(
        next(&mut stream).await,
        pb::assignment::Kind::Idle(_)
    ));
}

#[tokio::test]
async fn a_lapsed_holders_unit_is_leased_again_and_counted() {
    // A membership TTL long enough that b (registered after a lapsed) stays a member while it leases,
    // even on a loaded machine.
    let (_, s) = fresh(Duration::from_millis(1000)).await;
    let a = register(&s, "a").await;
    let id = submit(&s, 2, 30_000).await;
    let la = lease(&s, &a, &id).await;
    assert_eq!(la.unit, 0);
    // a stops heartbeating: its membership lapses long before the unit's deadline.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let b = register(&s, "b").await;
    let lb = lease(&s, &b, &id).await;
    assert_eq!((lb.leased, lb.unit), (true, 0), "{lb:?}");
    assert_eq!(status(&s, &id, false).await.releases, 1);
    assert!(!renew(&s, &a, &id, 0, la.token).await.held);
    let e = s
        .lease_unit(Request::new(pb::LeaseUnitRequest {
            worker_id: a.clone(),
            screen_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The old holder's result is as valid as anyone's: the first completion wins.
    assert!(complete(&s, &a, &id, 0, la.token, "").await.accepted);
    let second = complete(&s, &b, &id, 0, lb.token, "").await;
    assert!(
        !second.accepted && second.reason.contains("already recorded"),
        "{second:?}"
    );
    let st = status(&s, &id, false).await;
    assert_eq!((st.units_done, st.pairs_done, st.units_leased), (1, 10, 0));
}

#[tokio::test]
async fn a_disconnected_holders_unit_is_free_at_once() {
    let (_, s) = fresh(LONG_TTL).await;
    let (a, b) = (register(&s, "a").await, register(&s, "b").await);
    let stream = s
        .assignments(Request::new(pb::AssignmentsRequest {
            worker_id: a.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let id = submit(&s, 2, 30_000).await;
    assert_eq!(lease(&s, &a, &id).await.unit, 0);
    // What a SIGKILL does: the assignment stream closes and the coordinator ends the membership.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l = lease(&s, &b, &id).await;
        if l.leased && l.unit == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "unit 0 never became free: {l:?}");
        if l.leased {
            assert!(complete(&s, &b, &id, l.unit, l.token, "").await.accepted);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&s, &id, false).await.releases, 1);
}

#[tokio::test]
async fn an_expired_lease_is_leased_again() {
    let (_, s) = fresh(LONG_TTL).await;
    let (a, b) = (register(&s, "a").await, register(&s, "b").await);
    let id = submit(&s, 1, 1000).await;
    let la = lease(&s, &a, &id).await;
    assert!(!lease(&s, &b, &id).await.leased);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let lb = lease(&s, &b, &id).await;
    assert_eq!((lb.leased, lb.unit), (true, 0));
    let refused = renew(&s, &a, &id, 0, la.token).await;
    assert!(
        !refused.held && refused.reason.contains("another worker"),
        "{refused:?}"
    );
    assert_eq!(status(&s, &id, false).await.releases, 1);
}

#[tokio::test]
async fn a_restarted_coordinator_remembers_done_units_and_leases() {
    let store: Arc<dyn MetaStore> = Arc::new(MemoryStore::new());
    let first = service(&store, LONG_TTL).await;
    let a = register(&first, "a").await;
    let id = submit(&first, 3, 30_000).await;
    let l0 = lease(&first, &a, &id).await;
    let l1 = lease(&first, &a, &id).await;
    assert!(
        complete(&first, &a, &id, l0.unit, l0.token, "")
            .await
            .accepted
    );
    drop(first);

    let second = service(&store, LONG_TTL).await;
    let st = status(&second, &id, true).await;
    assert_eq!(
        (st.state(), st.units_done, st.pairs_done, st.units_leased),
        (pb::ScreenState::Running, 1, 10, 1)
    );
    assert_eq!(st.units.len(), 1);
    assert_eq!(
        st.pairs_per_second, 0.0,
        "no rate before this process leased anything"
    );
    assert!(
        renew(&second, &a, &id, l1.unit, l1.token).await.held,
        "the lease survived"
    );
    let l2 = lease(&second, &a, &id).await;
    assert_eq!(
        (l2.leased, l2.unit),
        (true, 2),
        "unit 0 is done and unit 1 is held"
    );
    assert!(l2.token > l1.token, "tokens grow across restarts");
    assert!(!lease(&second, &a, &id).await.leased);
    let dup = complete(&second, &a, &id, 0, l0.token, "").await;
    assert!(!dup.accepted && dup.reason.contains("already recorded"));
    assert!(complete(&second, &a, &id, 1, l1.token, "").await.accepted);
    assert!(complete(&second, &a, &id, 2, l2.token, "").await.accepted);
    assert_eq!(
        status(&second, &id, false).await.state(),
        pb::ScreenState::Completed
    );

    // The screen's record is the only key `screens/` lists; jobs are untouched.
    assert_eq!(store.list("screens/").await.unwrap().len(), 1);
    assert_eq!(store.list("screen-done/").await.unwrap().len(), 3);
    assert!(store.list("jobs/").await.unwrap().is_empty());
    let third = service(&store, LONG_TTL).await;
    let st = status(&third, &id, true).await;
    assert_eq!(
        (st.state(), st.units_done, st.pairs_done),
        (pb::ScreenState::Completed, 3, 30)
    );
}

#[tokio::test]
async fn a_cancelled_screen_hands_out_and_renews_nothing() {
    let (store, s) = fresh(LONG_TTL).await;
    let a = register(&s, "a").await;
    let id = submit(&s, 4, 0).await;
    let l = lease(&s, &a, &id).await;
    s.cancel_screen(Request::new(pb::CancelScreenRequest {
        screen_id: id.clone(),
    }))
    .await
    .unwrap();
    let refused = lease(&s, &a, &id).await;
    assert!(
        !refused.leased && refused.state() == pb::ScreenState::Cancelled,
        "{refused:?}"
    );
    let renewed = renew(&s, &a, &id, l.unit, l.token).await;
    assert!(
        !renewed.held && renewed.reason.contains("cancelled"),
        "{renewed:?}"
    );
    assert!(!complete(&s, &a, &id, l.unit, l.token, "").await.accepted);
    let again = s
        .cancel_screen(Request::new(pb::CancelScreenRequest {
            screen_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let st = status(&s, &id, false).await;
    assert_eq!(
        (st.state(), st.units_leased, st.units_done),
        (pb::ScreenState::Cancelled, 0, 0)
    );
    assert_eq!(st.eta_seconds, -1.0);
    assert!(store.list("screen-leases/").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_unit_failing_three_times_fails_the_screen() {
    let (_, s) = fresh(LONG_TTL).await;
    let a = register(&s, "a").await;
    let id = submit(&s, 2, 0).await;
    for attempt in 1..=3 {
        let l = lease(&s, &a, &id).await;
        assert_eq!(
            (l.leased, l.unit),
            (true, 0),
            "attempt {attempt}: the failed unit is free again"
        );
        let r = complete(&s, &a, &id, 0, l.token, "cell 17: NaN in the embedding").await;
        assert!(!r.accepted, "{r:?}");
        let st = status(&s, &id, false).await;
        if attempt < 3 {
            assert_eq!((st.state(), st.units_leased), (pb::ScreenState::Running, 0));
        }
    }
    let st = status(&s, &id, false).await;
    assert_eq!(st.state(), pb::ScreenState::Failed);
    assert!(
        st.message.contains("unit 0") && st.message.contains("NaN in the embedding"),
        "{}",
        st.message
    );
    assert_eq!(lease(&s, &a, &id).await.state(), pb::ScreenState::Failed);
}
