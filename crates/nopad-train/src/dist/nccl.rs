//! NCCL as the [`Collective`] of a multi-process CUDA run: [`NcclCollective::connect`] meets the
//! other ranks (rank 0 makes the NCCL id and hands it out through the rendezvous), joins the
//! communicator on the backend's device and stream, and every collective of the trait then runs
//! through NCCL ([`nopad_backend::cuda::NcclComm`]: non-blocking setup, a watchdog that aborts a
//! collective that outlives `NOPAD_NCCL_TIMEOUT` and fails every later call naming the rank, the
//! collective and its size).

use nopad_backend::cuda::{Cuda, CudaMut, NcclComm, NcclId, NcclOptions};

use super::env::{env_lookup, timeout_from, NCCL_TIMEOUT_VAR};
use super::rendezvous::{rendezvous, RendezvousOptions};
use super::{DistError, World};
use crate::collective::Collective;
use crate::error::Result;

/// The timeouts of the distributed layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DistOptions {
    /// The rendezvous (`NOPAD_RENDEZVOUS_TIMEOUT`, default 300 s).
    pub rendezvous: RendezvousOptions,
    /// NCCL's setup and each collective (`NOPAD_NCCL_TIMEOUT`, default 60 s).
    pub nccl: NcclOptions,
}

impl DistOptions {
    /// The defaults with the timeouts the environment sets.
    pub fn from_env() -> std::result::Result<Self, DistError> {
        Self::from_lookup(env_lookup)
    }

    /// As [`DistOptions::from_env`], reading variables through `get`.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, DistError> {
        let timeout = timeout_from(&get, NCCL_TIMEOUT_VAR, NcclOptions::default().timeout)?;
        Ok(DistOptions {
            rendezvous: RendezvousOptions::from_lookup(&get)?,
            nccl: NcclOptions { timeout },
        })
    }
}

/// This rank's NCCL communicator as a [`Collective`] over the CUDA backend.
pub struct NcclCollective {
    comm: NcclComm,
    token: u64,
}

impl NcclCollective {
    /// Meets the other ranks of `world` and joins their communicator on `cuda` (opened on device
    /// `world.local_rank`). Every rank calls it at the same point of its setup.
    pub fn connect(
        cuda: &Cuda,
        world: &World,
        opts: &DistOptions,
    ) -> std::result::Result<Self, DistError> {
        // Every rank checks for libnccl first: a rank without it fails before the others wait
        // for it.
        nopad_backend::cuda::nccl_version()?;
        let make_id = || Ok(NcclId::new()?.as_bytes().to_vec());
        let meeting = rendezvous(world, make_id, &opts.rendezvous)?;
        let id = NcclId::from_bytes(&meeting.payload)?;
        let comm = NcclComm::new(cuda, &id, world.rank, world.world_size, &opts.nccl)?;
        Ok(NcclCollective {
            comm,
            token: meeting.token,
        })
    }

    /// The run's token from the rendezvous (the same on every rank of this run).
    pub fn run_token(&self) -> u64 {
        self.token
    }

    /// Waits for every collective enqueued so far (before a checkpoint, say), failing with the
    /// watchdog's error if one timed out or NCCL reported one.
    pub fn wait(&self) -> Result<()> {
        Ok(self.comm.wait()?)
    }

    /// Changes the collective timeout from now on, on this rank (every rank should do the same
    /// at the same point): around a stretch where ranks wait for each other longer than
    /// `NOPAD_NCCL_TIMEOUT` on purpose, such as the collective after rank 0 writes a
    /// checkpoint, which the other ranks wait in.
    pub fn set_timeout(&self, timeout: std::time::Duration) {
        self.comm.set_timeout(timeout);
    }

    /// The collective timeout now.
    pub fn timeout(&self) -> std::time::Duration {
        self.comm.timeout()
    }

    /// The first failure the watchdog has seen, without waiting.
    pub fn check(&self) -> Result<()> {
        Ok(self.comm.check()?)
    }

    /// Aborts the communicator after this rank failed (`why`), so the other ranks' pending
    /// collectives fail now rather than at their timeout.
    pub fn abort(&self, why: &str) {
        self.comm.abort(why);
    }
}

impl Collective<Cuda> for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_host(&self, vals: &mut [f64]) -> Result<()> {
        // The trait gives host sums no backend; the communicator's stream is the backend's.
        Ok(self.comm.all_reduce_host(vals)?)
    }

    fn all_reduce(&self, b: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        Ok(self.comm.all_reduce(b, buf, n)?)
    }

    fn reduce_scatter(&self, b: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        Ok(self.comm.reduce_scatter(b, buf, n)?)
    }

    fn all_gather(&self, b: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        Ok(self.comm.all_gather(b, buf, n)?)
    }

    fn all_reduce_deferred(&self, b: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        Ok(self.comm.all_reduce_deferred(b, buf, n)?)
    }

    fn reduce_scatter_deferred(&self, b: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        Ok(self.comm.reduce_scatter_deferred(b, buf, n)?)
    }

    fn settle(&self, _b: &Cuda) -> Result<()> {
        Ok(self.comm.settle()?)
    }

    fn shard(&self, n: usize) -> std::ops::Range<usize> {
        // The layout the communicator pads to; the trait's default computes the same.
        nopad_backend::cuda::shard(n, self.comm.rank(), self.comm.world_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timeouts_come_from_the_environment() {
        let get = |k: &str| match k {
            "NOPAD_NCCL_TIMEOUT" => Some("5".to_string()),
            "NOPAD_RENDEZVOUS_TIMEOUT" => Some("30".to_string()),
            _ => None,
        };
        let o = DistOptions::from_lookup(get).unwrap();
        assert_eq!(o.nccl.timeout, Duration::from_secs(5));
        assert_eq!(o.rendezvous.timeout, Duration::from_secs(30));
        assert_eq!(
            DistOptions::from_lookup(|_| None).unwrap(),
            DistOptions::default()
        );
        assert_eq!(DistOptions::default().nccl.timeout, Duration::from_secs(60));
        let bad = DistOptions::from_lookup(|k| (k == NCCL_TIMEOUT_VAR).then(|| "x".into()));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("NOPAD_NCCL_TIMEOUT=\"x\""));
    }
}
