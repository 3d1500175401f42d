//! Collectives: what ranks of a data-parallel run exchange, behind a trait of its own so that the
//! step is written once for one process and for many. It is passed to the step and never folded
//! into [`Backend`]: a backend computes on one device, a collective joins several (NCCL over CUDA
//! buffers later, threads in tests).
//!
//! The step all-reduces host scalars (the step's target-token count, before any forward, so every
//! rank scales its loss by the global count; the squared gradient norm, for clipping) and, once
//! parameters are sharded, device buffer ranges (gradients reduce-scattered to the rank that owns
//! them, updated parameters all-gathered). [`SingleProcess`] is the identity at world size 1, so
//! one process computes exactly what it computed before collectives existed. [`ThreadGroup`]
//! (`threads`) joins ranks that are threads of one process, for tests and `--ranks N` on the CPU.

use std::ops::Range;

use nopad_backend::Backend;

use crate::error::Result;

mod threads;
pub use threads::{ThreadGroup, ThreadRank};

/// Communication between the ranks of one run. Every rank calls the same methods in the same
/// order (a collective call is a meeting point); buffers are summed element by element.
pub trait Collective<B: Backend> {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Sums `vals` over the ranks, in place, on the host (token counts, loss sums, squared norms).
    fn all_reduce_host(&self, vals: &mut [f64]) -> Result<()>;

    /// Sums the `n` elements of `buf` over the ranks, in place.
    fn all_reduce(&self, b: &B, buf: B::Mut<'_>, n: usize) -> Result<()>;

    /// Sums the `n` elements of `buf` over the ranks and leaves this rank's shard
    /// ([`Collective::shard`]) of the sum in place; the rest of `buf` is undefined afterwards.
    fn reduce_scatter(&self, b: &B, buf: B::Mut<'_>, n: usize) -> Result<()>;

    /// Fills all `n` elements of `buf` from the ranks' shards, each rank's shard read from that
    /// rank's `buf` ([`Collective::shard`]).
    fn all_gather(&self, b: &B, buf: B::Mut<'_>, n: usize) -> Result<()>;

    /// [`Collective::all_reduce`], which the device may still be running when later kernels
    /// start: `buf` must be neither written nor freed before [`Collective::settle`]. It lets the
    /// exchange of one group's gradient run while the backward computes the next group. Where
    /// collectives are synchronous (threads, one process) it is `all_reduce`.
    fn all_reduce_deferred(&self, b: &B, buf: B::Mut<'_>, n: usize) -> Result<()> {
        self.all_reduce(b, buf, n)
    }

    /// [`Collective::reduce_scatter`], deferred as [`Collective::all_reduce_deferred`] is.
    fn reduce_scatter_deferred(&self, b: &B, buf: B::Mut<'_>, n: usize) -> Result<()> {
        self.reduce_scatter(b, buf, n)
    }

    /// Orders everything computed from now on after every deferred collective (on a GPU: the
    /// compute stream waits for the communication stream; the host does not wait).
    fn settle(&self, _b: &B) -> Result<()> {
        Ok(())
    }

    /// The part of `0..n` this rank owns in [`Collective::reduce_scatter`] and
    /// [`Collective::all_gather`]: equal shards, the last one shorter when `n` does not divide.
    fn shard(&self, n: usize) -> Range<usize> {
        let per = n.div_ceil(self.world_size().max(1));
        let start = (self.rank() * per).min(n);
        start..(start + per).min(n)
    }

    /// Sums one host integer over the ranks (exact below 2^53, far above any token count).
    fn all_reduce_count(&self, n: usize) -> Result<usize> {
        let mut v = [n as f64];
        self.all_reduce_host(&mut v)?;
        Ok(v[0] as usize)
    }

    /// This rank's part of `0..n` when every part but the last must start on a multiple of
    /// `align` ([`aligned_shard`]): 8-bit moments are quantised in blocks of 256 counted from
    /// the start of each piece of state, so pieces that start on a block of the unsharded state
    /// keep its blocks and hence its numbers. With `align` 1 this is [`Collective::shard`].
    fn shard_aligned(&self, n: usize, align: usize) -> Range<usize> {
        aligned_shard(self.rank(), self.world_size(), n, align)
    }

    /// A sharded state's exchange ([`Aligned`]) over `range` of `buf`, on the ranks'
    /// [`Collective::shard_aligned`] parts (relative to `range`).
    ///
    /// Where the aligned parts are [`Collective::shard`]'s, a reduce-scatter or all-gather.
    /// Otherwise an all-reduce (twice the traffic, the same sums; for a gather, of this rank's
    /// part with the rest zeroed, which adds exactly) until an implementation overrides this
    /// with padded collectives.
    fn exchange_aligned(
        &self,
        b: &B,
        (op, align): (Aligned, usize),
        buf: &mut B::Buf,
        range: Range<usize>,
    ) -> Result<()> {
        let n = range.len();
        let plain = plain_is_aligned(self.world_size(), n, align);
        match (op, plain) {
            (Aligned::ReduceScatter, true) => self.reduce_scatter(b, b.view_mut(buf, range), n),
            (Aligned::ReduceScatterDeferred, true) => {
                self.reduce_scatter_deferred(b, b.view_mut(buf, range), n)
            }
            (Aligned::AllGather, true) => self.all_gather(b, b.view_mut(buf, range), n),
            (Aligned::ReduceScatter, false) => self.all_reduce(b, b.view_mut(buf, range), n),
            (Aligned::ReduceScatterDeferred, false) => {
                self.all_reduce_deferred(b, b.view_mut(buf, range), n)
            }
            (Aligned::AllGather, false) => {
                let own = self.shard_aligned(n, align);
                let s = range.start;
                b.zero(b.view_mut(buf, s..s + own.start))?;
                b.zero(b.view_mut(buf, s + own.end..range.end))?;
                self.all_reduce(b, b.view_mut(buf, range), n)
            }
        }
    }
}

/// The exchanges of a sharded state ([`Collective::exchange_aligned`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aligned {
    /// Sum over the ranks; at least this rank's part of the sum is left in place.
    ReduceScatter,
    /// [`Aligned::ReduceScatter`], deferred ([`Collective::reduce_scatter_deferred`]): the
    /// range must not be written or freed before [`Collective::settle`].
    ReduceScatterDeferred,
    /// Every rank's part, read from that rank, fills the whole range.
    AllGather,
}

/// Rank `rank`'s part of `0..n` split over `world` ranks: equal parts of `ceil(n / world)`
/// rounded up to a multiple of `align`, the last ones shorter or empty.
pub fn aligned_shard(rank: usize, world: usize, n: usize, align: usize) -> Range<usize> {
    let per = n.div_ceil(world.max(1)).next_multiple_of(align.max(1));
    let start = (rank * per).min(n);
    start..(start + per).min(n)
}

/// Whether [`aligned_shard`]'s parts of `0..n` are [`Collective::shard`]'s.
fn plain_is_aligned(world: usize, n: usize, align: usize) -> bool {
    n.div_ceil(world.max(1)).is_multiple_of(align.max(1))
}

/// One process, one rank: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl<B: Backend> Collective<B> for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_host(&self, _vals: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_reduce(&self, _b: &B, _buf: B::Mut<'_>, _n: usize) -> Result<()> {
        Ok(())
    }

