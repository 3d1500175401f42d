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

/// `--grad-dtype`: the element type of parameter gradients on CUDA in bf16 mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradDtype {
    /// bf16 when a step is one micro-batch (the gradient is then rounded once, as it is
    /// written), f32 under gradient accumulation (where bf16 would round at every micro-batch).
    Auto,
    /// Always f32.
    F32,
    /// Always bf16.
    Bf16,
}

/// Parses `--grad-dtype`.
pub fn parse_grad_dtype(s: &str) -> std::result::Result<GradDtype, String> {
    match s {
        "auto" => Ok(GradDtype::Auto),
        "f32" => Ok(GradDtype::F32),
        "bf16" => Ok(GradDtype::Bf16),
        _ => Err(format!(
            "unknown gradient dtype `{s}` (expected auto, f32 or bf16)"
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
    /// The user asked for bf16 gradients (`--grad-dtype bf16`), so falling back to the CPU,
    /// which keeps f32 gradients, is worth a note.
    pub asked_bf16_grads: bool,
}

impl Precision {
    /// `dtype` with fp32 gradients.
    pub fn of(dtype: CudaDtype) -> Self {
        Precision {
            dtype,
            bf16_grads: false,
            asked_bf16_grads: false,
        }
    }

    /// `dtype` with gradients as `--grad-dtype` asks for `grad_accum` micro-batches per step.
    pub fn with_grads(dtype: CudaDtype, grads: GradDtype, grad_accum: usize) -> Self {
        let bf16_grads = match grads {
            GradDtype::Auto => dtype == CudaDtype::Bf16 && grad_accum == 1,
            GradDtype::F32 => false,
            GradDtype::Bf16 => true,
        };
        Precision {
            dtype,
            bf16_grads,
            asked_bf16_grads: grads == GradDtype::Bf16,
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
        if prec.asked_bf16_grads {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gradients_are_bf16_only_for_one_micro_batch_in_bf16_mode() {
        let bf16 = |dtype, g, accum| Precision::with_grads(dtype, g, accum).bf16_grads;
        assert!(bf16(CudaDtype::Bf16, GradDtype::Auto, 1));
        assert!(!bf16(CudaDtype::Bf16, GradDtype::Auto, 2));
        assert!(!bf16(CudaDtype::F32, GradDtype::Auto, 1));
        assert!(bf16(CudaDtype::Bf16, GradDtype::Bf16, 4));
        assert!(!bf16(CudaDtype::Bf16, GradDtype::F32, 1));
        assert_eq!(parse_grad_dtype("auto"), Ok(GradDtype::Auto));
        assert!(parse_grad_dtype("f16")
            .unwrap_err()
            .contains("auto, f32 or bf16"));
    }
}
