//! Where `nopad train` runs: one device ([`train_on`]), ranks as CPU threads (`--ranks N`), or
//! several GPUs (docs/DISTRIBUTED.md): `--gpus N` makes this process a local
//! launcher of N workers of the same command, and a process that finds torchrun's variables
//! (`WORLD_SIZE` and the rest, set by `--gpus`, torchrun or an `srun` script) is one worker: it
//! opens CUDA device `LOCAL_RANK`, meets the other ranks through the rendezvous, joins their
//! NCCL communicator and trains its rank of the run. Only rank 0 prints the summary.

use std::ffi::OsString;

use anyhow::{bail, Context, Result};
use nopad_backend::cuda::{Cuda, CudaOptions};
use nopad_train::{DistOptions, LaunchOptions, NcclCollective, TrainConfig, World};

use nopad_backend::Backend;

use crate::device::{run_on, DeviceChoice, Job, Precision};

/// Starts `n` workers of this very command line without `--gpus` and waits for them; exits the
/// process with the failed worker's status when one fails (after stopping the others).
pub fn launch(n: usize) -> Result<()> {
    if n == 0 {
        bail!("--gpus 0: give the number of GPUs to train on (at least 1)");
    }
    let exe = std::env::current_exe().context("finding this executable to start the workers")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let args = nopad_train::without_flag(&args, "--gpus");
    eprintln!("nopad: starting {n} workers, one per GPU");
    if let Err(e) = nopad_train::launch_local(n, exe.as_os_str(), &args, &LaunchOptions::default())
    {
        eprintln!("nopad: error: {e}");
        std::process::exit(e.exit_code().unwrap_or(2));
    }
    Ok(())
}

/// The world this process is a worker of, if any (a malformed variable is an error naming it).
pub fn world() -> Result<Option<World>> {
    Ok(World::from_env()?)
}

/// Trains rank `world.rank` of `cfg` on CUDA device `world.local_rank`, through NCCL.
pub fn run_worker(
    world: &World,
    device: DeviceChoice,
    prec: Precision,
    cfg: &TrainConfig,
) -> Result<nopad_train::Summary> {
    if device == DeviceChoice::Cpu {
        bail!(
            "WORLD_SIZE={} (a worker of a multi-process run) with --device cpu: processes of a \
             run talk through NCCL on GPUs; for ranks on the CPU use --ranks N in one process",
            world.world_size
        );
    }
    if cfg.ranks > 1 {
        bail!("--ranks (threads on the CPU) and a multi-process run (WORLD_SIZE is set) do not combine");
    }
    let cuda = Cuda::new(CudaOptions {
        device: world.local_rank,
        dtype: prec.dtype,
        bf16_grads: prec.bf16_grads,
        ..Default::default()
    })
    .with_context(|| format!("rank {}: CUDA device {}", world.rank, world.local_rank))?;
    cuda.warm_up().context("compiling the CUDA kernels")?;
    let coll = NcclCollective::connect(&cuda, world, &DistOptions::from_env()?)
        .with_context(|| format!("rank {} joining the run at {}", world.rank, world.master()))?;
    if world.is_first() {
        eprintln!(
            "nopad: rank 0 of {} on {} ({})",
            world.world_size,
            nopad_backend::Device::describe(&cuda),
            nopad_backend::cuda::nccl_version().unwrap_or_default()
        );
    }
    let out = nopad_train::train_rank(&cuda, &coll, cfg, |_| {});
    if let Err(e) = &out {
        // The peers are waiting in a collective for this rank: abort it so they fail now.
        coll.abort(&format!("failed: {e}"));
    }
    out.with_context(|| format!("rank {}", world.rank))
}

struct TrainJob(TrainConfig);

impl Job for TrainJob {
    type Out = nopad_train::Summary;
    fn run<B: Backend>(self, b: &B) -> Result<Self::Out> {
        eprintln!("nopad: training on {}", b.describe());
        Ok(nopad_train::train(b, &self.0, |_| {}).inspect_err(|e| {
            if nopad_train::is_out_of_memory(e) {
                nopad_train::print_plan_for_out_of_memory();
            }
        })?)
    }
}

/// Trains `cfg` on the device chosen, or on `cfg.ranks` ranks of the CPU.
pub fn train_on(
    device: DeviceChoice,
    prec: Precision,
    cfg: TrainConfig,
) -> Result<nopad_train::Summary> {
    if cfg.ranks == 1 {
        return run_on(device, prec, TrainJob(cfg));
    }
    if device != DeviceChoice::Cpu {
        bail!(
            "`ranks` {}: ranks as threads run on the CPU only; add --device cpu",
            cfg.ranks
        );
    }
    eprintln!(
        "nopad: training on {} ranks of the CPU (threads)",
        cfg.ranks
    );
    Ok(nopad_train::train_threads::<f32>(&cfg, |_| {})?)
}
