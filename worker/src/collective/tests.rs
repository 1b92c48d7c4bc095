//! Real Gloo groups over loopback TCP, one rank per thread, bootstrapped through `MemoryRendezvous`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::*;

/// A key prefix no other test uses, so tests sharing nothing still never see each other's keys.
fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("test/{name}/{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn options(timeout: Duration) -> GlooOptions {
    GlooOptions {
        timeout,
        ..GlooOptions::default()
    }
}

/// Runs `body(collective)` for every rank of a `world`-rank Gloo group, one thread each, and returns
/// what each rank returned, in rank order.
fn with_group<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    body: impl Fn(&mut GlooCollective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    tch::set_num_threads(1);
    let store = MemoryRendezvous::new();
    let prefix = unique_prefix("group");
    let body = Arc::new(body);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (store, prefix, body) = (store.clone(), prefix.clone(), body.clone());
            thread::spawn(move || {
                let mut gloo =
                    GlooCollective::connect(store, &prefix, rank, world, &options(timeout))
                        .expect("connect");
                assert_eq!(
                    (gloo.rank(), gloo.world(), gloo.backend()),
                    (rank, world, "gloo")
                );
                body(&mut gloo)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 values")
}

#[test]
fn all_reduce_sums_exactly_across_three_ranks() {
    let results = with_group(3, Duration::from_secs(10), |gloo| {
        let rank = gloo.rank() as f32;
        // Large enough for several ring segments; integers stay exact in f32.
        let mut t = Tensor::arange(300_000, (Kind::Float, Device::Cpu)) + f64::from(rank);
        gloo.all_reduce_sum(&mut t).expect("all-reduce");
        let mut small = Tensor::from_slice(&[rank, 10.0 * rank, -1.0]);
        gloo.all_reduce_sum(&mut small).expect("all-reduce");
        (values(&t), values(&small))
    });
    let expected: Vec<f32> = (0..300_000).map(|i| (3 * i + 3) as f32).collect();
    for (big, small) in results {
        assert_eq!(big, expected);
        assert_eq!(small, vec![3.0, 30.0, -3.0]);
    }
}

#[test]
fn two_ranks_sum_exactly_by_direct_exchange() {
    // Messages up to 256 KiB use the direct exchange: this one is exactly 256 KiB.
    let n = 64 * 1024;
    let results = with_group(2, Duration::from_secs(10), move |gloo| {
        let rank = gloo.rank() as f64;
        let mut t = Tensor::arange(n, (Kind::Float, Device::Cpu)) + rank;
        gloo.all_reduce_sum(&mut t).expect("all-reduce");
        gloo.all_reduce_sum(&mut t).expect("all-reduce again");
        values(&t)
    });
    let expected: Vec<f32> = (0..n).map(|i| (4 * i + 2) as f32).collect();
    for sums in results {
        assert_eq!(sums, expected);
    }
}

#[test]
fn ring_options_kept_per_buffer_sum_every_buffer_exactly() {
    // Above 256 KiB the ring runs with options kept for the last 8 buffers: 10 buffers reduced in turn,
    // twice, miss and evict; buffer 0 reduced again is kept, then a shorter view of it (same address,
    // fewer elements) must not take its options; buffer 9, still kept, is reduced once more.
    let n = 80_000;
    let view_len = n - 5_000;
    let results = with_group(2, Duration::from_secs(10), move |gloo| {
        let rank = gloo.rank() as f64;
        let mut buffers: Vec<Tensor> = (0..10)
            .map(|i| Tensor::arange(n, (Kind::Float, Device::Cpu)) + (rank + 10.0 * i as f64))
            .collect();
        for _ in 0..2 {
            for buffer in buffers.iter_mut() {
                gloo.all_reduce_sum(buffer).expect("all-reduce");
            }
        }
        gloo.all_reduce_sum(&mut buffers[0]).expect("all-reduce");
        let mut view = buffers[0].narrow(0, 0, view_len);
        gloo.all_reduce_sum(&mut view)
            .expect("all-reduce of a view");
        gloo.all_reduce_sum(&mut buffers[9]).expect("all-reduce");
        buffers.iter().map(values).collect::<Vec<_>>()
    });
    for sums in results {
        for (i, sum) in sums.iter().enumerate() {
            // Two ranks of (x + rank + 10 i) sum to 2x + 1 + 20 i; each later all-reduce doubles it.
            let (head, tail) = match i {
                0 => (8.0, 4.0),
                9 => (4.0, 4.0),
                _ => (2.0, 2.0),
            };
            for (x, &value) in sum.iter().enumerate() {
                let base = (2 * x) as f32 + 1.0 + 20.0 * i as f32;
                let times = if (x as i64) < view_len { head } else { tail };
                assert_eq!(value, times * base, "buffer {i} element {x}");
            }
        }
    }
}

#[test]
fn broadcast_from_root_one_and_barrier() {
    let results = with_group(3, Duration::from_secs(10), |gloo| {
        let rank = gloo.rank() as f32;
        let mut t = Tensor::full([4, 5], f64::from(rank) * 7.0, (Kind::Float, Device::Cpu));
        gloo.broadcast(&mut t, 1).expect("broadcast");
        gloo.barrier().expect("barrier");
        let mut ints = Tensor::from_slice(&[rank as i64, 100]);
        gloo.broadcast(&mut ints, 2).expect("broadcast i64");
        assert!(
            gloo.broadcast(&mut ints, 3).is_err(),
            "root outside the world"
        );
        (values(&t), Vec::<i64>::try_from(&ints).unwrap())
    });
    for (t, ints) in results {
        assert_eq!(t, vec![7.0; 20]);
        assert_eq!(ints, vec![2, 100]);
    }
}

fn mixed_tensors(rank: usize) -> Vec<Tensor> {
    let shapes: [&[i64]; 5] = [&[3, 4], &[5], &[2, 3, 2], &[40, 25], &[1]];
    shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n: i64 = shape.iter().product();
            (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (i as f64 + 1.0) + rank as f64)
                .reshape(*shape)
        })
        .collect()
}

