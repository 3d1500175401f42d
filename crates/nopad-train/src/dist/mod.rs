//! Several processes, one run: where this process stands ([`World`], from torchrun's variables),
//! how the ranks meet (`rendezvous`: rank 0 hands the others the NCCL id over TCP), how
//! `nopad train --gpus N` starts one worker per GPU and stops them all when one fails
//! ([`launch_local`]), and NCCL as the [`crate::Collective`] of a CUDA run ([`NcclCollective`]).
//!
//! Module map: `env` (the world and the timeouts from the environment), `rendezvous` (the TCP
//! meeting), `launch` (the local launcher), `nccl` (the collective). Errors are [`DistError`]:
//! every one says which rank, which address or which variable, and what to do.
//!
//! A worker's setup, in order: [`World::from_env`] (None: a single-process run), open the CUDA
//! backend on device `local_rank`, [`NcclCollective::connect`] (rendezvous, then NCCL), train
//! with it as the collective; only rank 0 prints, logs and writes checkpoints.

mod env;
mod launch;
mod nccl;
mod rendezvous;

pub use env::{World, NCCL_TIMEOUT_VAR, RENDEZVOUS_TIMEOUT_VAR, WORLD_VARS};
pub use launch::{launch_local, without_flag, LaunchOptions, WorkerExit, STOPPED_STATUS};
pub use nccl::{DistOptions, NcclCollective};
pub use rendezvous::{rendezvous, Meeting, RendezvousOptions};

/// What setting up or running several processes can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable or a timeout variable is missing, malformed or inconsistent.
    #[error("{0}")]
    Environment(String),
    /// The ranks did not meet: one did not arrive, a duplicate or mismatched rank, something
    /// that is not a nopad rank on the port, rank 0 unreachable or failing.
    #[error("{0}")]
    Rendezvous(String),
    /// The local launcher could not start or watch its workers.
    #[error("{0}")]
    Launch(String),
    /// A worker of the local launcher failed; the others were stopped.
    #[error("{}", worker_message(*.rank, .exit, .tail))]
    Worker {
        /// Its rank.
        rank: usize,
        /// How it ended.
        exit: WorkerExit,
        /// Its last lines on stderr (rank 0's go straight to the terminal, so none).
        tail: Vec<String>,
    },
    /// A signal stopped the workers, which saved and exited as a stopped run does.
    #[error(
        "stopped by signal {signal}: every worker finished its step and stopped (rank 0 saved \
         a checkpoint to resume from)"
    )]
    Interrupted {
        /// The signal forwarded to the workers.
        signal: i32,
    },
    /// NCCL or the CUDA backend failed.
    #[error(transparent)]
    Backend(#[from] nopad_backend::BackendError),
}

impl DistError {
    /// A malformed variable: "`RANK="two"` is not a whole number".
    fn env(var: &str, value: &str, why: &str) -> DistError {
        DistError::Environment(format!("{var}={value:?} {why}"))
    }

    /// The status the launching process should exit with: a failed worker's own (128 + signal
    /// when a signal killed it), [`STOPPED_STATUS`] after a forwarded signal; `None` for errors
    /// that are the launcher's own.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            DistError::Worker { exit, .. } => Some(exit.code()),
            DistError::Interrupted { .. } => Some(STOPPED_STATUS),
            _ => None,
        }
    }
}

fn worker_message(rank: usize, exit: &WorkerExit, tail: &[String]) -> String {
    let mut msg = format!("rank {rank} failed ({exit}); the other ranks were stopped");
    if rank == 0 {
        msg.push_str("; its output is above");
    } else if tail.is_empty() {
        msg.push_str("; it wrote nothing to stderr");
    } else {
        msg.push_str("; its last lines on stderr:");
        for line in tail {
            msg.push_str("\n  [rank ");
            msg.push_str(&rank.to_string());
            msg.push_str("] ");
            msg.push_str(line);
        }
    }
    msg
}

/// Asserts that `text` contains each of `parts` (how the tests check a message).
#[cfg(test)]
fn assert_says(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} missing from {text:?}");
    }
}
