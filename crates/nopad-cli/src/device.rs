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

/// Parses `--grad-dtype` into whether gradients are bf16.
pub fn parse_grad_dtype(s: &str) -> std::result::Result<bool, String> {
    match s {
        "f32" => Ok(false),
        "bf16" => Ok(true),
        _ => Err(format!(
            "unknown gradient dtype `{s}` (expected f32 or bf16)"
        )),
    }
}

/// The CUDA precision settings (`--dtype`, `--grad-dtype`); the CPU ignores them.
#[derive(Clone, Copy, Debug)]
pub struct Precision {
    /// Compute type.
    pub dtype: CudaDtype,
    /// bf16 parameter gradients (bf16 compute only).
    pub bf16_grads: bool,
}

impl Precision {
    /// `dtype` with fp32 gradients.
    pub fn of(dtype: CudaDtype) -> Self {
        Precision {
            dtype,
            bf16_grads: false,
        }
    }
}

/// A piece of work that runs on whichever backend was chosen.
pub trait Job {
    /// What the job returns.
    type Out;
    /// Runs the job.
    fn run<B: Backend>(self, b: &B) -> Result<Self::Out>;
}

fn cuda(p: Precision) -> Result<Cuda> {
    let c = Cuda::new(CudaOptions {
        dtype: p.dtype,
        bf16_grads: p.bf16_grads,
        ..Default::default()
    })
    .context("--device cuda")?;
    c.warm_up().context("compiling the CUDA kernels")?;
    Ok(c)
}

/// Runs `job` on the backend `choice` selects.
pub fn run_on<J: Job>(choice: DeviceChoice, prec: Precision, job: J) -> Result<J::Out> {
    let cpu = |job: J| {
        if prec.bf16_grads {
            eprintln!("nopad: --grad-dtype bf16 applies to CUDA only; the CPU keeps f32 gradients");
        }
        job.run(&Cpu::<f32>::new())
    };
    match choice {
        DeviceChoice::Cpu => cpu(job),
        DeviceChoice::Cuda => job.run(&cuda(prec)?),
        DeviceChoice::Auto => match probe() {
            Ok(_) => job.run(&cuda(prec)?),
            Err(why) => {
                eprintln!("nopad: no usable GPU ({why}); using the CPU");
                cpu(job)
            }
        },
    }
}