#[test]
fn bucketed_all_reduce_matches_per_tensor_sums() {
    let world = 3;
    let results = with_group(world, Duration::from_secs(10), move |gloo| {
        let rank = gloo.rank();
        let tensors = mixed_tensors(rank);
        // Parameters are leaves that require grad; the helper must still update them in place.
        let _ = tensors[1].set_requires_grad(true);
        // 64 bytes = 16 floats: the [40, 25] tensor (4000 bytes) takes a bucket of its own.
        all_reduce_buckets(gloo, &tensors, 64).expect("bucketed all-reduce");
        // A non-contiguous tensor alone in its bucket goes through a copy.
        let transposed = Tensor::arange(6, (Kind::Float, Device::Cpu))
            .reshape([2, 3])
            .transpose(0, 1);
        all_reduce_buckets(gloo, std::slice::from_ref(&transposed), 1 << 20).expect("transposed");
        (
            tensors.iter().map(values).collect::<Vec<_>>(),
            values(&transposed),
        )
    });
    let expected: Vec<Vec<f32>> = mixed_tensors(0)
        .iter()
        // Every rank adds its rank to each value: 0 + 1 + 2 = 3.
        .map(|t| values(&(t * world as f64 + 3.0)))
        .collect();
    for (tensors, transposed) in results {
        assert_eq!(tensors, expected);
        assert_eq!(transposed, vec![0.0, 9.0, 3.0, 12.0, 6.0, 15.0]);
    }
}

#[test]
fn buckets_cut_by_size_and_dtype() {
    let t = |n: i64, kind| Tensor::zeros([n], (kind, Device::Cpu));
    let tensors = [
        t(4, Kind::Float),  // 16 bytes
        t(4, Kind::Float),  // 16
        t(20, Kind::Float), // 80: larger than a bucket, alone
        t(2, Kind::Float),  // 8
        t(2, Kind::Int64),  // other dtype
        t(1, Kind::Int64),
    ];
    assert_eq!(buckets(&tensors, 32), vec![0..2, 2..3, 3..4, 4..6]);
    assert_eq!(buckets(&[], 32), Vec::<Range<usize>>::new());
}

#[test]
fn broadcast_tensors_copies_root_parameters() {
    let results = with_group(2, Duration::from_secs(10), |gloo| {
        let tensors = mixed_tensors(gloo.rank() * 10);
        broadcast_tensors(gloo, &tensors, 1).expect("broadcast tensors");
        tensors.iter().map(values).collect::<Vec<_>>()
    });
    let expected: Vec<Vec<f32>> = mixed_tensors(10).iter().map(values).collect();
    for tensors in results {
        assert_eq!(tensors, expected);
    }
}