    fn reduce_scatter(&self, _b: &B, _buf: B::Mut<'_>, _n: usize) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, _b: &B, _buf: B::Mut<'_>, _n: usize) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nopad_backend::cpu::Cpu;

    /// Rank `r` of a world of `w`, for the provided methods (no communication).
    struct Rank(usize, usize);

    impl Collective<Cpu<f32>> for Rank {
        fn rank(&self) -> usize {
            self.0
        }
        fn world_size(&self) -> usize {
            self.1
        }
        fn all_reduce_host(&self, vals: &mut [f64]) -> Result<()> {
            // As if every rank held the same values.
            vals.iter_mut().for_each(|v| *v *= self.1 as f64);
            Ok(())
        }
        fn all_reduce(&self, _: &Cpu<f32>, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
        fn reduce_scatter(&self, _: &Cpu<f32>, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
        fn all_gather(&self, _: &Cpu<f32>, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn shards_tile_the_range() {
        for (n, w) in [(10, 3), (9, 3), (2, 4), (0, 2), (7, 1)] {
            let mut next = 0;
            for r in 0..w {
                let s = Rank(r, w).shard(n);
                assert_eq!(s.start, next, "n={n} w={w} r={r}");
                next = s.end;
            }
            assert_eq!(next, n, "n={n} w={w}");
        }
        assert_eq!(Rank(1, 2).all_reduce_count(21).unwrap(), 42);
    }

    #[test]
    fn a_single_process_changes_nothing() {
        let b = Cpu::<f32>::new();
        let c = SingleProcess;
        let mut buf = vec![1.5f32, -2.0, 3.25];
        let before = buf.clone();
        Collective::<Cpu<f32>>::all_reduce(&c, &b, &mut buf, 3).unwrap();
        c.reduce_scatter(&b, &mut buf, 3).unwrap();
        c.all_gather(&b, &mut buf, 3).unwrap();
        assert_eq!(buf, before);
        let mut v = [7.0, 0.5];
        Collective::<Cpu<f32>>::all_reduce_host(&c, &mut v).unwrap();
        assert_eq!(v, [7.0, 0.5]);
        assert_eq!(Collective::<Cpu<f32>>::shard(&c, 5), 0..5);
        assert_eq!(Collective::<Cpu<f32>>::world_size(&c), 1);
    }
}
