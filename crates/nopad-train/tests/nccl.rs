//! NCCL through `NcclCollective` on real GPUs. A world of one: every collective is the
//! identity on fresh random data, bit for bit, and elements past `n` are untouched. With two
//! GPUs, two worker processes started by `launch_local`: sums, shards and gathers against what
//! each rank put in (sizes that divide by two and sizes that do not), and a rank that disappears
//! leaves the other with an error naming it within the NCCL timeout instead of a hang. Without a
//! GPU (or with one GPU, for the two-process tests) each test prints a visible skip line.
//!
//! libnccl must be found: `LD_LIBRARY_PATH` must hold the directory of `libnccl.so.2` (for
//! PyTorch's wheels `site-packages/nvidia/nccl/lib`); without it the tests fail saying so.
//!
//! The two-process tests run this test binary again as the workers, with `NOPAD_NCCL_TEST_WORKER`
//! naming what a worker does; a worker's failed assertion is its non-zero exit, which
//! `launch_local` reports with the worker's last stderr lines.

use std::ffi::OsString;
use std::io::Write;
use std::time::{Duration, Instant};

use nopad_backend::cuda::{probe, Cuda, CudaMut, CudaOptions};
use nopad_backend::prelude::*;
use nopad_rng::Rng;
use nopad_train::{launch_local, Collective, DistOptions, LaunchOptions, NcclCollective, World};

