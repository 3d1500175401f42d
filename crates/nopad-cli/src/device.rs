//! Choosing the backend: `--device auto|cpu|cuda` (and `--dtype bf16|f32` on CUDA), and running
//! a job generic over it.

use anyhow::{Context, Result};
use nopad_backend::cpu::Cpu;
use nopad_backend::cuda::{probe, Cuda, CudaDtype, CudaOptions};
use nopad_backend::Backend;

/// What `--device` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when a usable GPU is present, else the CPU (and say so).
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend; an error when it cannot start.
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            _ => Err(format!("unknown device `{s}` (expected auto, cpu or cuda)")),
        }
    }
}

/// Parses `--dtype`.
pub fn parse_dtype(s: &str) -> std::result::Result<CudaDtype, String> {
    match s {
        "bf16" => Ok(CudaDtype::Bf16),
        "f32" => Ok(CudaDtype::F32),
        _ => Err(format!("unknown dtype `{s}` (expected bf16 or f32)")),
    }
}

/// A piece of work that runs on whichever backend was chosen.
pub trait Job {
    /// What the job returns.
    type Out;
    /// Runs the job.
    fn run<B: Backend>(self, b: &B) -> Result<Self::Out>;
}

fn cuda(dtype: CudaDtype) -> Result<Cuda> {
    let c = Cuda::new(CudaOptions {
        dtype,
        ..Default::default()
    })
    .context("--device cuda")?;
    c.warm_up().context("compiling the CUDA kernels")?;
    Ok(c)
}

/// Runs `job` on the backend `choice` selects.
pub fn run_on<J: Job>(choice: DeviceChoice, dtype: CudaDtype, job: J) -> Result<J::Out> {
    match choice {
        DeviceChoice::Cpu => job.run(&Cpu::<f32>::new()),
        DeviceChoice::Cuda => job.run(&cuda(dtype)?),
        DeviceChoice::Auto => match probe() {
            Ok(_) => job.run(&cuda(dtype)?),
            Err(why) => {
                eprintln!("nopad: no usable GPU ({why}); using the CPU");
                job.run(&Cpu::<f32>::new())
            }
        },
    }
}