#[test]
fn solo_is_a_no_op_and_connect_picks_it_for_world_one() {
    let store = MemoryRendezvous::new();
    let mut solo = connect(
        store,
        "solo",
        0,
        1,
        Device::Cpu,
        "127.0.0.1",
        Duration::from_secs(1),
    )
    .unwrap();
    assert_eq!((solo.rank(), solo.world(), solo.backend()), (0, 1, "solo"));
    let tensors = mixed_tensors(3);
    all_reduce_buckets(solo.as_mut(), &tensors, 64).unwrap();
    broadcast_tensors(solo.as_mut(), &tensors, 0).unwrap();
    assert_eq!(
        tensors.iter().map(values).collect::<Vec<_>>(),
        mixed_tensors(3).iter().map(values).collect::<Vec<_>>()
    );
    assert!(solo.barrier().is_ok());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_names_it() {
    let store = MemoryRendezvous::new();
    let err = connect(
        store,
        "cuda",
        0,
        2,
        Device::Cuda(0),
        "127.0.0.1",
        Duration::from_secs(1),
    )
    .err()
    .expect("no NCCL without the cuda feature");
    assert!(err.to_string().contains("`cuda` feature"), "{err}");
}

#[test]
fn rank_outside_the_world_is_rejected() {
    let store = MemoryRendezvous::new();
    assert!(connect(
        store,
        "bad",
        2,
        2,
        Device::Cpu,
        "127.0.0.1",
        Duration::from_secs(1)
    )
    .is_err());
}

#[test]
fn missing_peer_fails_rendezvous_within_the_timeout() {
    let store = MemoryRendezvous::new();
    let started = Instant::now();
    let err = GlooCollective::connect(
        store,
        &unique_prefix("missing"),
        0,
        2,
        &options(Duration::from_secs(2)),
    )
    .err()
    .expect("rank 1 never comes");
    eprintln!("{err}");
    assert!(matches!(err, CollectiveError::Rendezvous(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

/// Two ranks with a 2 s timeout; rank 1 runs `misbehave` after one good all-reduce, rank 0 then tries
/// another all-reduce and reports what happened and how long it took.
fn peer_failure(
    misbehave: impl FnOnce(GlooCollective, mpsc::Receiver<()>) + Send + 'static,
) -> (Result<()>, Duration, Result<()>) {
    tch::set_num_threads(1);
    let timeout = Duration::from_secs(2);
    let store = MemoryRendezvous::new();
    let prefix = unique_prefix("failure");
    let (done_tx, done_rx) = mpsc::channel();
    let peer = {
        let (store, prefix) = (store.clone(), prefix.clone());
        thread::spawn(move || {
            let mut gloo =
                GlooCollective::connect(store, &prefix, 1, 2, &options(timeout)).expect("connect");
            let mut t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
            gloo.all_reduce_sum(&mut t).expect("first all-reduce");
            misbehave(gloo, done_rx);
        })
    };
    let mut gloo =
        GlooCollective::connect(store, &prefix, 0, 2, &options(timeout)).expect("connect");
    let mut t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
    gloo.all_reduce_sum(&mut t).expect("first all-reduce");
    let started = Instant::now();
    let lost = gloo.all_reduce_sum(&mut t);
    let elapsed = started.elapsed();
    let again = gloo.barrier();
    drop(gloo);
    let _ = done_tx.send(());
    peer.join().expect("peer thread");
    (lost, elapsed, again)
}

fn assert_peer_lost(result: (Result<()>, Duration, Result<()>), limit: Duration) {
    let (lost, elapsed, again) = result;
    match lost {
        Err(CollectiveError::PeerLost(msg)) => {
            eprintln!("PeerLost after {elapsed:?}: {msg}");
            assert!(
                msg.contains("rank 0") && msg.contains("all-reduce"),
                "{msg}"
            )
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(elapsed < limit, "took {elapsed:?}");
    assert!(
        matches!(again, Err(CollectiveError::PeerLost(_))),
        "a failed group stays failed: {again:?}"
    );
}

#[test]
fn dropped_peer_is_lost_within_the_timeout() {
    let result = peer_failure(|gloo, _done| drop(gloo));
    assert_peer_lost(result, Duration::from_secs(2) + Duration::from_secs(3));
}

#[test]
fn hung_peer_is_lost_within_the_timeout() {
    // Rank 1 stays connected but never joins the second all-reduce.
    let result = peer_failure(|gloo, done| {
        let _ = done.recv_timeout(Duration::from_secs(30));
        drop(gloo);
    });
    let (_, elapsed, _) = &result;
    assert!(
        *elapsed >= Duration::from_millis(1500),
        "gave up early: {elapsed:?}"
    );
    assert_peer_lost(result, Duration::from_secs(2) + Duration::from_secs(3));
}

#[test]
fn memory_rendezvous_blocks_until_set_or_timeout() {
    let store = MemoryRendezvous::new();
    let writer = {
        let store = store.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            store.set("k", b"value").unwrap();
        })
    };
    assert_eq!(store.get("k", Duration::from_secs(5)).unwrap(), b"value");
    writer.join().unwrap();
    let started = Instant::now();
    assert!(store.get("absent", Duration::from_millis(100)).is_err());
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[test]
fn dir_rendezvous_round_trips_odd_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirRendezvous::new(dir.path().join("rdv"));
    store.set("gen/1/gloo/0", b"\x00\x01addr").unwrap();
    store.set("gen/1/gloo/1", b"").unwrap();
    assert_eq!(
        store.get("gen/1/gloo/0", Duration::from_secs(1)).unwrap(),
        b"\x00\x01addr"
    );
    assert_eq!(
        store.get("gen/1/gloo/1", Duration::from_secs(1)).unwrap(),
        b""
    );
    assert!(store
        .get("gen/1/gloo/2", Duration::from_millis(50))
        .is_err());
}
