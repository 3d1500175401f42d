//! A [`Collective`] whose ranks are threads of one process ([`ThreadGroup`]), over the CPU
//! backend: what the tests of data-parallel training and `nopad train --device cpu --ranks N`
//! run on. It is a reference, not a fast path: every collective copies through the host.
//!
//! Each collective call is a meeting: every rank brings its values, the last to arrive combines
//! them, the others wait on a condition variable. Sums run in rank order 0..N in the buffer's
//! type, so every rank receives the same bits, as NCCL's sum does on one node.
//!
//! Failure never hangs: a rank that reports an error ([`ThreadRank::fail`]), panics or leaves
//! the group (drops its handle) while its peers wait makes their pending and later calls return
//! an error naming it; a meeting whose ranks do not all arrive within the timeout fails naming
//! the ranks missing; and ranks that disagree on the call (another collective or another length)
//! fail naming both calls.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nopad_backend::cpu::{Cpu, Scalar};
#[cfg(test)]
use nopad_backend::Device;

use super::{aligned_shard, Collective};
use crate::error::{Result, TrainError};

/// How long a rank waits for its peers at one meeting by default. A step's compute between two
/// collectives is far shorter on the models a CPU trains; a rank stuck longer is hung.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Builds the ranks of one group of threads.
pub struct ThreadGroup;

impl ThreadGroup {
    /// `n` ranks (0..n) of one group, with [`DEFAULT_TIMEOUT`]; hand one to each thread.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(n: usize) -> Vec<ThreadRank> {
        Self::with_timeout(n, DEFAULT_TIMEOUT)
    }

    /// `n` ranks whose meetings fail after `timeout` without every rank.
    pub fn with_timeout(n: usize, timeout: Duration) -> Vec<ThreadRank> {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            n,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                call: None,
                inputs: vec![None; n],
                arrived: 0,
                result: Arc::new(vec![]),
                failed: None,
                left: vec![false; n],
            }),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| ThreadRank {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }
}

/// One collective call as the ranks must agree on it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Call {
    what: &'static str,
    n: usize,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} values", self.what, self.n)
    }
}

struct State {
    /// Meetings completed so far.
    generation: u64,
    /// The call of the meeting in progress (set by its first rank).
    call: Option<Call>,
    /// Each rank's values at the meeting in progress.
    inputs: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// What the last completed meeting produced (kept until the next one completes, which no
    /// rank can reach before it has taken this).
    result: Arc<Vec<f64>>,
    /// The first rank that failed, and why: every later call fails with it.
    failed: Option<(usize, String)>,
    /// Ranks that dropped their handle.
    left: Vec<bool>,
}

struct Shared {
    n: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank of a [`ThreadGroup`]; implements [`Collective`] for `Cpu<f32>` and `Cpu<f64>`.
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

fn collective_error(msg: String) -> TrainError {
    TrainError::Collective(msg)
}

impl ThreadRank {
    /// This rank (also [`Collective::rank`], without naming the backend).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.shared.n
    }

    /// Marks this rank as failed (`why`: its error), so that its peers' pending and later
    /// collectives return an error naming it instead of waiting for it.
    pub fn fail(&self, why: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some((self.rank, why.to_string()));
        }
        self.shared.cv.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens with the lock held (nothing below panics), but a poisoned lock
        // still holds a consistent state: the failure it records is what the peers must see.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error of a call that cannot complete, if any: a failed rank, or one that left
    /// without arriving.
    fn broken(&self, st: &State, call: &Call) -> Option<TrainError> {
        if let Some((r, why)) = &st.failed {
            return Some(collective_error(format!(
                "rank {}: {call} abandoned: rank {r} failed: {why}",
                self.rank
            )));
        }
        let gone: Vec<usize> = (0..self.shared.n)
            .filter(|&r| st.left[r] && st.inputs[r].is_none())
            .collect();
        (!gone.is_empty()).then(|| {
            collective_error(format!(
                "rank {}: {call} abandoned: rank(s) {gone:?} left the group without taking part",
                self.rank
            ))
        })
    }

