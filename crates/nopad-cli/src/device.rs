//! Choosing the backend: `--device auto|cpu|cuda`, and running a job generic over it.

use anyhow::Result;
use nopad_backend::{cpu::Cpu, Backend};

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

/// A piece of work that runs on whichever backend was chosen.
pub trait Job {
    /// What the job returns.
    type Out;
    /// Runs the job.
    fn run<B: Backend>(self, b: &B) -> Result<Self::Out>;
}

/// Runs `job` on the backend `choice` selects.
pub fn run_on<J: Job>(choice: DeviceChoice, job: J) -> Result<J::Out> {
    match choice {
        DeviceChoice::Cpu => job.run(&Cpu::<f32>::new()),
        DeviceChoice::Cuda => {
            anyhow::bail!("--device cuda: this build has no CUDA backend yet; use --device cpu")
        }
        DeviceChoice::Auto => {
            eprintln!("nopad: no CUDA backend in this build; using the CPU");
            job.run(&Cpu::<f32>::new())
        }
    }
}