/// The variable that makes this binary a worker, naming its scenario.
const WORKER: &str = "NOPAD_NCCL_TEST_WORKER";

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// `NOPAD_TEST_SEED` when set, else the clock.
fn seed() -> u64 {
    let clock = || {
        std::time::UNIX_EPOCH
            .elapsed()
            .map_or(1, |d| d.as_nanos() as u64)
    };
    std::env::var("NOPAD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(clock)
}

fn gpu(test: &str) -> Option<Cuda> {
    if let Err(why) = probe() {
        say(&format!("skipped: no CUDA device ({why}) [{test}]"));
        return None;
    }
    Some(Cuda::new(CudaOptions::default()).expect("a probed GPU opens"))
}

/// Whether a second GPU opens; prints the skip line otherwise.
fn two_gpus(test: &str) -> bool {
    if gpu(test).is_none() {
        return false;
    }
    let second = Cuda::new(CudaOptions {
        device: 1,
        ..Default::default()
    });
    if let Err(why) = &second {
        say(&format!(
            "skipped: fewer than 2 CUDA devices ({why}) [{test}]"
        ));
    }
    second.is_ok()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_world_of_one_through_nccl_is_the_identity() {
    let Some(cuda) = gpu("a_world_of_one_through_nccl_is_the_identity") else {
        return;
    };
    let world = World {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: 1,
        master_addr: "127.0.0.1".into(),
        master_port: 1,
    };
    let coll = NcclCollective::connect(&cuda, &world, &DistOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let seed = seed();
    let mut rng = Rng::new(seed);
    let ctx = |what: &str| format!("{what} (rerun with NOPAD_TEST_SEED={seed})");
    type Op = fn(&NcclCollective, &Cuda, CudaMut<'_>, usize) -> nopad_train::Result<()>;
    let all_reduce: Op = |c, b, v, n| c.all_reduce(b, v, n);
    let reduce_scatter: Op = |c, b, v, n| c.reduce_scatter(b, v, n);
    let all_gather: Op = |c, b, v, n| c.all_gather(b, v, n);
    // Deferred, then settled: the compute stream's read below must come after them.
    let all_reduce_deferred: Op = |c, b, v, n| {
        c.all_reduce_deferred(b, v, n)?;
        c.settle(b)
    };
    let reduce_scatter_deferred: Op = |c, b, v, n| {
        c.reduce_scatter_deferred(b, v, n)?;
        c.settle(b)
    };
    for kind in [Kind::Compute, Kind::Master, Kind::Grad, Kind::Code8] {
        for n in [1, 7, 1000, 4099] {
            let len = n + 3;
            let mut buf = cuda.alloc(len, kind).unwrap();
            let vals: Vec<f32> = (0..len)
                .map(|_| match kind {
                    Kind::Code8 => rng.below(256) as f32,
                    _ => rng.normal() as f32,
                })
                .collect();
            cuda.write(&mut buf, 0, &vals).unwrap();
            let before = bits(&cuda.read(&buf, 0..len).unwrap());
            // Codes are not numbers to sum: only the gather takes them.
            let ops = match kind {
                Kind::Code8 => vec![("all_gather", all_gather)],
                _ => vec![
                    ("all_reduce", all_reduce),
                    ("reduce_scatter", reduce_scatter),
                    ("all_gather", all_gather),
                    ("all_reduce_deferred", all_reduce_deferred),
                    ("reduce_scatter_deferred", reduce_scatter_deferred),
                ],
            };
            for (name, op) in ops {
                op(&coll, &cuda, cuda.view_mut(&mut buf, 0..len), n).unwrap();
                let after = bits(&cuda.read(&buf, 0..len).unwrap());
                assert_eq!(after, before, "{}", ctx(&format!("{name} {kind:?} n={n}")));
            }
            if kind == Kind::Code8 {
                let e = all_reduce(&coll, &cuda, cuda.view_mut(&mut buf, 0..len), n);
                assert!(e.unwrap_err().to_string().contains("all_reduce"));
            }
        }
    }
    // More values than one host chunk.
    let host: Vec<f64> = (0..150).map(|_| rng.normal() * 1e6).collect();
    let mut summed = host.clone();
    coll.all_reduce_host(&mut summed).unwrap();
    assert_eq!(summed, host, "{}", ctx("all_reduce_host"));
    assert_eq!(coll.all_reduce_count(12345).unwrap(), 12345);
    assert_eq!(Collective::<Cuda>::shard(&coll, 10), 0..10);
    coll.wait().unwrap();
}

/// Runs this binary's test `test` as two workers doing `scenario`; panics with the launcher's
/// error (the failing rank and its last lines) if one fails.
fn run_workers(test: &str, scenario: &str, env: &[(&str, &str)]) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let args: Vec<OsString> = ["--exact", test, "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsString::from)
        .collect();
    let mut opts = LaunchOptions {
        forward_signals: false,
        ..Default::default()
    };
    opts.env.push((WORKER.into(), scenario.into()));
    opts.env.extend(
        env.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    );
    launch_local(2, exe.as_os_str(), &args, &opts).unwrap_or_else(|e| panic!("{e}"));
}

/// A worker's setup: its world from the launcher's variables, its GPU, the communicator.
fn join_world() -> (World, Cuda, NcclCollective) {
    let world = World::from_env()
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("a worker runs with the launcher's variables");
    let cuda = Cuda::new(CudaOptions {
        device: world.local_rank,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("rank {}: {e}", world.rank));
    let opts = DistOptions::from_env().unwrap_or_else(|e| panic!("{e}"));
    let coll = NcclCollective::connect(&cuda, &world, &opts)
        .unwrap_or_else(|e| panic!("rank {}: {e}", world.rank));
    (world, cuda, coll)
}

/// What rank `rank` puts at index `i`: small integers, exact in bf16, so sums compare exactly.
fn value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 3) % 11) as f32 - 5.0
}

fn worker_collectives() {
    let (world, cuda, coll) = join_world();
    let (rank, w) = (world.rank, world.world_size);
    let sum = |i: usize| (0..w).map(|r| value(r, i)).sum::<f32>();
    for kind in [Kind::Compute, Kind::Master] {
        // 1: rank 1's shard is empty; 1001: padded shards; 4096: NCCL's own in-place shards.
        for n in [1, 1001, 4096] {
            let mine: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
            let mut buf = cuda.alloc(n, kind).unwrap();
            let what = |op: &str| format!("rank {rank}: {op} of {kind:?}, n={n}");

            // In order, and deferred: the sum is there once the compute stream has settled.
            for deferred in [false, true] {
                cuda.write(&mut buf, 0, &mine).unwrap();
                let view = cuda.view_mut(&mut buf, 0..n);
                match deferred {
                    false => coll.all_reduce(&cuda, view, n).unwrap(),
                    true => coll.all_reduce_deferred(&cuda, view, n).unwrap(),
                }
                coll.settle(&cuda).unwrap();
                let got = cuda.read(&buf, 0..n).unwrap();
                let op = ["all_reduce", "all_reduce_deferred"][deferred as usize];
                assert_eq!(got, (0..n).map(sum).collect::<Vec<_>>(), "{}", what(op));
            }

            cuda.write(&mut buf, 0, &mine).unwrap();
            coll.reduce_scatter(&cuda, cuda.view_mut(&mut buf, 0..n), n)
                .unwrap();
            let shard = Collective::<Cuda>::shard(&coll, n);
            let got = cuda.read(&buf, shard.clone()).unwrap();
            assert_eq!(
                got,
                shard.map(sum).collect::<Vec<_>>(),
                "{}",
                what("reduce_scatter")
            );

            // Only this rank's shard holds its values; the rest is filled by the gather.
            let shard = Collective::<Cuda>::shard(&coll, n);
            let partial: Vec<f32> = (0..n)
                .map(|i| {
                    if shard.contains(&i) {
                        value(rank, i)
                    } else {
                        99.0
                    }
                })
                .collect();
            cuda.write(&mut buf, 0, &partial).unwrap();
            coll.all_gather(&cuda, cuda.view_mut(&mut buf, 0..n), n)
                .unwrap();
            let owner = |i: usize| i / n.div_ceil(w);
            let want: Vec<f32> = (0..n).map(|i| value(owner(i), i)).collect();
            assert_eq!(
                cuda.read(&buf, 0..n).unwrap(),
                want,
                "{}",
                what("all_gather")
            );
        }
    }
    let mut host: Vec<f64> = (0..100).map(|i| (rank * 1000 + i) as f64).collect();
    coll.all_reduce_host(&mut host).unwrap();
    let want: Vec<f64> = (0..100)
        .map(|i| (0..w).map(|r| (r * 1000 + i) as f64).sum())
        .collect();
    assert_eq!(host, want, "rank {rank}: all_reduce_host");
    coll.wait().unwrap();
    say(&format!("rank {rank}: every collective agrees"));
}

fn worker_dead_rank() {
    let (world, cuda, coll) = join_world();
    if world.rank == 1 {
        // Gone without a word (no NCCL teardown), as a crashed rank; status 0 so that the
        // launcher leaves rank 0 alone and rank 0's own detection is what is tested.
        std::process::exit(0);
    }
    let n = 1 << 20;
    let mut buf = cuda.alloc(n, Kind::Master).unwrap();
    let start = Instant::now();
    let result = coll
        .all_reduce(&cuda, cuda.view_mut(&mut buf, 0..n), n)
        .and_then(|()| coll.wait());
    let took = start.elapsed();
    let e = result
        .expect_err("a collective with a dead peer must fail")
        .to_string();
    assert!(e.contains("rank 0") && e.contains("NCCL"), "{e}");
    assert!(took < Duration::from_secs(5 + 30), "took {took:?}: {e}");
    // Every later call fails at once with the recorded failure.
    let again = coll.all_reduce_count(1).unwrap_err().to_string();
    assert!(again.contains("rank 0"), "{again}");
    say(&format!("rank 0: failed as it should after {took:?}: {e}"));
}

#[test]
fn two_ranks_sum_shard_and_gather() {
    if std::env::var(WORKER).as_deref() == Ok("collectives") {
        return worker_collectives();
    }
    if two_gpus("two_ranks_sum_shard_and_gather") {
        run_workers("two_ranks_sum_shard_and_gather", "collectives", &[]);
    }
}

#[test]
fn a_dead_rank_fails_the_other_within_the_timeout() {
    if std::env::var(WORKER).as_deref() == Ok("dead_rank") {
        return worker_dead_rank();
    }
    if two_gpus("a_dead_rank_fails_the_other_within_the_timeout") {
        let timeout = [("NOPAD_NCCL_TIMEOUT", "5")];
        run_workers(
            "a_dead_rank_fails_the_other_within_the_timeout",
            "dead_rank",
            &timeout,
        );
    }
}