    /// Brings `input` to the meeting of `call`; the last rank to arrive runs `combine` over
    /// every rank's input (in rank order) and each rank receives its result.
    fn meet(
        &self,
        call: Call,
        input: Vec<f64>,
        combine: impl FnOnce(&[Vec<f64>]) -> Vec<f64>,
    ) -> Result<Arc<Vec<f64>>> {
        let sh = &self.shared;
        let mut st = self.lock();
        if let Some(e) = self.broken(&st, &call) {
            return Err(e);
        }
        match &st.call {
            None => st.call = Some(call.clone()),
            Some(c) if *c != call => {
                let why = format!("called {call} while a peer called {c}");
                st.failed = Some((self.rank, why.clone()));
                sh.cv.notify_all();
                return Err(collective_error(format!(
                    "rank {}: the ranks disagree: it {why}",
                    self.rank
                )));
            }
            Some(_) => {}
        }
        st.inputs[self.rank] = Some(input);
        st.arrived += 1;
        if st.arrived == sh.n {
            let inputs: Vec<Vec<f64>> = st.inputs.iter_mut().filter_map(Option::take).collect();
            st.result = Arc::new(combine(&inputs));
            st.arrived = 0;
            st.call = None;
            st.generation += 1;
            sh.cv.notify_all();
            return Ok(Arc::clone(&st.result));
        }
        let (mine, start) = (st.generation, Instant::now());
        loop {
            let left = sh.timeout.saturating_sub(start.elapsed());
            let (guard, _) = sh
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
            if st.generation != mine {
                return Ok(Arc::clone(&st.result));
            }
            if let Some(e) = self.broken(&st, &call) {
                return Err(e);
            }
            if start.elapsed() >= sh.timeout {
                let missing: Vec<usize> = (0..sh.n).filter(|&r| st.inputs[r].is_none()).collect();
                let why = format!(
                    "waited {:.0} s in {call} for rank(s) {missing:?}, which never arrived (hung?)",
                    sh.timeout.as_secs_f64()
                );
                st.failed = Some((self.rank, why.clone()));
                sh.cv.notify_all();
                return Err(collective_error(format!("rank {}: {why}", self.rank)));
            }
        }
    }

    /// Sums `vals` over the ranks in rank order, in `T`.
    fn sum<T: Scalar>(&self, what: &'static str, vals: &[T]) -> Result<Arc<Vec<f64>>> {
        let input = vals.iter().map(|v| v.to_f64()).collect();
        let call = Call {
            what,
            n: vals.len(),
        };
        self.meet(call, input, |all| {
            let mut acc: Vec<T> = all[0].iter().map(|&v| T::from_f64(v)).collect();
            for other in &all[1..] {
                for (a, &v) in acc.iter_mut().zip(other) {
                    *a += T::from_f64(v);
                }
            }
            acc.into_iter().map(T::to_f64).collect()
        })
    }

    fn shard_of(&self, rank: usize, n: usize) -> Range<usize> {
        aligned_shard(rank, self.shared.n, n, 1)
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.fail("panicked");
        }
        let mut st = self.lock();
        st.left[self.rank] = true;
        self.shared.cv.notify_all();
    }
}

/// Checks that `buf` holds the `n` values a call is about.
fn check_len(what: &str, have: usize, n: usize) -> Result<()> {
    if have < n {
        return Err(collective_error(format!(
            "{what} of {n} values over a buffer of {have}"
        )));
    }
    Ok(())
}

impl<T: Scalar> Collective<Cpu<T>> for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.n
    }

    fn all_reduce_host(&self, vals: &mut [f64]) -> Result<()> {
        let sum = self.sum::<f64>("all_reduce_host", vals)?;
        vals.copy_from_slice(&sum);
        Ok(())
    }

    fn all_reduce(&self, _b: &Cpu<T>, buf: &mut [T], n: usize) -> Result<()> {
        check_len("all_reduce", buf.len(), n)?;
        let sum = self.sum("all_reduce", &buf[..n])?;
        for (x, &s) in buf.iter_mut().zip(sum.iter()) {
            *x = T::from_f64(s);
        }
        Ok(())
    }

    fn reduce_scatter(&self, _b: &Cpu<T>, buf: &mut [T], n: usize) -> Result<()> {
        check_len("reduce_scatter", buf.len(), n)?;
        let sum = self.sum("reduce_scatter", &buf[..n])?;
        let own = self.shard_of(self.rank, n);
        for (x, &s) in buf[own.clone()].iter_mut().zip(&sum[own]) {
            *x = T::from_f64(s);
        }
        Ok(())
    }

    fn all_gather(&self, _b: &Cpu<T>, buf: &mut [T], n: usize) -> Result<()> {
        check_len("all_gather", buf.len(), n)?;
        let own = self.shard_of(self.rank, n);
        let input = buf[own].iter().map(|v| v.to_f64()).collect();
        let call = Call {
            what: "all_gather",
            n,
        };
        let parts: Vec<Range<usize>> = (0..self.shared.n).map(|r| self.shard_of(r, n)).collect();
        let all = self.meet(call, input, |inputs| {
            let mut out = vec![0.0; n];
            for (r, part) in parts.iter().enumerate() {
                out[part.clone()].copy_from_slice(&inputs[r][..part.len()]);
            }
            out
        })?;
        for (x, &v) in buf.iter_mut().zip(all.iter()) {
            *x = T::from_f64(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Aligned;
    use std::thread;

    /// Runs `f` on every rank of a group of `n` on its own thread; the results in rank order.
    fn on_ranks<R: Send>(
        ranks: Vec<ThreadRank>,
        f: impl Fn(&ThreadRank) -> R + Sync,
    ) -> Vec<std::thread::Result<R>> {
        thread::scope(|s| {
            let hs: Vec<_> = ranks
                .into_iter()
                .map(|r| {
                    let f = &f;
                    s.spawn(move || f(&r))
                })
                .collect();
            hs.into_iter().map(|h| h.join()).collect()
        })
    }

    /// Rank r's values: distinct magnitudes, so a sum in another order rounds differently.
    fn values(r: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((r * 31 + i * 7) % 13) as f32 * 1e-3 + if r == 1 { 1e4 } else { 0.1 })
            .collect()
    }

    #[test]
    fn sums_run_in_rank_order_and_every_rank_gets_the_same_bits() {
        for n_ranks in [1, 2, 3, 4] {
            let out = on_ranks(ThreadGroup::new(n_ranks), |r| {
                let b = Cpu::<f32>::new();
                let mut buf = values(r.rank, 10);
                r.all_reduce(&b, &mut buf, 10).unwrap();
                let mut host = [r.rank as f64, 0.5];
                Collective::<Cpu<f32>>::all_reduce_host(r, &mut host).unwrap();
                (buf, host)
            });
            for (rank, o) in out.into_iter().enumerate() {
                let (buf, host) = o.unwrap();
                for (i, &v) in buf.iter().enumerate() {
                    let mut want = values(0, 10)[i];
                    for r in 1..n_ranks {
                        want += values(r, 10)[i];
                    }
                    assert_eq!(
                        v.to_bits(),
                        want.to_bits(),
                        "rank {rank} of {n_ranks}, i={i}"
                    );
                }
                let ranks = (0..n_ranks).sum::<usize>() as f64;
                assert_eq!(host, [ranks, 0.5 * n_ranks as f64]);
            }
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce() {
        for (n_ranks, n) in [(2, 7), (3, 10), (3, 2), (4, 9)] {
            let out = on_ranks(ThreadGroup::new(n_ranks), |r| {
                let b = Cpu::<f64>::new();
                let mut rs: Vec<f64> = values(r.rank, n).into_iter().map(f64::from).collect();
                let mut ar = rs.clone();
                r.reduce_scatter(&b, &mut rs, n).unwrap();
                r.all_gather(&b, &mut rs, n).unwrap();
                r.all_reduce(&b, &mut ar, n).unwrap();
                (rs, ar)
            });
            for o in out {
                let (rs, ar) = o.unwrap();
                assert_eq!(rs, ar, "{n_ranks} ranks, {n} values");
            }
        }
    }

    #[test]
    fn aligned_exchanges_leave_the_aligned_parts() {
        // 3 ranks over 600 values aligned to 256: parts 0..256, 256..512, 512..600, which are
        // not the plain parts of 200, so the provided methods take the all-reduce route.
        let out = on_ranks(ThreadGroup::new(3), |r| {
            let b = Cpu::<f64>::new();
            let mut buf = b.alloc(610, nopad_backend::Kind::Grad).unwrap();
            for (i, x) in buf.iter_mut().enumerate() {
                *x = (i * (r.rank + 1)) as f64;
            }
            let own = Collective::<Cpu<f64>>::shard_aligned(r, 600, 256);
            r.exchange_aligned(&b, (Aligned::ReduceScatter, 256), &mut buf, 5..605)
                .unwrap();
            let mine: Vec<f64> = buf[5 + own.start..5 + own.end].to_vec();
            let mut gathered = b.alloc(610, nopad_backend::Kind::Grad).unwrap();
            gathered.fill(-1.0);
            gathered[5 + own.start..5 + own.end].copy_from_slice(&mine);
            r.exchange_aligned(&b, (Aligned::AllGather, 256), &mut gathered, 5..605)
                .unwrap();
            (own, mine, gathered.to_vec())
        });
        let owns: Vec<Range<usize>> = vec![0..256, 256..512, 512..600];
        for (rank, o) in out.into_iter().enumerate() {
            let (own, mine, gathered) = o.unwrap();
            assert_eq!(own, owns[rank]);
            for (k, &v) in mine.iter().enumerate() {
                assert_eq!(v, (6 * (5 + own.start + k)) as f64);
            }
            assert_eq!(gathered[..5], [-1.0; 5]);
            assert_eq!(gathered[605..], [-1.0; 5]);
            for (i, &v) in gathered[5..605].iter().enumerate() {
                assert_eq!(v, (6 * (5 + i)) as f64, "rank {rank}, i={i}");
            }
        }
    }

    #[test]
    fn a_failed_rank_stops_its_peers_with_its_name() {
        let out = on_ranks(ThreadGroup::new(3), |r| {
            let b = Cpu::<f32>::new();
            let mut buf = vec![1.0f32; 4];
            r.all_reduce(&b, &mut buf, 4)?;
            if r.rank == 2 {
                r.fail("out of memory");
                return Err(collective_error("gave up".into()));
            }
            r.all_reduce(&b, &mut buf, 4)?;
            Ok::<_, TrainError>(buf)
        });
        for (rank, o) in out.into_iter().enumerate().take(2) {
            let e = o.unwrap().unwrap_err().to_string();
            assert!(
                e.contains("rank 2 failed: out of memory"),
                "rank {rank}: {e}"
            );
        }
    }

    #[test]
    fn a_panicking_or_departed_rank_never_hangs_its_peers() {
        let out = on_ranks(ThreadGroup::new(2), |r| {
            let b = Cpu::<f32>::new();
            let mut buf = vec![1.0f32; 3];
            if r.rank == 1 {
                panic!("deliberate");
            }
            r.all_reduce(&b, &mut buf, 3)
        });
        let e = out[0].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 1 failed: panicked"), "{e}");
        assert!(out[1].is_err());
        // A rank that returns (its handle dropped) without the call its peer makes.
        let out = on_ranks(ThreadGroup::new(2), |r| {
            let b = Cpu::<f32>::new();
            let mut buf = vec![1.0f32; 3];
            if r.rank == 0 {
                r.all_reduce(&b, &mut buf, 3)?;
            }
            Ok::<_, TrainError>(())
        });
        let e = out[0].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(e.contains("rank(s) [1] left the group"), "{e}");
    }

    #[test]
    fn a_hung_rank_times_out_and_disagreeing_calls_are_named() {
        let out = on_ranks(
            ThreadGroup::with_timeout(2, Duration::from_millis(200)),
            |r| {
                let b = Cpu::<f32>::new();
                let mut buf = vec![1.0f32; 3];
                if r.rank == 1 {
                    thread::sleep(Duration::from_millis(1000));
                    return Ok(());
                }
                r.all_reduce(&b, &mut buf, 3)
            },
        );
        let e = out[0].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(e.contains("for rank(s) [1], which never arrived"), "{e}");
        let out = on_ranks(ThreadGroup::new(2), |r| {
            let b = Cpu::<f32>::new();
            let mut buf = vec![1.0f32; 3];
            let n = if r.rank == 0 { 3 } else { 2 };
            r.all_reduce(&b, &mut buf, n)
        });
        let errs: Vec<String> = out
            .into_iter()
            .map(|o| o.unwrap().unwrap_err().to_string())
            .collect();
        assert!(
            errs.iter().any(|e| e.contains("the ranks disagree")
                && e.contains("all_reduce of 2 values")
                && e.contains("all_reduce of 3 values")),
            "{errs:?}"
        );
    }
}
